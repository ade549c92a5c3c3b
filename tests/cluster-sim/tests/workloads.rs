//! The workload controllers as a user sees them through kubectl: rollouts, pod names,
//! labels and owner chains as Kubernetes makes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use common::{Sim, pod_names};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx:1.27}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_replaces_pods_on_template_change_and_cleans_up() -> Result<()> {
    let sim = Sim::start(2).await?;
    sim.apply(DEPLOYMENT).await?;
    let out = sim
        .kubectl(&["rollout", "status", "deploy/web", "--timeout=120s"])
        .await?;
    assert!(
        out.contains("deployment \"web\" successfully rolled out"),
        "{out}"
    );
    let pods = sim.json(&["get", "pods", "-l", "app=web"]).await?;
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 3);
    let rs = sim.json(&["get", "rs", "-l", "app=web"]).await?;
    let rs_items = rs["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(rs_items.len(), 1);
    let rs_name = rs_items[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let hash = rs_items[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(rs_name, format!("web-{hash}"));
    assert!(hash.chars().all(|c| "456789bcdf".contains(c)), "{hash}");
    assert_eq!(
        rs_items[0]["metadata"]["ownerReferences"][0]["kind"],
        "Deployment"
    );
    assert_eq!(
        rs_items[0]["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(
        rs_items[0]["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let mut nodes = std::collections::BTreeSet::new();
    let mut uids = std::collections::BTreeSet::new();
    for p in &items {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            name.starts_with(&format!("{rs_name}-")) && name.len() == rs_name.len() + 6,
            "{name}"
        );
        assert_eq!(p["metadata"]["labels"]["pod-template-hash"], hash.as_str());
        assert_eq!(
            p["metadata"]["ownerReferences"][0]["name"],
            rs_name.as_str()
        );
        assert_eq!(p["status"]["phase"], "Running");
        assert!(p["status"]["podIP"].as_str().is_some());
        nodes.insert(
            p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        uids.insert(p["metadata"]["uid"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        nodes.len(),
        2,
        "three replicas spread over both nodes: {nodes:?}"
    );
    let wide = sim.kubectl(&["get", "pods", "-o", "wide"]).await?;
    assert!(
        wide.contains("node-1") && wide.contains("node-2") && wide.contains("Running"),
        "{wide}"
    );

    // A template change (what `kubectl rollout restart` does) replaces every pod.
    sim.kubectl(&["rollout", "restart", "deploy/web"]).await?;
    let out = sim
        .kubectl(&["rollout", "status", "deploy/web", "--timeout=120s"])
        .await?;
    assert!(out.contains("successfully rolled out"), "{out}");
    let after = sim
        .until("the old pods to go", || async {
            let v = sim.json(&["get", "pods", "-l", "app=web"]).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 3).then_some(items))
        })
        .await?;
    for p in &after {
        assert!(
            !uids.contains(p["metadata"]["uid"].as_str().unwrap_or_default()),
            "a pod survived the restart"
        );
    }
    let rs = sim.json(&["get", "rs", "-l", "app=web"]).await?;
    let revisions: Vec<(String, i64)> = rs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                r["spec"]["replicas"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert!(
        revisions.contains(&("1".into(), 0)) && revisions.contains(&("2".into(), 3)),
        "{revisions:?}"
    );

    // Deleting the Deployment removes its ReplicaSets and pods (garbage collection).
    sim.kubectl(&["delete", "deploy/web"]).await?;
    sim.until("the pods to be collected", || async {
        Ok(pod_names(&sim, "default", "app=web")
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    sim.stop().await;
    Ok(())
}

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default}
spec:
  replicas: 2
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
        - name: db
          image: postgres:17
          volumeMounts: [{name: data, mountPath: /var/lib/postgresql}]
  volumeClaimTemplates:
    - metadata: {name: data}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {requests: {storage: 1Gi}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_pods_have_stable_names_and_their_own_bound_claims() -> Result<()> {
    let sim = Sim::start(2).await?;
    sim.apply(STATEFULSET).await?;
    let out = sim
        .kubectl(&["rollout", "status", "sts/db", "--timeout=120s"])
        .await?;
    assert!(
        out.contains("partitioned roll out complete") || out.contains("roll out complete"),
        "{out}"
    );
    // A new set has one revision, and its pods were never replaced: the status write that
    // follows the first pass must not change the template's hash.
    let revs = sim.json(&["get", "controllerrevisions"]).await?;
    let names: Vec<&str> = revs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "revisions of a set never updated: {names:?}"
    );
    let set = sim.json(&["get", "sts", "db"]).await?;
    assert_eq!(set["status"]["updateRevision"], names[0]);
    assert_eq!(set["status"]["currentRevision"], names[0]);
    for ord in 0..2 {
        let pod = sim.json(&["get", "pod", &format!("db-{ord}")]).await?;
        let labels = &pod["metadata"]["labels"];
        assert_eq!(
            labels["statefulset.kubernetes.io/pod-name"],
            format!("db-{ord}")
        );
        assert_eq!(labels["apps.kubernetes.io/pod-index"], ord.to_string());
        let rev = labels["controller-revision-hash"]
            .as_str()
            .unwrap_or_default();
        assert!(rev.starts_with("db-"), "{rev}");
        assert_eq!(pod["spec"]["hostname"], format!("db-{ord}"));
        assert_eq!(pod["spec"]["subdomain"], "db");
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "StatefulSet");
        let claim = format!("data-db-{ord}");
        let vols = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            vols.iter().any(|v| v["name"] == "data"
                && v["persistentVolumeClaim"]["claimName"] == claim.as_str()),
            "{vols:?}"
        );
        let pvc = sim.json(&["get", "pvc", &claim]).await?;
        assert_eq!(pvc["status"]["phase"], "Bound");
        assert_eq!(pvc["metadata"]["labels"]["app"], "db");
        let pv = pvc["spec"]["volumeName"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            pv,
            format!(
                "pvc-{}",
                pvc["metadata"]["uid"].as_str().unwrap_or_default()
            )
        );
        // The kubelet of the pod's node mounted the volume where the real one does.
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        let info = sim
            .cluster()
            .nodes()
            .into_iter()
            .find(|n| n.name == node)
            .expect("the pod's node");
        let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
        let mount = info
            .kubelet_root
            .join(format!("pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount"));
        assert!(mount.is_dir(), "{}", mount.display());
        let vol_data: serde_json::Value =
            serde_json::from_slice(&std::fs::read(mount.with_file_name("vol_data.json"))?)?;
        assert_eq!(vol_data["specVolID"], pv.as_str());
        assert_eq!(vol_data["nodeName"], node);
    }
    // Scaling down removes the highest ordinal; its claim stays (Retain is the default).
    sim.kubectl(&["scale", "sts/db", "--replicas=1"]).await?;
    sim.until("db-1 to go", || async {
        Ok(pod_names(&sim, "default", "app=db")
            .await?
            .len()
            .eq(&1)
            .then_some(()))
    })
    .await?;
    assert_eq!(
        pod_names(&sim, "default", "app=db").await?,
        vec!["db-0".to_owned()]
    );
    sim.kubectl(&["get", "pvc", "data-db-1"]).await?;
    sim.stop().await;
    Ok(())
}

const DAEMONSET: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: kube-system}
spec:
  # kube-sim does not default updateStrategy yet (the API server sets RollingUpdate).
  updateStrategy: {type: RollingUpdate}
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: registry.k8s.io/pause:3.10}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_one_pod_per_node() -> Result<()> {
    let sim = Sim::start(3).await?;
    sim.apply(DAEMONSET).await?;
    let out = sim
        .kubectl(&[
            "rollout",
            "status",
            "ds/agent",
            "-n",
            "kube-system",
            "--timeout=120s",
        ])
        .await?;
    assert!(
        out.contains("daemon set \"agent\" successfully rolled out"),
        "{out}"
    );
    let pods = sim
        .json(&["get", "pods", "-n", "kube-system", "-l", "app=agent"])
        .await?;
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    let mut nodes: Vec<String> = items
        .iter()
        .map(|p| {
            p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"]);
    for p in &items {
        assert!(
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("agent-")
        );
        assert_eq!(p["metadata"]["labels"]["pod-template-generation"], "1");
        assert!(
            p["metadata"]["labels"]["controller-revision-hash"]
                .as_str()
                .is_some()
        );
        let term = &p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0];
        assert_eq!(term["matchFields"][0]["key"], "metadata.name");
        assert_eq!(term["matchFields"][0]["values"][0], p["spec"]["nodeName"]);
        let tolerations = p["spec"]["tolerations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            tolerations
                .iter()
                .any(|t| t["key"] == "node.kubernetes.io/not-ready" && t["effect"] == "NoExecute")
        );
    }
    let ds = sim
        .json(&["get", "ds", "agent", "-n", "kube-system"])
        .await?;
    assert_eq!(ds["status"]["desiredNumberScheduled"], 3);
    assert_eq!(ds["status"]["numberReady"], 3);
    sim.stop().await;
    Ok(())
}

const JOBS: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: ok, namespace: default}
spec:
  completions: 2
  template:
    spec:
      restartPolicy: Never
      containers: [{name: main, image: busybox:1.37, command: [sh, -c, "exit 0"]}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: bad, namespace: default}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: main, image: busybox:1.37, command: [sh, -c, "exit 3"]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_complete_or_fail_by_their_pods_exit_codes() -> Result<()> {
    let images = cluster_sim::Images {
        host_commands: vec!["busybox".into()],
        ..Default::default()
    };
    let sim = Sim::start_with(1, images).await?;
    sim.apply(JOBS).await?;
    sim.kubectl(&[
        "wait",
        "--for=condition=complete",
        "job/ok",
        "--timeout=120s",
    ])
    .await?;
    sim.kubectl(&[
        "wait",
        "--for=condition=failed",
        "job/bad",
        "--timeout=120s",
    ])
    .await?;
    let ok = sim.json(&["get", "job", "ok"]).await?;
    assert_eq!(ok["status"]["succeeded"], 2);
    assert!(ok["status"]["completionTime"].as_str().is_some());
    let bad = sim.json(&["get", "job", "bad"]).await?;
    assert_eq!(bad["status"]["failed"], 1);
    let failed = bad["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        failed
            .iter()
            .any(|c| c["type"] == "Failed" && c["reason"] == "BackoffLimitExceeded"),
        "{failed:?}"
    );
    let pods = sim.json(&["get", "pods"]).await?;
    for p in pods["items"].as_array().into_iter().flatten() {
        let owner = p["metadata"]["ownerReferences"][0]["name"]
            .as_str()
            .unwrap_or_default();
        let exit = &p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"];
        match owner {
            "ok" => {
                assert_eq!(p["status"]["phase"], "Succeeded");
                assert_eq!(*exit, 0);
            }
            "bad" => {
                assert_eq!(p["status"]["phase"], "Failed");
                assert_eq!(*exit, 3);
            }
            other => panic!("unexpected pod owner {other}"),
        }
        // Counted: the job-tracking finalizer is gone again.
        assert!(
            p["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty()),
            "{p}"
        );
    }
    sim.stop().await;
    Ok(())
}

const CRONJOB: &str = r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick, namespace: default}
spec:
  schedule: "* * * * *"
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 1
  jobTemplate:
    metadata: {labels: {team: a}}
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{name: main, image: busybox:1.37, command: [sh, -c, "exit 0"]}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjob_starts_jobs_on_schedule_and_by_hand() -> Result<()> {
    let images = cluster_sim::Images {
        host_commands: vec!["busybox".into()],
        ..Default::default()
    };
    let sim = Sim::start_with(1, images).await?;
    sim.apply(CRONJOB).await?;
    // By hand: kubectl builds the Job from the CronJob.
    job_from_cronjob(&sim, "manual", "tick").await?;
    let manual = sim.json(&["get", "job", "manual"]).await?;
    assert_eq!(
        manual["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"],
        "manual"
    );
    // On schedule: the next minute's Job, named after the scheduled minute.
    let job = sim
        .until("a scheduled Job", || async {
            let v = sim.json(&["get", "jobs", "-l", "team=a"]).await?;
            Ok(v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| j["metadata"]["name"] != "manual")
                .cloned())
        })
        .await?;
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let minutes: i64 = name
        .strip_prefix("tick-")
        .and_then(|m| m.parse().ok())
        .expect("tick-<minutes>");
    let stamp = job["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"]
        .as_str()
        .unwrap_or_default();
    let ts: jiff::Timestamp = stamp.parse()?;
    assert_eq!(ts.as_second(), minutes * 60);
    assert_eq!(job["metadata"]["ownerReferences"][0]["kind"], "CronJob");
    job_complete(&sim, name).await?;
    let cj = sim
        .until("lastSuccessfulTime", || async {
            let v = sim.json(&["get", "cronjob", "tick"]).await?;
            Ok(v["status"]["lastSuccessfulTime"]
                .as_str()
                .is_some()
                .then_some(v))
        })
        .await?;
    assert_eq!(cj["status"]["lastScheduleTime"], stamp);
    sim.stop().await;
    Ok(())
}

/// `kubectl create job <name> --from=cronjob/<cronjob>`, until the Job completes. kube-sim
/// refuses kubectl's protobuf body for Jobs (415) for now, so the object kubectl builds is sent
/// as JSON.
async fn job_from_cronjob(sim: &Sim, name: &str, cronjob: &str) -> Result<()> {
    let from = format!("--from=cronjob/{cronjob}");
    let job = sim
        .kubectl(&[
            "create",
            "job",
            name,
            &from,
            "--dry-run=client",
            "-o",
            "json",
        ])
        .await?;
    sim.kubectl_stdin(&["create", "-f", "-"], Some(&job))
        .await?;
    job_complete(sim, name).await?;
    Ok(())
}

async fn job_complete(sim: &Sim, name: &str) -> Result<()> {
    sim.kubectl(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{name}"),
        "--timeout=120s",
    ])
    .await?;
    Ok(())
}

async fn job_names(sim: &Sim) -> Result<Vec<String>> {
    let v = sim.json(&["get", "jobs", "-l", "team=a"]).await?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["metadata"]["name"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_cronjob_misses_its_runs_and_keeps_its_history_limit() -> Result<()> {
    let images = cluster_sim::Images {
        host_commands: vec!["busybox".into()],
        ..Default::default()
    };
    let sim = Sim::start_with(1, images).await?;
    sim.apply(&CRONJOB.replace("concurrencyPolicy: Forbid", "suspend: true"))
        .await?;
    let created: jiff::Timestamp =
        sim.json(&["get", "cronjob", "tick"]).await?["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .parse()?;
    job_from_cronjob(&sim, "first", "tick").await?;
    // The first scheduled time after creation passes while the CronJob is suspended.
    let missed = (created.as_second() / 60 + 1) * 60;
    sim.until("a scheduled time to pass", || async {
        Ok((jiff::Timestamp::now().as_second() > missed).then_some(()))
    })
    .await?;
    // A second finished Job makes the controller drop the first (successfulJobsHistoryLimit:
    // 1), so it has looked at the CronJob since the scheduled time, and started nothing.
    job_from_cronjob(&sim, "second", "tick").await?;
    sim.until("the history limit to drop the first Job", || async {
        let names = job_names(&sim).await?;
        Ok((!names.contains(&"first".to_owned())).then_some(names))
    })
    .await?;
    assert_eq!(job_names(&sim).await?, ["second"]);
    let cj = sim.json(&["get", "cronjob", "tick"]).await?;
    assert!(cj["status"]["lastScheduleTime"].is_null(), "{cj}");
    // Resumed without a starting deadline, the missed run starts at once [docs "CronJob"].
    sim.kubectl(&[
        "patch",
        "cronjob",
        "tick",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ])
    .await?;
    let scheduled = sim
        .until("the missed run", || async {
            let names = job_names(&sim).await?;
            Ok(names.into_iter().find(|n| n.starts_with("tick-")))
        })
        .await?;
    let minutes: i64 = scheduled["tick-".len()..].parse()?;
    assert!(
        minutes * 60 >= missed,
        "{scheduled} is before the missed time"
    );
    sim.stop().await;
    Ok(())
}
