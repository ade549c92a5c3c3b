//! Behaviours of the real API server an operator trips over when they are missing, each checked
//! the way a user meets it (kubectl, or the raw request a client library sends): managedFields
//! from a creating server-side apply, typed decoding of built-in kinds (wrong types, unknown
//! fields, `fieldValidation`), the defaults the server sets, Lease update rules, cron and
//! immutability validation, and protobuf bodies from kubectl's generators.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Out;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube_sim::{KubeSim, Options};
use serde_json::{Value, json};

struct Sim {
    sim: KubeSim,
    dir: tempfile::TempDir,
}

impl Sim {
    async fn start() -> Self {
        common::require_kubectl();
        let sim = KubeSim::start(Options::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        sim.write_kubeconfig(&dir.path().join("kc")).unwrap();
        Self { sim, dir }
    }

    async fn kubectl(&self, args: &[&str], stdin: &str) -> Out {
        let d = self.dir.path();
        common::kubectl(&d.join("kc"), &d.join("cache"), args, stdin).await
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args, "").await;
        assert!(out.ok, "kubectl {args:?}: {}", out.stderr);
        out.stdout
    }

    async fn get_json(&self, what: &[&str]) -> Value {
        let mut args = vec!["get"];
        args.extend(what);
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&args).await).unwrap()
    }

    /// A raw request: status, `Warning` headers and body.
    async fn raw(
        &self,
        method: &str,
        path: &str,
        ct: &str,
        body: &str,
    ) -> (u16, Vec<String>, Value) {
        let tcp = tokio::net::TcpStream::connect(self.sim.addr())
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.sim.addr().to_string())
            .header(hyper::header::CONTENT_TYPE, ct)
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let code = resp.status().as_u16();
        let warnings = resp
            .headers()
            .get_all(hyper::header::WARNING)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            code,
            warnings,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creating_server_side_apply_owns_its_fields() {
    let s = Sim::start().await;
    let cm = |v: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: owned}}\ndata: {{k: {v}}}\n")
    };
    let out = s
        .kubectl(
            &["apply", "--server-side", "--field-manager=first", "-f", "-"],
            &cm("one"),
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    let got = s
        .get_json(&["configmap", "owned", "--show-managed-fields"])
        .await;
    let mf = &got["metadata"]["managedFields"][0];
    assert_eq!(
        (mf["manager"].as_str(), mf["operation"].as_str()),
        (Some("first"), Some("Apply")),
        "{got}"
    );
    assert_eq!(mf["fieldsV1"], json!({"f:data": {"f:k": {}}}));
    let out = s
        .kubectl(
            &[
                "apply",
                "--server-side",
                "--field-manager=second",
                "-f",
                "-",
            ],
            &cm("two"),
        )
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains(r#"Apply failed with 1 conflict: conflict with "first": .data.k"#),
        "{}",
        out.stderr
    );
    let out = s
        .kubectl(
            &[
                "apply",
                "--server-side",
                "--field-manager=second",
                "--force-conflicts",
                "-f",
                "-",
            ],
            &cm("two"),
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
}

const DEPLOYMENT: &str = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web"},
  "spec":{"replicas":2,"bogus":true,"selector":{"matchLabels":{"app":"web"}},
  "template":{"metadata":{"labels":{"app":"web"}},"spec":{"containers":[{"name":"c","image":"busybox","colour":"red"}]}}}}"#;
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_objects_are_decoded_pruned_and_validated() {
    let s = Sim::start().await;
    let json = "application/json";

    // Strict: unknown fields are a 400 naming each of them; nothing is stored.
    let (code, _, st) = s
        .raw(
            "POST",
            &format!("{DEPLOYMENTS}?fieldValidation=Strict"),
            json,
            DEPLOYMENT,
        )
        .await;
    assert_eq!(code, 400, "{st}");
    assert_eq!(
        st["message"],
        r#"Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: unknown field "spec.bogus", unknown field "spec.template.spec.containers[0].colour""#
    );
    // The default (Warn): stored without them, with a Warning header per field.
    let (code, warnings, d) = s.raw("POST", DEPLOYMENTS, json, DEPLOYMENT).await;
    assert_eq!(code, 201, "{d}");
    assert_eq!(
        warnings,
        [
            r#"299 - "unknown field \"spec.bogus\"""#,
            r#"299 - "unknown field \"spec.template.spec.containers[0].colour\"""#
        ]
    );
    assert!(
        d["spec"].get("bogus").is_none()
            && d["spec"]["template"]["spec"]["containers"][0]
                .get("colour")
                .is_none(),
        "{d}"
    );
    assert_eq!(d["spec"]["replicas"], 2);
    // Ignore: pruned, silently.
    let other = DEPLOYMENT.replace(r#""name":"web""#, r#""name":"quiet""#);
    let (code, warnings, _) = s
        .raw(
            "POST",
            &format!("{DEPLOYMENTS}?fieldValidation=Ignore"),
            json,
            &other,
        )
        .await;
    assert_eq!((code, warnings.len()), (201, 0));
    // kubectl (which asks for Strict by default) shows the same.
    let out = s
        .kubectl(
            &["apply", "--validate=warn", "-f", "-"],
            &DEPLOYMENT.replace("web", "warned"),
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(r#"Warning: unknown field "spec.bogus""#),
        "{}",
        out.stderr
    );

    // A value of the wrong type is refused by the decoder.
    let bad = DEPLOYMENT
        .replace(r#""replicas":2"#, r#""replicas":"two""#)
        .replace("web", "typed");
    let (code, _, st) = s.raw("POST", DEPLOYMENTS, json, &bad).await;
    assert_eq!(code, 400, "{st}");
    assert!(
        st["message"].as_str().unwrap().starts_with(r#"Deployment in version "v1" cannot be handled as a Deployment: json: invalid type: string "two""#),
        "{st}"
    );

    // A CronJob needs a schedule the cron parser takes.
    let out = s
        .kubectl(
            &[
                "create",
                "cronjob",
                "bad",
                "--image=busybox",
                "--schedule=not a cron",
            ],
            "",
        )
        .await;
    assert!(
        out.stderr.contains(r#"CronJob.batch "bad" is invalid: spec.schedule: Invalid value: "not a cron": expected exactly 5 fields, found 3: [not a cron]"#),
        "{}",
        out.stderr
    );
    let out = s
        .kubectl(
            &[
                "create",
                "cronjob",
                "late",
                "--image=busybox",
                "--schedule=61 * * * *",
            ],
            "",
        )
        .await;
    assert!(
        out.stderr
            .contains("end of range (61) above maximum (59): 61"),
        "{}",
        out.stderr
    );

    // A Job's pod template cannot change.
    s.ok(&["create", "job", "once", "--image=busybox"]).await;
    let out = s
        .kubectl(&["patch", "job", "once", "--type=merge", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"once","image":"nginx"}]}}}}"#], "")
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains(r#"The Job "once" is invalid: spec.template: Invalid value"#)
            && out.stderr.contains("field is immutable"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sets_the_defaults_a_real_one_does() {
    let s = Sim::start().await;
    let yaml = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ds}
spec:
  selector: {matchLabels: {app: ds}}
  template:
    metadata: {labels: {app: ds}}
    spec: {containers: [{name: c, image: busybox}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: sts}
spec:
  serviceName: sts
  selector: {matchLabels: {app: sts}}
  template:
    metadata: {labels: {app: sts}}
    spec: {containers: [{name: c, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: job}
spec:
  template:
    metadata: {labels: {team: a}}
    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}
"#;
    let out = s.kubectl(&["apply", "-f", "-"], yaml).await;
    assert!(out.ok, "{}", out.stderr);
    let ds = s.get_json(&["daemonset", "ds"]).await;
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    );
    let sts = s.get_json(&["statefulset", "sts"]).await;
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    let job = s.get_json(&["job", "job"]).await;
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"],
        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"],
        json!({"team": "a", "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "job",
            "controller-uid": uid, "job-name": "job"})
    );
    assert_eq!(
        job["metadata"]["labels"],
        json!({"team": "a"}),
        "a Job takes its template's labels"
    );
    for (k, v) in [
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
        ("backoffLimit", json!(6)),
    ] {
        assert_eq!(job["spec"][k], v, "spec.{k}");
    }
    // `strategy: {}` (what kubectl create deployment sends) is filled in.
    s.ok(&["create", "deployment", "d", "--image=busybox"])
        .await;
    let d = s.get_json(&["deployment", "d"]).await;
    assert_eq!(
        d["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_refuse_blind_updates_and_bad_durations() {
    let s = Sim::start().await;
    let leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    let lease = |d: i64| {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "lock"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": d}}).to_string()
    };
    let (code, _, st) = s.raw("POST", leases, "application/json", &lease(-1)).await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["message"],
        r#"Lease.coordination.k8s.io "lock" is invalid: spec.leaseDurationSeconds: Invalid value: -1: must be greater than 0"#
    );
    let (code, _, created) = s.raw("POST", leases, "application/json", &lease(15)).await;
    assert_eq!(code, 201, "{created}");
    // A PUT without a resourceVersion is refused; with the current one it goes through.
    let (code, _, st) = s
        .raw(
            "PUT",
            &format!("{leases}/lock"),
            "application/json",
            &lease(20),
        )
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["message"],
        r#"leases.coordination.k8s.io "lock" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"#
    );
    let mut with_rv: Value = serde_json::from_str(&lease(20)).unwrap();
    with_rv["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"].clone();
    let (code, _, updated) = s
        .raw(
            "PUT",
            &format!("{leases}/lock"),
            "application/json",
            &with_rv.to_string(),
        )
        .await;
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["spec"]["leaseDurationSeconds"], 20);
    // Patches carry the stored version, so they are conditional and allowed.
    let (code, _, _) = s
        .raw(
            "PATCH",
            &format!("{leases}/lock"),
            "application/merge-patch+json",
            r#"{"spec":{"holderIdentity":"b"}}"#,
        )
        .await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_generators_send_protobuf_and_it_is_understood() {
    let s = Sim::start().await;
    s.ok(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--port=8080",
        "--replicas=2",
        "--",
        "sleep",
        "60",
    ])
    .await;
    let d = s.get_json(&["deployment", "web"]).await;
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        (c["image"].as_str(), c["command"].clone()),
        (Some("busybox:1.36"), json!(["sleep", "60"])),
        "{d}"
    );
    assert_eq!(
        c["ports"],
        json!([{"containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(d["spec"]["replicas"], 2);
    // Plain fields left at their zero values are unset, so defaults apply.
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");

    s.ok(&["scale", "deployment", "web", "--replicas=0"]).await;
    assert_eq!(
        s.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ])
        .await,
        "0"
    );
    s.ok(&["set", "env", "deployment/web", "MODE=fast"]).await;
    assert_eq!(
        s.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[0].value}"
        ])
        .await,
        "fast"
    );

    s.ok(&[
        "create",
        "job",
        "hello",
        "--image=busybox",
        "--",
        "echo",
        "hi",
    ])
    .await;
    let j = s.get_json(&["job", "hello"]).await;
    assert_eq!(j["spec"]["template"]["spec"]["restartPolicy"], "Never");
    assert_eq!(
        j["spec"]["template"]["spec"]["containers"][0]["command"],
        json!(["echo", "hi"])
    );
    s.ok(&[
        "create",
        "cronjob",
        "tick",
        "--image=busybox",
        "--schedule=*/5 * * * *",
    ])
    .await;
    s.ok(&["create", "job", "tick-now", "--from=cronjob/tick"])
        .await;
    let j = s.get_json(&["job", "tick-now"]).await;
    assert_eq!(j["metadata"]["ownerReferences"][0]["name"], "tick", "{j}");
    s.ok(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ])
    .await;
    let svc = s.get_json(&["service", "web"]).await;
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"port": 80, "protocol": "TCP", "targetPort": 8080}]),
        "{svc}"
    );
    assert_eq!(svc["spec"]["selector"], json!({"app": "web"}));
    s.ok(&[
        "run",
        "solo",
        "--image=busybox",
        "--restart=Never",
        "--",
        "sleep",
        "1",
    ])
    .await;
    let p = s.get_json(&["pod", "solo"]).await;
    assert_eq!(
        p["spec"]["containers"][0]["args"],
        json!(["sleep", "1"]),
        "{p}"
    );
    assert_eq!(p["spec"]["restartPolicy"], "Never");
    s.ok(&["create", "role", "r", "--verb=get", "--resource=pods"])
        .await;
    s.ok(&["create", "rolebinding", "rb", "--role=r", "--user=u"])
        .await;
    assert_eq!(
        s.ok(&[
            "get",
            "rolebinding",
            "rb",
            "-o",
            "jsonpath={.subjects[0].name}"
        ])
        .await,
        "u"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_one_store_in_two_versions() {
    let s = Sim::start().await;
    s.ok(&["create", "configmap", "subject"]).await;
    let uid = s
        .ok(&[
            "get",
            "configmap",
            "subject",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;
    let new_events = "/apis/events.k8s.io/v1/namespaces/default/events";
    // events.k8s.io/v1 insists on the new fields.
    let (code, _, st) = s
        .raw("POST", new_events, "application/json", r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"bare"},"type":"Normal","reason":"R"}"#)
        .await;
    assert_eq!(code, 422, "{st}");
    assert_eq!(
        st["message"],
        r#"Event.events.k8s.io "bare" is invalid: eventTime: Required value"#
    );
    let (code, _, st) = s
        .raw("POST", new_events, "application/json", r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{"name":"half"},"eventTime":"2026-01-01T00:00:00.000000Z","type":"Normal","reason":"R"}"#)
        .await;
    assert_eq!(code, 422, "{st}");
    let causes: Vec<&str> = st["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        causes,
        ["reportingController", "reportingInstance", "action"]
    );

    // What a recorder writes there (kube-runtime's does) is what kubectl shows.
    let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "subject.1"},
        "eventTime": "2026-01-01T00:00:00.000000Z", "type": "Warning", "reason": "Broken", "note": "it broke",
        "action": "Reconcile", "reportingController": "example.com/operator", "reportingInstance": "operator-0",
        "regarding": {"apiVersion": "v1", "kind": "ConfigMap", "name": "subject", "namespace": "default", "uid": uid}});
    let (code, _, created) = s
        .raw("POST", new_events, "application/json", &ev.to_string())
        .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["note"], "it broke");
    let core = s.get_json(&["events", "subject.1"]).await;
    assert_eq!(core["apiVersion"], "v1");
    assert_eq!(core["message"], "it broke");
    assert_eq!(core["involvedObject"]["name"], "subject");
    assert_eq!(core["reportingComponent"], "example.com/operator");
    let out = s
        .ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=subject",
        ])
        .await;
    assert!(out.contains("Broken") && out.contains("it broke"), "{out}");
    let out = s.ok(&["describe", "configmap", "subject"]).await;
    assert!(
        out.contains("Broken") && out.contains("it broke"),
        "kubectl describe shows the event:\n{out}"
    );

    // A core Event reads back through events.k8s.io with the new names.
    let legacy = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old.1"}, "reason": "Old", "message": "legacy",
        "type": "Normal", "count": 3, "source": {"component": "kubelet"},
        "involvedObject": {"kind": "ConfigMap", "name": "subject", "namespace": "default", "uid": uid}});
    let (code, _, _) = s
        .raw(
            "POST",
            "/api/v1/namespaces/default/events",
            "application/json",
            &legacy.to_string(),
        )
        .await;
    assert_eq!(code, 201);
    let (code, _, v1) = s
        .raw(
            "GET",
            &format!("{new_events}/old.1"),
            "application/json",
            "",
        )
        .await;
    assert_eq!(code, 200, "{v1}");
    assert_eq!(v1["apiVersion"], "events.k8s.io/v1");
    assert_eq!(
        (v1["note"].as_str(), v1["deprecatedCount"].as_i64()),
        (Some("legacy"), Some(3))
    );
    assert_eq!(v1["deprecatedSource"]["component"], "kubelet");
    assert_eq!(v1["regarding"]["name"], "subject");
    let (_, _, list) = s
        .raw(
            "GET",
            &format!("{new_events}?fieldSelector=regarding.name%3Dsubject"),
            "application/json",
            "",
        )
        .await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_report_unknown_fields_too() {
    let s = Sim::start().await;
    let crd = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer}
"#;
    let out = s.kubectl(&["apply", "-f", "-"], crd).await;
    assert!(out.ok, "{}", out.stderr);
    s.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gadgets.example.com",
    ])
    .await;
    let gadget = "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\nspec: {size: 1, colour: red}\n";
    let out = s.kubectl(&["apply", "-f", "-"], gadget).await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains(r#"Gadget in version "v1" cannot be handled as a Gadget: strict decoding error: unknown field "spec.colour""#),
        "{}",
        out.stderr
    );
    let out = s
        .kubectl(&["apply", "--validate=warn", "-f", "-"], gadget)
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stderr
            .contains(r#"Warning: unknown field "spec.colour""#),
        "{}",
        out.stderr
    );
    let got = s.get_json(&["gadget", "g"]).await;
    assert_eq!(got["spec"], json!({"size": 1}), "pruned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_assigns_a_pod_once_as_the_scheduler_expects() {
    let s = Sim::start().await;
    s.ok(&["run", "web", "--image=busybox", "--restart=Never"])
        .await;
    let pod = s.get_json(&["pod", "web"]).await;
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_owned();
    let binding = |node: &str, uid: &str| {
        json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": "web", "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
        .to_string()
    };
    let path = "/api/v1/namespaces/default/pods/web/binding";
    let (code, _, st) = s
        .raw(
            "POST",
            path,
            "application/json",
            &binding("node-1", "not-the-uid"),
        )
        .await;
    assert_eq!(code, 409, "{st}");
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("Precondition failed: UID in precondition")
    );
    let (code, _, st) = s
        .raw("POST", path, "application/json", &binding("node-1", &uid))
        .await;
    assert_eq!(code, 201, "{st}");
    assert_eq!(st["status"], "Success");
    let pod = s.get_json(&["pod", "web"]).await;
    assert_eq!(pod["spec"]["nodeName"], "node-1");
    let scheduled = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap();
    assert_eq!(scheduled["status"], "True");
    // A pod is bound once.
    let (code, _, st) = s
        .raw("POST", path, "application/json", &binding("node-2", &uid))
        .await;
    assert_eq!(code, 409, "{st}");
    assert_eq!(
        st["message"],
        r#"Operation cannot be fulfilled on pods/binding "web": pod web is already assigned to node "node-1""#
    );
    let (code, _, st) = s
        .raw(
            "POST",
            path,
            "application/json",
            &json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"},
                "target": {"kind": "Pod", "name": "x"}})
            .to_string(),
        )
        .await;
    assert_eq!(code, 422, "{st}");
}
