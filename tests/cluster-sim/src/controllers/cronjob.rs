//! The CronJob controller: a Job `<name>-<minutes since the epoch>` at each scheduled time
//! (in `spec.timeZone`), honouring suspend, startingDeadlineSeconds and concurrencyPolicy,
//! with the active list, last schedule/success times and history limits in status.

use super::job::is_finished;
use super::log_failure;
use crate::cron::Schedule;
use crate::error::Result;
use crate::util::{self, controller_ref, is_controlled_by, now};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;

const SCHEDULED_ANNOTATION: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// How far back a missed schedule is looked for (the real controller gives up after 100
/// missed runs and starts only the latest, which this also does).
const LOOKBACK_MINUTES: i64 = 60 * 24 * 366;

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<CronJob> = Api::all(client.clone());
    let jobs: Vec<Job> = util::list(&Api::all(client.clone()), "jobs").await?;
    for cj in util::list(&all, "cronjobs").await? {
        if util::is_deleting(&cj) {
            continue;
        }
        if let Err(e) = sync(client, &cj, &jobs).await {
            log_failure(
                "CronJob",
                &cj.namespace().unwrap_or_default(),
                &cj.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

fn job_ref(j: &Job) -> serde_json::Value {
    json!({
        "apiVersion": "batch/v1", "kind": "Job", "name": j.name_any(),
        "namespace": j.namespace(), "uid": j.uid(), "resourceVersion": j.resource_version(),
    })
}

async fn sync(client: &Client, cj: &CronJob, all_jobs: &[Job]) -> Result<()> {
    let ns = cj.namespace().unwrap_or_default();
    let name = cj.name_any();
    let uid = cj.uid().unwrap_or_default();
    let Some(spec) = cj.spec.clone() else {
        return Ok(());
    };
    let jobs_api: Api<Job> = Api::namespaced(client.clone(), &ns);
    let what = format!("CronJob {ns}/{name}");
    let mut owned: Vec<&Job> = all_jobs
        .iter()
        .filter(|j| {
            j.namespace().as_deref() == Some(ns.as_str())
                && is_controlled_by(*j, &uid)
                && !util::is_deleting(*j)
        })
        .collect();
    owned.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let mut active: Vec<&Job> = owned
        .iter()
        .copied()
        .filter(|j| is_finished(j).is_none())
        .collect();
    let cur = serde_json::to_value(&cj.status).unwrap_or_default();
    let mut last_schedule: Option<Time> = cj
        .status
        .as_ref()
        .and_then(|s| s.last_schedule_time.clone());
    let last_success = owned
        .iter()
        .filter(|j| is_finished(j) == Some("Complete"))
        .filter_map(|j| j.status.as_ref()?.completion_time.clone())
        .max_by_key(|t| t.0)
        .or_else(|| {
            cj.status
                .as_ref()
                .and_then(|s| s.last_successful_time.clone())
        });
    // History limits: the oldest finished Jobs beyond them go.
    for (kind, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let done: Vec<&&Job> = owned
            .iter()
            .filter(|j| is_finished(j) == Some(kind))
            .collect();
        let keep = usize::try_from(limit).unwrap_or(0);
        if done.len() > keep {
            for j in &done[..done.len() - keep] {
                util::delete(
                    &jobs_api,
                    &j.name_any(),
                    &format!("Job {ns}/{}", j.name_any()),
                )
                .await?;
            }
        }
    }
    let schedule = match Schedule::parse(&spec.schedule) {
        Ok(s) => Some(s),
        Err(message) => {
            tracing::warn!(ns, name, %message, "unparseable schedule; the CronJob never runs");
            None
        }
    };
    let tz = match spec.time_zone.as_deref() {
        Some(z) => jiff::tz::TimeZone::get(z).ok(),
        None => Some(jiff::tz::TimeZone::UTC),
    };
    if let (Some(schedule), Some(tz), false) = (schedule, tz, spec.suspend == Some(true)) {
        let now = now();
        let since = last_schedule
            .clone()
            .or_else(|| cj.metadata.creation_timestamp.clone())
            .map_or(now.0, |t| t.0);
        let local = |t: jiff::Timestamp| t.to_zoned(tz.clone()).datetime();
        let due = schedule
            .latest_between(local(since), local(now.0), LOOKBACK_MINUTES)
            .and_then(|dt| dt.to_zoned(tz.clone()).ok());
        if let Some(at) = due {
            let too_late = spec
                .starting_deadline_seconds
                .is_some_and(|d| at.timestamp() + jiff::SignedDuration::from_secs(d) < now.0);
            let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
            let blocked = policy == "Forbid" && !active.is_empty();
            if !too_late && !blocked {
                if policy == "Replace" {
                    for j in active.drain(..) {
                        util::delete(
                            &jobs_api,
                            &j.name_any(),
                            &format!("Job {ns}/{}", j.name_any()),
                        )
                        .await?;
                    }
                }
                let job_name = format!("{name}-{}", at.timestamp().as_second() / 60);
                let tm = spec.job_template.metadata.clone().unwrap_or_default();
                let mut annotations = tm.annotations.unwrap_or_default();
                annotations.insert(
                    SCHEDULED_ANNOTATION.into(),
                    at.strftime("%Y-%m-%dT%H:%M:%S%:z")
                        .to_string()
                        .replace("+00:00", "Z"),
                );
                let job = Job {
                    metadata: ObjectMeta {
                        name: Some(job_name.clone()),
                        namespace: Some(ns.clone()),
                        labels: tm.labels,
                        annotations: Some(annotations),
                        owner_references: Some(vec![controller_ref(cj)]),
                        ..Default::default()
                    },
                    spec: spec.job_template.spec.clone(),
                    status: None,
                };
                let created = match jobs_api.create(&Default::default(), &job).await {
                    Ok(j) => Some(j),
                    Err(kube::Error::Api(s)) if s.code == 409 => None,
                    Err(source) => {
                        return Err(crate::error::Error::Kube {
                            action: format!("create Job {ns}/{job_name}"),
                            source,
                        });
                    }
                };
                last_schedule = Some(Time(at.timestamp()));
                if let Some(j) = created {
                    let status = json!({
                        "active": active.iter().map(|j| job_ref(j)).chain([job_ref(&j)]).collect::<Vec<_>>(),
                        "lastScheduleTime": last_schedule,
                        "lastSuccessfulTime": last_success,
                    });
                    let api: Api<CronJob> = Api::namespaced(client.clone(), &ns);
                    util::patch_status(&api, &name, status, &what).await?;
                    return Ok(());
                }
            }
        }
    }
    let refs: Vec<serde_json::Value> = active.iter().map(|j| job_ref(j)).collect();
    let status = json!({
        "active": if refs.is_empty() { serde_json::Value::Null } else { json!(refs) },
        "lastScheduleTime": last_schedule,
        "lastSuccessfulTime": last_success,
    });
    let same = |k: &str| {
        let a = cur.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let b = status[k].clone();
        // Resource versions move with every Job status write; compare the references by name.
        let names = |v: &serde_json::Value| {
            v.as_array()
                .map(|a| a.iter().map(|r| r["name"].clone()).collect::<Vec<_>>())
        };
        if k == "active" {
            names(&a) == names(&b)
        } else {
            a == b
        }
    };
    if !["active", "lastScheduleTime", "lastSuccessfulTime"]
        .iter()
        .all(|k| same(k))
    {
        let api: Api<CronJob> = Api::namespaced(client.clone(), &ns);
        util::patch_status(&api, &name, status, &what).await?;
    }
    Ok(())
}
