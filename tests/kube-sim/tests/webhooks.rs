//! Admission webhooks registered in kube-sim are called over HTTPS with AdmissionReview v1: a
//! mutating one (reached through a Service mapped to a local port) adds a label, a validating
//! one (reached by URL) denies with a message that kubectl prints.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, PostParams};
use kube_sim::{KubeSim, Options, TlsIdentity};
use serde_json::{Value, json};
use std::convert::Infallible;

async fn review(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    let request = &review["request"];
    let uid = request["uid"].clone();
    let labels = request["object"]["metadata"]["labels"].clone();
    let response = if path == "/mutate" {
        let mut patch = vec![];
        if labels.is_null() {
            patch.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
        }
        patch.push(json!({"op": "add", "path": "/metadata/labels/mutated", "value": "yes"}));
        let patch =
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&patch).unwrap());
        json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})
    } else if labels.get("deny").is_some() {
        json!({"uid": uid, "allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": "configmaps labelled deny are not welcome"}})
    } else {
        json!({"uid": uid, "allowed": true})
    };
    let out = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    Ok(hyper::Response::new(Full::new(Bytes::from(
        out.to_string(),
    ))))
}

async fn start_webhook_server(id: &TlsIdentity) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(review))
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_mutate_and_deny() {
    let id = TlsIdentity::generate(&["127.0.0.1", "hook.default.svc"]).unwrap();
    let hook_addr = start_webhook_server(&id).await;
    let sim = KubeSim::start(Options::default()).await.unwrap();
    sim.map_service("default", "hook", 443, &hook_addr.to_string());
    let client = sim.client().await.unwrap();
    let ca = base64::engine::general_purpose::STANDARD.encode(&id.ca_pem);
    let rules = json!([{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"], "operations": ["CREATE", "UPDATE"]}]);

    let ar = |kind: &str, plural: &str| {
        kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind),
            plural,
        )
    };
    let mutating = ar(
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
    );
    let validating = ar(
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
    );
    let mut m = DynamicObject::new("labeller", &mutating);
    m.data = json!({"webhooks": [{
        "name": "labeller.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"service": {"namespace": "default", "name": "hook", "path": "/mutate"}, "caBundle": ca},
        "rules": rules, "objectSelector": {"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]},
    }]});
    Api::<DynamicObject>::all_with(client.clone(), &mutating)
        .create(&PostParams::default(), &m)
        .await
        .unwrap();
    let mut v = DynamicObject::new("gatekeeper", &validating);
    v.data = json!({"webhooks": [{
        "name": "deny.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"url": format!("https://127.0.0.1:{}/validate", hook_addr.port()), "caBundle": ca},
        "rules": rules, "failurePolicy": "Fail",
    }]});
    Api::<DynamicObject>::all_with(client.clone(), &validating)
        .create(&PostParams::default(), &v)
        .await
        .unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let ok: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "ok"}, "data": {"a": "b"}})).unwrap();
    let created = cms.create(&PostParams::default(), &ok).await.unwrap();
    assert_eq!(
        created.metadata.labels.unwrap()["mutated"],
        "yes",
        "the mutating webhook's patch was applied"
    );

    let skipped: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "skipped", "labels": {"skip": "1"}}}))
            .unwrap();
    let created = cms.create(&PostParams::default(), &skipped).await.unwrap();
    assert!(
        !created.metadata.labels.unwrap().contains_key("mutated"),
        "objectSelector excluded it"
    );

    let bad: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "bad", "labels": {"deny": "1"}}}))
            .unwrap();
    let err = cms.create(&PostParams::default(), &bad).await.unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403);
            assert!(s.message.contains("admission webhook \"deny.example.com\" denied the request: configmaps labelled deny are not welcome"), "{}", s.message);
        }
        other => panic!("unexpected error {other}"),
    }

    // kubectl shows the webhook's message to the user.
    common::require_kubectl();
    {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kc).unwrap();
        let manifest = dir.path().join("cm.yaml");
        std::fs::write(&manifest, "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad2\n  labels:\n    deny: \"yes\"\n").unwrap();
        let out = tokio::process::Command::new("kubectl")
            .args(["create", "-f"])
            .arg(&manifest)
            .env("KUBECONFIG", &kc)
            .env("KUBECACHEDIR", dir.path().join("cache"))
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("configmaps labelled deny are not welcome"),
            "kubectl printed: {stderr}"
        );
    }

    // An unreachable webhook with failurePolicy Fail fails the request with the real message.
    sim.map_service("default", "hook", 443, "127.0.0.1:1");
    let err = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("failed calling webhook \"labeller.example.com\""),
        "{err}"
    );
}
