//! The Snapshot API as a user types it: `kubectl get snapshots` in its forms, a watch that
//! shows the next backup, `kubectl delete snapshot` (gone from the repository too), and
//! RBAC as the aggregated server enforces it.

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use stash_e2e::scenario::WAIT;
use stash_e2e::{BackupConfig, Kind, Scenario, Source, Volume, Workload, expect};
use stash_test_support::until;
use std::collections::BTreeSet;
use std::process::Stdio;
use tokio::io::AsyncReadExt;

use super::PASSWORD;

/// The names `kubectl get snapshots` prints for the repository, as a set.
async fn listed(s: &Scenario<'_>, args: &[&str]) -> Result<BTreeSet<String>> {
    let mut a = vec!["get", "snapshots"];
    a.extend_from_slice(args);
    let v = s.env.kube.json(&a).await?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
        .collect())
}

/// Stash's name of each snapshot stock restic lists.
async fn restic_names(repo: &stash_e2e::restic::HostRepo, name: &str) -> Result<BTreeSet<String>> {
    Ok(repo
        .snapshots()
        .await?
        .iter()
        .map(|s| format!("{name}-{}", &s.id[..8]))
        .collect())
}

pub async fn snapshot_api(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "app",
        vec![Volume::new("data", Source::Pvc, "/data").with_file("a.txt", "alpha\n")],
    );
    let bc = BackupConfig::new("app-backup", "s3-repo");
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;
    let first = restic_names(&repo, &bc.repository).await?;
    ensure!(first.len() == 1, "restic lists {first:?}");
    let ns = s.ns.as_str();
    // The index is refreshed when the session ends: wait for it, never for a fixed time.
    until(
        "the snapshot listed by kubectl get snapshots",
        WAIT,
        || async {
            Ok(listed(s, &["-n", ns])
                .await
                .is_ok_and(|l| l == first)
                .then_some(()))
        },
    )
    .await?;
    let name = first.iter().next().context("no snapshot")?.clone();

    // Every form of the list a Stash user types.
    let all = listed(s, &["-A"]).await?;
    ensure!(all.is_superset(&first), "-A lists {all:?}");
    let by_repo = format!("repository={}", bc.repository);
    ensure!(listed(s, &["-n", ns, "-l", &by_repo]).await? == first);
    ensure!(
        listed(s, &["-n", ns, "-l", "repository=another"])
            .await?
            .is_empty()
    );
    let host = format!("hostname={}", expect::DEPLOYMENT_HOST);
    ensure!(listed(s, &["-n", ns, "-l", &host]).await? == first);
    ensure!(
        listed(s, &["-n", ns, "-l", "hostname=host-1"])
            .await?
            .is_empty()
    );
    let one: Value = s.json(&["get", "snapshot", &name]).await?;
    ensure!(
        one["kind"] == "Snapshot"
            && one["status"]["repository"] == bc.repository.as_str()
            && one["status"]["hostname"] == expect::DEPLOYMENT_HOST
            && one["metadata"]["namespace"] == ns,
        "kubectl get snapshot {name}: {one}"
    );
    let yaml = s.kubectl(&["get", "snapshot", &name, "-o", "yaml"]).await?;
    ensure!(yaml.contains(&name[name.len() - 8..]), "{yaml}");
    let table = s.kubectl(&["get", "snapshots"]).await?;
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "ID", "REPOSITORY", "HOSTNAME", "CREATED AT"] {
        ensure!(header.contains(column), "no {column} column: {table}");
    }
    ensure!(table.contains(&name), "{table}");
    let wide = s.kubectl(&["get", "snapshots", "-o", "wide"]).await?;
    ensure!(
        wide.lines().next().unwrap_or_default().contains("PATHS"),
        "{wide}"
    );

    // A watch shows the next backup's snapshot.
    let mut watch = tokio::process::Command::new(stash_test_support::tool("kubectl")?);
    watch
        .args(["get", "snapshots", "-n", ns, "-w", "-o", "name"])
        .env("KUBECONFIG", &s.env.kube.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut watch = watch.spawn().context("start kubectl get snapshots -w")?;
    let mut out = watch.stdout.take().context("the watch's stdout")?;
    let seen = std::sync::Arc::new(tokio::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .await
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // The watch lists what exists first: the new name is told apart from it below.
    until("the watch's first listing", WAIT, || async {
        Ok(seen.lock().await.contains(&name).then_some(()))
    })
    .await?;
    let pod = s.pods(&w).await?;
    let pod = pod
        .first()
        .and_then(|p| p["metadata"]["name"].as_str())
        .context("no pod")?;
    s.exec(pod, "echo more > /data/b.txt").await?;
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;
    let second = restic_names(&repo, &bc.repository).await?;
    let new: Vec<String> = second.difference(&first).cloned().collect();
    ensure!(new.len() == 1, "restic lists {second:?} after {first:?}");
    until("the next backup's snapshot in the watch", WAIT, || async {
        Ok(seen.lock().await.contains(&new[0]).then_some(()))
    })
    .await?;
    drop(watch);
    reader.abort();

    // A user the namespace's RBAC lets read snapshots but not Repositories is refused by the
    // operator's own SubjectAccessReview, with the API server's message.
    let role = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: snapshots-only, namespace: {ns}}}\n\
         rules:\n- apiGroups: [repositories.stash.appscode.com]\n  resources: [snapshots]\n  verbs: [get, list, watch]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: snapshots-only, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: snapshots-only}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: viewer}}\n"
    );
    s.apply(&role).await?;
    let refused = s.kubectl(&["get", "snapshots", "--as", "viewer"]).await;
    let Err(e) = refused else {
        bail!("a user who cannot get Repositories listed snapshots: {refused:?}");
    };
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("forbidden")
            && msg.contains("User \"viewer\"")
            && msg.contains("repositories"),
        "not the Forbidden of the missing Repository permission: {msg}"
    );
    // Nor may a user without any RBAC delete one.
    let refused = s
        .kubectl(&["delete", "snapshot", &name, "--as", "nobody"])
        .await;
    ensure!(refused.is_err(), "a user without RBAC deleted a snapshot");
    ensure!(restic_names(&repo, &bc.repository).await? == second);

    // kubectl delete snapshot forgets it in the repository.
    s.kubectl(&["delete", "snapshot", &name]).await?;
    let left = restic_names(&repo, &bc.repository).await?;
    ensure!(
        !left.contains(&name) && left.len() == 1,
        "restic lists {left:?} after deleting {name}"
    );
    until("the deleted snapshot gone from the list", WAIT, || async {
        Ok((!listed(s, &["-n", ns]).await?.contains(&name)).then_some(()))
    })
    .await?;
    let gone = s.kubectl(&["get", "snapshot", &name]).await;
    ensure!(
        gone.as_ref()
            .is_err_and(|e| format!("{e:#}").contains("NotFound")),
        "kubectl get snapshot {name} after its deletion: {gone:?}"
    );
    Ok(())
}
