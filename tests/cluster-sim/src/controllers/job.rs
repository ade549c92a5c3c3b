//! The Job controller: pods up to `parallelism` until `completions` succeed (per index for
//! Indexed Jobs), failures counted through the job-tracking finalizer, back-off between
//! retries, `backoffLimit`/`activeDeadlineSeconds`, suspend, and the TTL after finishing.

use super::{generate_prefix, log_failure, pod_from_template};
use crate::error::Result;
use crate::util::{
    self, controller_ref, is_controlled_by, now, pod_is_active, pod_is_ready, set_condition,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";
const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<Job> = Api::all(client.clone());
    let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
    for job in util::list(&all, "jobs").await? {
        if let Err(e) = sync(client, &job, &pods).await {
            log_failure(
                "Job",
                &job.namespace().unwrap_or_default(),
                &job.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

pub fn is_finished(job: &Job) -> Option<&'static str> {
    let conds = job.status.as_ref()?.conditions.as_deref()?;
    if conds
        .iter()
        .any(|c| c.type_ == "Complete" && c.status == "True")
    {
        Some("Complete")
    } else if conds
        .iter()
        .any(|c| c.type_ == "Failed" && c.status == "True")
    {
        Some("Failed")
    } else {
        None
    }
}

fn index_of(p: &Pod) -> Option<i32> {
    p.annotations().get(INDEX_ANNOTATION)?.parse().ok()
}

/// `"1,3-5,7"` from a set of indexes.
fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(first) = it.next() {
        let mut last = first;
        while it.peek() == Some(&(last + 1)) {
            last += 1;
            it.next();
        }
        out.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    out.join(",")
}

fn parse_indexes(s: &str) -> BTreeSet<i32> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse().unwrap_or(0), b.parse().unwrap_or(-1));
                (a..=b).collect::<Vec<i32>>()
            }
            None => p.parse().ok().into_iter().collect(),
        })
        .collect()
}

fn finished_at(p: &Pod) -> Option<jiff::Timestamp> {
    p.status
        .as_ref()?
        .container_statuses
        .as_deref()?
        .iter()
        .filter_map(|c| {
            c.state
                .as_ref()?
                .terminated
                .as_ref()?
                .finished_at
                .as_ref()
                .map(|t| t.0)
        })
        .max()
}

async fn sync(client: &Client, job: &Job, all_pods: &[Pod]) -> Result<()> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(client.clone(), &ns);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let Some(spec) = job.spec.clone() else {
        return Ok(());
    };
    let what = format!("Job {ns}/{name}");
    let pods: Vec<&Pod> = all_pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && is_controlled_by(*p, &uid))
        .collect();
    let cur = serde_json::to_value(&job.status).unwrap_or_default();
    // Count terminal pods through the finalizer: record them as uncounted, drop the
    // finalizer, then fold them into the counters.
    let mut uncounted_ok: BTreeSet<String> = str_set(&cur, "/uncountedTerminatedPods/succeeded");
    let mut uncounted_failed: BTreeSet<String> = str_set(&cur, "/uncountedTerminatedPods/failed");
    let mut succeeded = cur["succeeded"].as_i64().unwrap_or(0);
    let mut failed = cur["failed"].as_i64().unwrap_or(0);
    let mut completed: BTreeSet<i32> =
        parse_indexes(cur["completedIndexes"].as_str().unwrap_or(""));
    let tracked: Vec<&&Pod> = pods
        .iter()
        .filter(|p| {
            util::pod_is_terminal(p) && p.finalizers().iter().any(|f| f == TRACKING_FINALIZER)
        })
        .collect();
    if !tracked.is_empty() {
        for p in &tracked {
            let id = p.uid().unwrap_or_default();
            if util::pod_phase(p) == "Succeeded" {
                uncounted_ok.insert(id);
            } else {
                uncounted_failed.insert(id);
            }
        }
        util::patch_status(&api, &name, json!({"uncountedTerminatedPods": {"succeeded": uncounted_ok, "failed": uncounted_failed}}), &what).await?;
        for p in &tracked {
            let fins: Vec<&String> = p
                .finalizers()
                .iter()
                .filter(|f| *f != TRACKING_FINALIZER)
                .collect();
            match util::merge_patch(
                &pods_api,
                &p.name_any(),
                json!({"metadata": {"finalizers": fins}}),
                &format!("pod {ns}/{}", p.name_any()),
            )
            .await
            {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
        }
    }
    let by_uid: BTreeMap<String, &&Pod> = pods
        .iter()
        .map(|p| (p.uid().unwrap_or_default(), p))
        .collect();
    for id in std::mem::take(&mut uncounted_ok) {
        succeeded += 1;
        if let Some(i) = by_uid.get(&id).and_then(|p| index_of(p)) {
            completed.insert(i);
        }
    }
    failed += i64::try_from(std::mem::take(&mut uncounted_failed).len()).unwrap_or(0);
    let on_failure = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure");
    let restarts: i64 = if on_failure {
        pods.iter()
            .flat_map(|p| {
                p.status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
            })
            .map(|c| i64::from(c.restart_count))
            .sum()
    } else {
        0
    };
    let active: Vec<&&Pod> = pods.iter().filter(|p| pod_is_active(p)).collect();
    let mut conditions = util::conditions_of(Some(&cur));
    let mut status = json!({});
    let finished = is_finished(job);
    let parallelism = spec.parallelism.unwrap_or(1);
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let backoff_limit = i64::from(spec.backoff_limit.unwrap_or(6));
    let start = cur.get("startTime").cloned().filter(|v| !v.is_null());
    let deadline_hit = spec
        .active_deadline_seconds
        .zip(start.as_ref())
        .is_some_and(|(s, t)| {
            serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(
                t.clone(),
            )
            .is_ok_and(|t| t.0 + jiff::SignedDuration::from_secs(s) <= now().0)
        });
    let complete = match completions {
        Some(c) if indexed => completed.len() >= usize::try_from(c).unwrap_or(0),
        Some(c) => succeeded >= i64::from(c),
        None => succeeded > 0 && active.is_empty(),
    };
    let mut want_new = 0;
    if finished.is_none() {
        if spec.suspend == Some(true) {
            util::delete_pods(&pods_api, &active).await?;
            set_condition(
                &mut conditions,
                "Suspended",
                "True",
                "JobSuspended",
                "Job suspended",
            );
        } else if complete {
            set_condition(
                &mut conditions,
                "SuccessCriteriaMet",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            );
            set_condition(
                &mut conditions,
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            );
            status["completionTime"] = serde_json::to_value(now()).unwrap_or_default();
        } else if failed + restarts > backoff_limit || deadline_hit {
            let (reason, message) = if deadline_hit {
                (
                    "DeadlineExceeded",
                    "Job was active longer than specified deadline",
                )
            } else {
                (
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                )
            };
            util::delete_pods(&pods_api, &active).await?;
            set_condition(&mut conditions, "FailureTarget", "True", reason, message);
            set_condition(&mut conditions, "Failed", "True", reason, message);
        } else {
            if conditions
                .iter()
                .any(|c| c["type"] == "Suspended" && c["status"] == "True")
            {
                set_condition(
                    &mut conditions,
                    "Suspended",
                    "False",
                    "JobResumed",
                    "Job resumed",
                );
            }
            if start.is_none() {
                status["startTime"] = serde_json::to_value(now()).unwrap_or_default();
            }
            // Back-off after failures: 10 s doubled per failure, at most six minutes.
            let last_failure = pods
                .iter()
                .filter(|p| util::pod_phase(p) == "Failed")
                .filter_map(|p| finished_at(p))
                .max();
            let waiting = failed > 0
                && last_failure.is_some_and(|t| {
                    let exp = u32::try_from((failed - 1).min(6)).unwrap_or(6);
                    let delay = (10i64 << exp).min(360);
                    t + jiff::SignedDuration::from_secs(delay) > now().0
                });
            let active_n = i32::try_from(active.len()).unwrap_or(i32::MAX);
            if !waiting {
                if indexed {
                    let total = completions.unwrap_or(1);
                    let running: BTreeSet<i32> =
                        active.iter().filter_map(|p| index_of(p)).collect();
                    let missing: Vec<i32> = (0..total)
                        .filter(|i| !completed.contains(i) && !running.contains(i))
                        .collect();
                    let room = usize::try_from(parallelism - active_n).unwrap_or(0);
                    for i in missing.into_iter().take(room) {
                        create_pod(client, job, Some(i)).await?;
                    }
                } else {
                    want_new = match completions {
                        Some(c) => {
                            (parallelism.min(c - i32::try_from(succeeded).unwrap_or(i32::MAX)))
                                - active_n
                        }
                        None if succeeded > 0 => 0,
                        None => parallelism - active_n,
                    };
                }
            }
        }
    }
    for _ in 0..want_new.max(0) {
        create_pod(client, job, None).await?;
    }
    if finished.is_some()
        && let Some(ttl) = spec.ttl_seconds_after_finished
    {
        let done_at = cur
            .pointer("/completionTime")
            .or_else(|| {
                conditions
                    .iter()
                    .find(|c| c["type"] == "Failed")
                    .and_then(|c| c.get("lastTransitionTime"))
            })
            .and_then(|t| {
                serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(
                    t.clone(),
                )
                .ok()
            });
        if done_at.is_some_and(|t| t.0 + jiff::SignedDuration::from_secs(i64::from(ttl)) <= now().0)
        {
            return util::delete(&api, &name, &what).await;
        }
    }
    status["active"] = json!(if finished.is_some() { 0 } else { active.len() });
    status["ready"] = json!(active.iter().filter(|p| pod_is_ready(p)).count());
    status["succeeded"] = json!(succeeded);
    status["failed"] = json!(failed);
    status["terminating"] = json!(0);
    status["uncountedTerminatedPods"] = json!({});
    status["conditions"] = json!(conditions);
    if indexed {
        status["completedIndexes"] = json!(format_indexes(&completed));
    }
    let differs = status.as_object().is_some_and(|m| {
        m.iter().any(|(k, v)| match cur.get(k) {
            Some(c) => c != v,
            None => !(v == &json!(0) || v == &json!({}) || v == &json!([]) || v == &json!("")),
        })
    });
    if differs {
        // A merge patch of `{}` would keep the old lists; null removes them.
        status["uncountedTerminatedPods"] = json!({"succeeded": null, "failed": null});
        util::patch_status(&api, &name, status, &what).await?;
    }
    Ok(())
}

fn str_set(v: &Value, ptr: &str) -> BTreeSet<String> {
    v.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn create_pod(client: &Client, job: &Job, index: Option<i32>) -> Result<()> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let Some(spec) = job.spec.as_ref() else {
        return Ok(());
    };
    let prefix = match index {
        // `podGenerateNameWithIndex`: the job part is cut so the prefix stays ≤ 58 chars.
        Some(i) => {
            let suffix = format!("-{i}-");
            let keep = 58usize.saturating_sub(suffix.len()).min(name.len());
            format!("{}{suffix}", &name[..keep])
        }
        None => generate_prefix(&name),
    };
    let mut pod = pod_from_template(&spec.template, &ns, controller_ref(job), Some(prefix), None);
    pod.metadata
        .finalizers
        .get_or_insert_with(Vec::new)
        .push(TRACKING_FINALIZER.into());
    if let Some(i) = index {
        pod.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(INDEX_ANNOTATION.into(), i.to_string());
        pod.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(INDEX_ANNOTATION.into(), i.to_string());
        if let Some(ps) = pod.spec.as_mut() {
            ps.hostname = Some(format!("{name}-{i}"));
            for c in ps
                .containers
                .iter_mut()
                .chain(ps.init_containers.iter_mut().flatten())
            {
                c.env.get_or_insert_with(Vec::new).push(EnvVar {
                    name: "JOB_COMPLETION_INDEX".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            api_version: None,
                            field_path: format!("metadata.annotations['{INDEX_ANNOTATION}']"),
                        }),
                        ..Default::default()
                    }),
                });
            }
        }
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    util::create(&pods_api, &pod, &format!("a pod of Job {ns}/{name}")).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_round_trip_as_ranges() {
        let s: BTreeSet<i32> = [1, 3, 4, 5, 7].into_iter().collect();
        assert_eq!(format_indexes(&s), "1,3-5,7");
        assert_eq!(parse_indexes("1,3-5,7"), s);
    }
}
