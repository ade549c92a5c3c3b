//! The ServiceAccount admission plugin, served as a mutating webhook because kube-sim does
//! not run it yet: a new pod without `automountServiceAccountToken: false` (the pod's
//! value beats its ServiceAccount's) gets the projected `kube-api-access-<random>` volume
//! (token, `kube-root-ca.crt`'s `ca.crt`, the namespace), mounted read-only at
//! `/var/run/secrets/kubernetes.io/serviceaccount` in every container that has no mount
//! there.

use crate::error::{Error, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};

pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const WEBHOOK: &str = "serviceaccount.admission.cluster-sim.test";

/// The JSON patch the plugin's mutation amounts to, or `None` when it leaves the pod alone.
pub fn service_account_patch(pod: &Pod, sa: Option<&ServiceAccount>) -> Option<Vec<Value>> {
    let spec = pod.spec.as_ref()?;
    let automount = spec
        .automount_service_account_token
        .or_else(|| sa.and_then(|s| s.automount_service_account_token))
        .unwrap_or(true);
    if !automount {
        return None;
    }
    let mounted = |c: &k8s_openapi::api::core::v1::Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == MOUNT_PATH)
    };
    let all: Vec<(&str, usize, &k8s_openapi::api::core::v1::Container)> = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| ("initContainers", i, c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| ("containers", i, c)),
        )
        .collect();
    if all.iter().all(|(_, _, c)| mounted(c)) {
        return None;
    }
    let name = format!("kube-api-access-{}", crate::hash::random_suffix(5));
    let volume = json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}});
    let mut ops = Vec::new();
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
    }
    let mount = json!({"name": name, "readOnly": true, "mountPath": MOUNT_PATH});
    for (field, i, c) in all {
        if mounted(c) {
            continue;
        }
        if c.volume_mounts.as_ref().is_none_or(Vec::is_empty) {
            ops.push(json!({"op": "add", "path": format!("/spec/{field}/{i}/volumeMounts"), "value": [mount]}));
        } else {
            ops.push(json!({"op": "add", "path": format!("/spec/{field}/{i}/volumeMounts/-"), "value": mount}));
        }
    }
    Some(ops)
}

async fn review(client: &Client, body: &[u8]) -> Value {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let uid = req.pointer("/request/uid").cloned().unwrap_or(Value::Null);
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(pod) = req
        .pointer("/request/object")
        .cloned()
        .and_then(|o| serde_json::from_value::<Pod>(o).ok())
    {
        let ns = req
            .pointer("/request/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let sa_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get_opt(&sa_name)
            .await
            .ok()
            .flatten();
        if let Some(ops) = service_account_patch(&pod, sa.as_ref()) {
            let patch = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&ops).unwrap_or_default());
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(patch);
        }
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Serves the webhook on `ip` and registers it; the task ends with the runtime.
pub async fn start(client: Client, ip: IpAddr) -> Result<tokio::task::JoinHandle<()>> {
    let tls = kube_sim::TlsIdentity::generate(&[&ip.to_string()]).map_err(|e| Error::Invalid {
        action: "create the admission webhook's certificate",
        message: e.to_string(),
    })?;
    let cfg = tls.server_config().map_err(|e| Error::Invalid {
        action: "configure the admission webhook's TLS",
        message: e.to_string(),
    })?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .map_err(Error::io("listen for admission reviews on", ip.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(Error::io("read the address of", ip.to_string()))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let c = client.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, c) = (acceptor.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let out = review(&c, &body).await;
                        let mut resp = Response::new(Full::new(Bytes::from(out.to_string())));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "cluster-sim-serviceaccount-admission"},
        "webhooks": [{
            "name": WEBHOOK,
            "clientConfig": {"url": format!("https://{addr}/mutate"), "caBundle": base64::engine::general_purpose::STANDARD.encode(&tls.ca_pem)},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"], "reinvocationPolicy": "IfNeeded",
        }],
    }))
    .map_err(|e| Error::Invalid { action: "build the admission webhook configuration", message: e.to_string() })?;
    Api::<MutatingWebhookConfiguration>::all(client)
        .patch(
            "cluster-sim-serviceaccount-admission",
            &PatchParams::apply("cluster-sim").force(),
            &Patch::Apply(&config),
        )
        .await
        .map_err(Error::kube("register the ServiceAccount admission webhook"))?;
    Ok(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).expect("a pod")
    }

    #[test]
    fn every_container_gets_the_token_mount() {
        let p = pod(json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "i"}],
            "containers": [{"name": "a", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}],
            "volumes": [{"name": "x", "emptyDir": {}}]}}));
        let ops = service_account_patch(&p, None).expect("a patch");
        assert_eq!(ops[0]["path"], "/spec/volumes/-");
        assert!(
            ops[0]["value"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("kube-api-access-"))
        );
        assert_eq!(ops[1]["path"], "/spec/initContainers/0/volumeMounts");
        assert_eq!(ops[2]["path"], "/spec/containers/0/volumeMounts/-");
        assert_eq!(ops[2]["value"]["mountPath"], MOUNT_PATH);
    }

    #[test]
    fn the_pods_opt_out_beats_the_service_accounts() {
        let p = pod(
            json!({"metadata": {"name": "p"}, "spec": {"automountServiceAccountToken": false, "containers": [{"name": "a"}]}}),
        );
        assert!(service_account_patch(&p, None).is_none());
        let sa: ServiceAccount = serde_json::from_value(
            json!({"metadata": {"name": "s"}, "automountServiceAccountToken": false}),
        )
        .expect("sa");
        let p = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}));
        assert!(service_account_patch(&p, Some(&sa)).is_none());
        let p = pod(
            json!({"metadata": {"name": "p"}, "spec": {"automountServiceAccountToken": true, "containers": [{"name": "a"}]}}),
        );
        assert!(service_account_patch(&p, Some(&sa)).is_some());
    }
}
