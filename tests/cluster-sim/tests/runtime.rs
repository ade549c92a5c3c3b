//! Containers of a known image run as real processes: the pod's env (downward API,
//! Secret and ConfigMap keys), its mounts (a Secret, the projected ServiceAccount token),
//! its own address, a readiness probe that gates Ready, and the API server reached with the
//! mounted token through kube-rs's in-cluster configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use common::{Sim, http_get, images};
use std::path::PathBuf;

fn pod(name: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: probe}}}}
spec:
  containers:
    - name: app
      image: example.test/sim-test-server:1
      ports: [{{name: http, containerPort: 8080}}]
      readinessProbe: {{httpGet: {{path: /readyz, port: http}}, periodSeconds: 1}}
      env:
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: MY_NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
        - {{name: MY_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
        - {{name: MY_LABEL, valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['app']"}}}}}}
        - {{name: PASSWORD, valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}}}
        - {{name: GREETING, valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}}}
        - {{name: COMBINED, value: "$(GREETING)-world"}}
      volumeMounts:
        - {{name: creds, mountPath: /etc/creds, readOnly: true}}
  volumes:
    - {{name: creds, secret: {{secretName: creds}}}}
"#
    )
}

const SETUP: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: default}
stringData: {password: hunter2}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: default}
data: {greeting: hello}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-pods, namespace: default}
rules: [{apiGroups: [""], resources: [pods], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: read-pods, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-pods}
subjects: [{kind: ServiceAccount, name: default, namespace: default}]
---
apiVersion: v1
kind: Service
metadata: {name: probe, namespace: default}
spec:
  selector: {app: probe}
  ports: [{name: web, port: 80, targetPort: http}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_of_a_known_image_runs_with_what_it_declared() -> Result<()> {
    let sim = Sim::start_with(1, images()).await?;
    sim.apply(SETUP).await?;
    sim.apply(&pod("one")).await?;
    sim.apply(&pod("two")).await?;
    let running = |name: &'static str| {
        let sim = &sim;
        async move {
            sim.until("the container to run", || async {
                let p = sim.json(&["get", "pod", name]).await?;
                let running = p["status"]["containerStatuses"][0]["state"]["running"].is_object();
                Ok(running.then_some(p))
            })
            .await
        }
    };
    let one = running("one").await?;
    let two = running("two").await?;
    // Admission gave the pod its ServiceAccount token volume, mounted where kube-rs looks.
    let vols = one["spec"]["volumes"].as_array().unwrap();
    assert!(
        vols.iter().any(
            |v| v["name"].as_str().unwrap().starts_with("kube-api-access-")
                && v["projected"].is_object()
        ),
        "{vols:?}"
    );
    let ip = one["status"]["podIP"].as_str().unwrap().to_owned();
    let ip2 = two["status"]["podIP"].as_str().unwrap().to_owned();
    assert_ne!(ip, ip2);
    // Not Ready while /readyz fails.
    let ready = one["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "ContainersNotReady");
    // Both pods listen on :8080, each on its own address.
    let (code, env) = sim
        .until("the server to answer", || async {
            Ok(http_get(&ip, "/env").await.ok())
        })
        .await?;
    assert_eq!(code, 200);
    let env: serde_json::Value = serde_json::from_str(&env)?;
    assert_eq!(env["POD_NAME"], "one");
    assert_eq!(env["MY_NODE"], "node-1");
    assert_eq!(env["MY_IP"], ip.as_str());
    assert_eq!(env["MY_LABEL"], "probe");
    assert_eq!(env["PASSWORD"], "hunter2");
    assert_eq!(env["COMBINED"], "hello-world");
    assert_eq!(env["HOSTNAME"], "one");
    assert!(
        env["KUBERNETES_SERVICE_HOST"].as_str().is_some()
            && env["KUBERNETES_SERVICE_PORT"].as_str().is_some()
    );
    let (_, env2) = sim
        .until("the second server", || async {
            Ok(http_get(&ip2, "/env").await.ok())
        })
        .await?;
    assert!(env2.contains("\"POD_NAME\":\"two\""), "{env2}");
    assert_eq!(
        http_get(&ip, "/file?/etc/creds/password").await?.1,
        "hunter2"
    );
    assert_eq!(
        http_get(
            &ip,
            "/file?/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        )
        .await?
        .1,
        "default"
    );
    // The mounted token, CA and service env take kube-rs's in-cluster config to the API,
    // as the pod's ServiceAccount (the Role above is what lets it read its pod).
    let (code, uid) = http_get(&ip, "/whoami").await?;
    assert_eq!(
        (code, uid.as_str()),
        (200, one["metadata"]["uid"].as_str().unwrap()),
        "{uid}"
    );
    // The Secret volume as the kubelet lays it out: names linked into `..data`.
    let kroot = &sim.cluster().nodes()[0].kubelet_root;
    let secret_dir = kroot.join(format!(
        "pods/{}/volumes/kubernetes.io~secret/creds",
        one["metadata"]["uid"].as_str().unwrap()
    ));
    assert_eq!(
        std::fs::read_link(secret_dir.join("password"))?,
        PathBuf::from("..data/password")
    );
    // Ready once the probe passes.
    http_get(&ip, "/ready-now").await?;
    sim.wait_ready("one").await?;
    let p = sim.json(&["get", "pod", "two"]).await?;
    assert_eq!(
        p["status"]["containerStatuses"][0]["ready"], false,
        "the other pod's probe still fails"
    );
    sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_container_is_restarted_after_a_back_off() -> Result<()> {
    let sim = Sim::start_with(1, images()).await?;
    sim.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: crashy, namespace: default}
spec:
  containers: [{name: app, image: sim-test-server}]
"#,
    )
    .await?;
    sim.wait_ready("crashy").await?;
    let ip = sim.json(&["get", "pod", "crashy"]).await?["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_owned();
    sim.until("the server", || async {
        Ok(http_get(&ip, "/env").await.ok())
    })
    .await?;
    http_get(&ip, "/exit?3").await?;
    let waiting = sim
        .until("CrashLoopBackOff", || async {
            let p = sim.json(&["get", "pod", "crashy"]).await?;
            let cs = p["status"]["containerStatuses"][0].clone();
            Ok((cs["state"]["waiting"]["reason"] == "CrashLoopBackOff").then_some(cs))
        })
        .await?;
    assert_eq!(waiting["restartCount"], 1);
    assert_eq!(waiting["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(waiting["lastState"]["terminated"]["reason"], "Error");
    assert_eq!(waiting["ready"], false);
    // After the back-off the container runs again, with a new container ID.
    sim.wait_ready("crashy").await?;
    let cs = sim.json(&["get", "pod", "crashy"]).await?["status"]["containerStatuses"][0].clone();
    assert_eq!(cs["restartCount"], 1);
    assert!(cs["state"]["running"].is_object());
    assert_ne!(cs["containerID"], waiting["containerID"]);
    sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_liveness_probe_restarts_the_container() -> Result<()> {
    let sim = Sim::start_with(1, images()).await?;
    // `/readyz` fails until `/ready-now`, so this liveness probe fails from the start.
    sim.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: lively, namespace: default}
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: app
      image: sim-test-server
      livenessProbe: {httpGet: {path: /readyz, port: 8080}, periodSeconds: 1, failureThreshold: 2}
"#,
    )
    .await?;
    let first = sim
        .until("the container to run", || async {
            let p = sim.json(&["get", "pod", "lively"]).await?;
            let cs = p["status"]["containerStatuses"][0].clone();
            Ok(cs["state"]["running"].is_object().then_some(cs))
        })
        .await?;
    assert_eq!(first["restartCount"], 0);
    // Killed by the kubelet and started again after the back-off.
    let again = sim
        .until("a restart", || async {
            let p = sim.json(&["get", "pod", "lively"]).await?;
            let cs = p["status"]["containerStatuses"][0].clone();
            Ok(
                (cs["restartCount"].as_i64() >= Some(1) && cs["state"]["running"].is_object())
                    .then_some((cs, p)),
            )
        })
        .await?;
    let (cs, pod) = again;
    assert_ne!(cs["containerID"], first["containerID"]);
    // PID 1 of its namespace ignores the SIGTERM; the SIGKILL after the grace period ends it.
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 137, "{cs}");
    // Once the probe passes, the new process is left running.
    let ip = pod["status"]["podIP"].as_str().unwrap().to_owned();
    sim.until("the restarted server", || async {
        Ok(http_get(&ip, "/ready-now").await.ok())
    })
    .await?;
    sim.wait_ready("lively").await?;
    sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reads_the_container_log_from_its_kubelet() -> Result<()> {
    let images = cluster_sim::Images {
        host_commands: vec!["busybox".into()],
        ..Default::default()
    };
    let sim = Sim::start_with(1, images).await?;
    sim.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: talk, namespace: default}
spec:
  containers:
    - name: main
      image: busybox:1.37
      command: [sh, -c, "echo one; echo two; echo three; exec sleep 3600"]
"#,
    )
    .await?;
    sim.wait_ready("talk").await?;
    let all = sim
        .until("the log", || async {
            let out = sim.kubectl(&["logs", "talk"]).await?;
            Ok(out.contains("three").then_some(out))
        })
        .await?;
    assert_eq!(all, "one\ntwo\nthree\n");
    assert_eq!(sim.kubectl(&["logs", "talk", "--tail=1"]).await?, "three\n");
    assert_eq!(
        sim.kubectl(&["logs", "talk", "-c", "main", "--limit-bytes=3"])
            .await?,
        "one"
    );
    let err = sim
        .kubectl(&["logs", "talk", "--previous"])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}")
            .contains("previous terminated container \"main\" in pod \"talk\" not found"),
        "{err:#}"
    );
    // Followed, the log streams until the container ends.
    sim.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: slow, namespace: default}
spec:
  restartPolicy: Never
  containers:
    - name: main
      image: busybox:1.37
      command: [sh, -c, "echo start; sleep 3; echo end"]
"#,
    )
    .await?;
    sim.until("the slow pod running", || async {
        let p = sim.json(&["get", "pod", "slow"]).await?;
        Ok(p["status"]["containerStatuses"][0]["state"]["running"]
            .is_object()
            .then_some(()))
    })
    .await?;
    assert_eq!(
        sim.kubectl(&["logs", "-f", "slow", "--request-timeout=120s"])
            .await?,
        "start\nend\n"
    );
    let err = sim
        .kubectl(&["logs", "talk", "-c", "nope"])
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("container nope is not valid for pod talk"),
        "{err:#}"
    );
    sim.stop().await;
    Ok(())
}
