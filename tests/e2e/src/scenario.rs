//! One scenario's world: its own namespace in the shared cluster and the steps a user
//! types there with kubectl, plus the reads that check what Stash did.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::env::Env;
use crate::expect;
use crate::manifests::{self, BackupConfig, Workload};
use crate::restic::{HostRepo, Snapshot};
use stash_test_support::until;

/// A pod rollout or a backup on a loaded two-core machine; only a guard against a hang.
pub const WAIT: Duration = Duration::from_secs(240);

#[derive(Debug)]
pub struct Scenario<'a> {
    pub env: &'a Env,
    pub name: &'static str,
    pub ns: String,
}

/// How a workload's pods looked, for "the backup did not touch it".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodsSnapshot {
    /// uid → (pod-template-hash or controller-revision-hash, restarts of every container)
    pub pods: BTreeMap<String, (String, Vec<i64>)>,
    pub generation: i64,
}

impl<'a> Scenario<'a> {
    pub fn new(env: &'a Env, name: &'static str) -> Self {
        // A DNS label: the scenario's name and the run's id.
        let ns = format!("e2e-{}-{}", name.replace('_', "-"), env.run_id);
        Self { env, name, ns }
    }

    /// `kubectl <args> -n <ns>`.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut a = args.to_vec();
        a.extend(["-n", &self.ns]);
        self.env.kube.kubectl(&a).await
    }

    /// `kubectl get <args> -n <ns> -o json`.
    pub async fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-n", &self.ns]);
        self.env.kube.json(&a).await
    }

    pub async fn apply(&self, yaml: &str) -> Result<String> {
        self.env.kube.apply(yaml).await
    }

    pub async fn setup(&self) -> Result<()> {
        self.env
            .kube
            .kubectl(&["create", "namespace", &self.ns])
            .await?;
        Ok(())
    }

    /// The bucket prefix of one of this scenario's repositories.
    pub fn prefix(&self, repo: &str) -> String {
        format!("e2e/{}/{}/{repo}", self.env.run_id, self.name)
    }

    /// `kubectl apply` of a Secret and an S3 Repository using it; returns the repository as
    /// this host's restic opens it with `password`.
    pub async fn s3_repository(
        &self,
        repo: &str,
        secret: &str,
        password: &str,
    ) -> Result<HostRepo> {
        let s3 = &self.env.s3;
        let prefix = self.prefix(repo);
        self.apply(&format!(
            "{}---\n{}",
            manifests::s3_secret(secret, &self.ns, s3, password),
            manifests::s3_repository(repo, &self.ns, secret, s3, &prefix)
        ))
        .await?;
        Ok(HostRepo::new(s3, &prefix, password))
    }

    /// Only the Repository, naming a Secret that may not exist.
    pub async fn s3_repository_only(&self, repo: &str, secret: &str) -> Result<()> {
        let s3 = &self.env.s3;
        self.apply(&manifests::s3_repository(
            repo,
            &self.ns,
            secret,
            s3,
            &self.prefix(repo),
        ))
        .await?;
        Ok(())
    }

    /// The seed ConfigMaps (`kubectl create configmap --from-file`), the workload, and its
    /// rollout; returns the Running pods.
    pub async fn deploy(&self, w: &Workload) -> Result<Vec<Value>> {
        for v in &w.volumes {
            let dir = tempfile::tempdir()?;
            for (i, bytes) in v.files.values().enumerate() {
                std::fs::write(dir.path().join(format!("f{i}")), bytes)?;
            }
            let from = format!("--from-file={}", dir.path().display());
            self.kubectl(&["create", "configmap", &w.seed_configmap(v), &from])
                .await?;
        }
        self.apply(&w.manifest(&self.ns)).await?;
        let timeout = format!("--timeout={}s", WAIT.as_secs());
        let target = format!("{}/{}", w.kind.resource(), w.name);
        self.kubectl(&["rollout", "status", &target, &timeout])
            .await
            .with_context(|| format!("{target} did not roll out"))?;
        let want = match w.kind {
            manifests::Kind::Deployment => 1,
            manifests::Kind::StatefulSet { replicas } => replicas,
            manifests::Kind::DaemonSet => self.env.node_count().await?,
        };
        until(&format!("{want} Ready pods of {target}"), WAIT, || async {
            let pods = self.pods(w).await?;
            let ready = pods.iter().filter(|p| is_ready(p)).count();
            Ok((pods.len() == want && ready == want).then_some(pods))
        })
        .await
    }

    /// The workload's pods, not being deleted.
    pub async fn pods(&self, w: &Workload) -> Result<Vec<Value>> {
        let sel = format!("app={}", w.name);
        let v = self.json(&["get", "pods", "-l", &sel]).await?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .cloned()
            .collect())
    }

    /// Pod UIDs, template hashes, restart counts and the workload's generation.
    pub async fn pods_snapshot(&self, w: &Workload) -> Result<PodsSnapshot> {
        let mut pods = BTreeMap::new();
        for p in self.pods(w).await? {
            let labels = &p["metadata"]["labels"];
            let hash = labels["pod-template-hash"]
                .as_str()
                .or(labels["controller-revision-hash"].as_str())
                .unwrap_or_default()
                .to_owned();
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c["restartCount"].as_i64().unwrap_or(-1))
                .collect();
            pods.insert(
                p["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                (hash, restarts),
            );
        }
        let obj = self.json(&["get", w.kind.resource(), &w.name]).await?;
        Ok(PodsSnapshot {
            pods,
            generation: obj["metadata"]["generation"].as_i64().unwrap_or(-1),
        })
    }

    /// `kubectl apply` of the BackupConfiguration, then its phase `Ready`.
    pub async fn backup_config(&self, bc: &BackupConfig, w: &Workload) -> Result<()> {
        self.apply(&bc.manifest(&self.ns, w)).await?;
        self.wait_bc_phase(&bc.name, expect::BC_READY)
            .await
            .map(drop)
    }

    pub async fn wait_bc_phase(&self, bc: &str, phase: &str) -> Result<Value> {
        until(
            &format!("BackupConfiguration {bc} phase {phase}"),
            WAIT,
            || async {
                let v = self.json(&["get", "backupconfiguration", bc]).await?;
                Ok((v["status"]["phase"] == phase).then_some(v))
            },
        )
        .await
        .with_context(|| format!("BackupConfiguration {bc} never reached {phase}"))
    }

    /// `kubectl create` of an instant BackupSession named `<bc>-<unix seconds>`.
    pub async fn create_session(&self, bc: &str, w: &Workload) -> Result<String> {
        loop {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let name = format!("{bc}-{secs}");
            match self
                .env
                .kube
                .create(&manifests::backup_session(&name, &self.ns, bc, w))
                .await
            {
                Ok(_) => return Ok(name),
                // Two sessions in one second: the next second's name.
                Err(e) if e.to_string().contains("AlreadyExists") => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The session once its phase is final.
    pub async fn wait_session_final(&self, name: &str) -> Result<Value> {
        until(&format!("BackupSession {name} to finish"), WAIT, || async {
            let v = self.json(&["get", "backupsession", name]).await?;
            let phase = v["status"]["phase"].as_str().unwrap_or_default();
            Ok(expect::FINAL_SESSION_PHASES.contains(&phase).then_some(v))
        })
        .await
    }

    /// The session Succeeded, or an error with its status.
    pub async fn wait_session_succeeded(&self, name: &str) -> Result<Value> {
        let s = self.wait_session_final(name).await?;
        if s["status"]["phase"] != "Succeeded" {
            bail!(
                "BackupSession {name} ended {}: {}",
                s["status"]["phase"],
                serde_json::to_string_pretty(&s["status"]).unwrap_or_default()
            );
        }
        Ok(s)
    }

    /// The per-host stats of the session's first target, by hostname.
    pub fn host_stats(session: &Value) -> BTreeMap<String, Value> {
        session["status"]["targets"][0]["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h["hostname"].as_str().unwrap_or_default().to_owned(),
                    h.clone(),
                )
            })
            .collect()
    }

    /// The restic short ids a host's stats name.
    pub fn snapshot_names(host: &Value) -> BTreeSet<String> {
        host["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// The BackupAssignments planned for a session.
    pub async fn assignments(&self, session: &str) -> Result<Vec<Value>> {
        let sel = format!("{}={session}", expect::ASSIGNMENT_SESSION_LABEL);
        let v = self.json(&["get", "backupassignments", "-l", &sel]).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    /// Checks that each volume of the workload has, among the session's snapshots of
    /// `host`, one whose files are exactly what the workload wrote.
    pub async fn verify_host_snapshots(
        &self,
        repo: &HostRepo,
        session: &Value,
        host: &str,
        w: &Workload,
        who: Option<&str>,
    ) -> Result<()> {
        let stats = Self::host_stats(session);
        let h = stats
            .get(host)
            .with_context(|| format!("the session has no stats for {host}: {stats:?}"))?;
        if h["phase"] != "Succeeded" {
            bail!("host {host} did not succeed: {h}");
        }
        let names = Self::snapshot_names(h);
        if names.len() != w.volumes.len() {
            bail!(
                "host {host} names {} snapshots for {} volumes: {h}",
                names.len(),
                w.volumes.len()
            );
        }
        let snaps: Vec<Snapshot> = repo
            .snapshots()
            .await?
            .into_iter()
            .filter(|s| names.contains(&s.short_id) || names.contains(&s.id))
            .collect();
        if snaps.len() != names.len() {
            bail!("restic lists {} of the snapshots {names:?}", snaps.len());
        }
        for s in &snaps {
            if s.hostname != host {
                bail!(
                    "snapshot {} has --host {}, not {host}",
                    s.short_id,
                    s.hostname
                );
            }
        }
        let skip: &[&str] = if w.tick { &[manifests::TICK_FILE] } else { &[] };
        let mut trees = Vec::new();
        for s in &snaps {
            trees.push((s.short_id.clone(), repo.files(s).await?));
        }
        for (i, v) in w.volumes.iter().enumerate() {
            let expected = w.expected(v, who);
            let vskip = if i == 0 { skip } else { &[] };
            let found = trees
                .iter()
                .any(|(_, t)| crate::restic::tree_diff(t, &expected, vskip).is_empty());
            if !found {
                let diffs: Vec<String> = trees
                    .iter()
                    .map(|(id, t)| {
                        format!(
                            "{id}: {}",
                            crate::restic::tree_diff(t, &expected, vskip).join(", ")
                        )
                    })
                    .collect();
                bail!(
                    "no snapshot of {host} holds volume {} as written: {}",
                    v.name,
                    diffs.join("; ")
                );
            }
        }
        Ok(())
    }

    /// `kubectl exec <pod> -- sh -c <script>`, the user's way into a running container. The
    /// simulated cluster serves no `pods/exec`, so there the same shell enters the
    /// container's mount namespace and root with nsenter, as a container runtime's exec does.
    pub async fn exec(&self, pod: &str, script: &str) -> Result<String> {
        if !self.env.is_simulated() {
            return self.kubectl(&["exec", pod, "--", "sh", "-c", script]).await;
        }
        let pid = container_pid(&self.ns, pod)?;
        let out = tokio::process::Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-r", "-w", "sh", "-c", script])
            .output()
            .await
            .context("run nsenter")?;
        if !out.status.success() {
            bail!(
                "exec in {pod}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// What a running container sees under `dir`: every regular file's SHA-256, by path
    /// relative to `dir`, read inside the container.
    pub async fn digests(
        &self,
        pod: &str,
        dir: &str,
        skip: &[&str],
    ) -> Result<BTreeMap<String, String>> {
        let out = self
            .exec(
                pod,
                &format!("cd '{dir}' && find . -type f | sort | while read -r f; do sha256sum \"$f\"; done"),
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, p)| (p.trim_start_matches("./").to_owned(), h.to_owned()))
            .filter(|(p, _)| !skip.contains(&p.as_str()))
            .collect())
    }

    /// `kubectl apply` of a RestoreSession, then its phase once final.
    pub async fn restore(&self, yaml: &str, name: &str) -> Result<Value> {
        self.apply(yaml).await?;
        self.wait_restore_final(name).await
    }

    /// The RestoreSession once its phase is final.
    pub async fn wait_restore_final(&self, name: &str) -> Result<Value> {
        until(
            &format!("RestoreSession {name} to finish"),
            WAIT,
            || async {
                let v = self.json(&["get", "restoresession", name]).await?;
                let phase = v["status"]["phase"].as_str().unwrap_or_default();
                Ok(expect::FINAL_RESTORE_PHASES.contains(&phase).then_some(v))
            },
        )
        .await
    }

    /// The restart counts of the chart's pods (operator and agents), by pod name.
    pub async fn stash_restarts(&self) -> Result<BTreeMap<String, i64>> {
        let v = self
            .env
            .kube
            .json(&["get", "pods", "-n", &self.env.stash_namespace])
            .await?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let restarts = p["status"]["containerStatuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                    .sum();
                (
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    restarts,
                )
            })
            .collect())
    }

    /// What a person would look at when the scenario fails: the Stash objects and pods of
    /// the namespace, and the tails of the operator's and agents' logs.
    pub async fn diagnostics(&self) -> String {
        let mut out = String::new();
        let kinds = "backupconfigurations,backupsessions,backupassignments,restoresessions,\
                     restoreassignments,repositories,cronjobs,jobs,pods";
        match self.kubectl(&["get", kinds, "-o", "wide"]).await {
            Ok(s) => out.push_str(&s),
            Err(e) => out.push_str(&format!("{e}\n")),
        }
        for kind in [
            "backupconfigurations",
            "backupsessions",
            "restoresessions",
            "restoreassignments",
            "repositories",
        ] {
            if let Ok(v) = self.json(&["get", kind]).await {
                for item in v["items"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "{kind}/{} status: {}\n",
                        item["metadata"]["name"].as_str().unwrap_or_default(),
                        item["status"]
                    ));
                }
            }
        }
        out.push_str(&self.env.logs(&self.ns, 20).await);
        out.push_str(&self.env.logs(&self.env.stash_namespace, 40).await);
        out
    }
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The process of a container of pod `ns/pod` in the simulated cluster: the first process
/// whose environment names the pod (the e2e workloads carry `POD_NAME` and `POD_NAMESPACE`
/// from the downward API), whose parent does not.
fn container_pid(ns: &str, pod: &str) -> Result<u32> {
    let wanted = [
        format!("POD_NAME={pod}").into_bytes(),
        format!("POD_NAMESPACE={ns}").into_bytes(),
    ];
    let of_pod = |pid: u32| -> bool {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
            let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
            wanted.iter().all(|w| vars.contains(&w.as_slice()))
        })
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| of_pod(*pid))
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .find(|pid| parent(*pid).is_none_or(|pp| !of_pod(pp)))
        .with_context(|| format!("no process of pod {ns}/{pod} on this machine"))
}
