//! kube-aggregator's availability controller: an APIService backed by a Service gets its
//! `Available` condition from that Service, its EndpointSlices and a discovery request, as
//! kube-apiserver sets it [kube-aggregator: pkg/controllers/status/remote `sync`].

use crate::Core;
use crate::admission::{Endpoint, endpoint_slices, mapped_address, send_as};
use crate::store::key;
use crate::util::*;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// What `sync` concludes before writing: status, reason, message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn not(reason: &'static str, message: String) -> Self {
        Self {
            status: "False",
            reason,
            message,
        }
    }
}

/// Runs until shutdown. A change of an APIService, Service or EndpointSlice wakes it (the
/// controller's informers); a failed discovery check is retried after a second (the work
/// queue's rate-limited requeue); everything is re-checked on a resync.
pub async fn run(core: Arc<Core>) {
    let mut shutdown = core.shutdown.clone();
    loop {
        let failed = pass(&core).await;
        let wait = if failed {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(30)
        };
        tokio::select! {
            _ = core.available.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Checks every service-backed APIService once; true when a discovery check failed.
async fn pass(core: &Arc<Core>) -> bool {
    let gr = crate::handlers::gr("apiregistration.k8s.io", "apiservices");
    let services: Vec<Arc<Value>> = core
        .lock()
        .tables
        .get(&gr)
        .map(|t| t.objects.values().cloned().collect())
        .unwrap_or_default();
    let checks = services.into_iter().filter_map(|svc| {
        let spec = svc.get("spec")?.clone();
        spec.get("service").filter(|s| !s.is_null())?;
        let core = core.clone();
        Some(async move {
            let verdict = sync(&core, &svc, &spec).await;
            let failed = verdict.reason == "FailedDiscoveryCheck";
            write(&core, &svc, &verdict);
            failed
        })
    });
    futures_util::future::join_all(checks)
        .await
        .into_iter()
        .any(|f| f)
}

async fn sync(core: &Arc<Core>, apiservice: &Value, spec: &Value) -> Verdict {
    let s = &spec["service"];
    let ns = s.get("namespace").and_then(Value::as_str).unwrap_or("");
    let name = s.get("name").and_then(Value::as_str).unwrap_or("");
    let port = s.get("port").and_then(Value::as_i64).unwrap_or(443);
    // Without a cluster behind kube-sim, a mapped address stands in for the Service and its
    // endpoints; only the discovery check is left.
    if mapped_address(core, ns, name, port).is_none()
        && let Some(v) = check_service(core, ns, name, port)
    {
        return v;
    }
    let group = spec.get("group").and_then(Value::as_str).unwrap_or("");
    let version = spec.get("version").and_then(Value::as_str).unwrap_or("");
    let path = if name_of(apiservice) == "v1." {
        format!("/api/{version}")
    } else {
        format!("/apis/{group}/{version}")
    };
    // Five attempts at once, each to an endpoint of its own; one success is enough [same
    // `sync`].
    let attempts = (0..5).map(|_| discovery_check(core, ns, name, port, &path));
    let results = futures_util::future::join_all(attempts).await;
    if results.iter().any(Result::is_ok) {
        return Verdict {
            status: "True",
            reason: "Passed",
            message: "all checks passed".into(),
        };
    }
    let message = results
        .into_iter()
        .find_map(Result::err)
        .unwrap_or_default();
    Verdict::not("FailedDiscoveryCheck", message)
}

/// The checks on the Service and its EndpointSlices, for a ClusterIP Service.
fn check_service(core: &Core, ns: &str, name: &str, port: i64) -> Option<Verdict> {
    let st = core.lock();
    let Some(svc) = st.get(&crate::handlers::gr("", "services"), &key(ns, name)) else {
        return Some(Verdict::not(
            "ServiceNotFound",
            format!("service/{name} in \"{ns}\" is not present"),
        ));
    };
    if svc.pointer("/spec/type").and_then(Value::as_str) != Some("ClusterIP") {
        return None;
    }
    let Some(port_name) = crate::admission::service_port_name(&svc, port) else {
        return Some(Verdict::not(
            "ServicePortError",
            format!("service/{name} in \"{ns}\" is not listening on port {port}"),
        ));
    };
    let slices = endpoint_slices(&st, ns, name);
    if slices.is_empty() {
        return Some(Verdict::not(
            "EndpointsNotFound",
            format!("cannot find endpointslices for service/{name} in \"{ns}\""),
        ));
    }
    // `hasAvailableEndpoint`: a slice with an endpoint not marked unready and a port of the
    // Service port's name.
    let available = slices.iter().any(|s| {
        let has_ready = s
            .get("endpoints")
            .and_then(Value::as_array)
            .is_some_and(|es| {
                es.iter()
                    .any(|e| e.pointer("/conditions/ready").and_then(Value::as_bool) != Some(false))
            });
        let has_port = s.get("ports").and_then(Value::as_array).is_some_and(|ps| {
            ps.iter().any(|p| {
                p.get("name").and_then(Value::as_str) == Some(port_name.as_str())
                    && p.get("port").is_some_and(|n| !n.is_null())
            })
        });
        has_ready && has_port
    });
    (!available).then(|| {
        Verdict::not(
            "MissingEndpoints",
            format!(
                "endpointslices for service/{name} in \"{ns}\" have no addresses with port name \"{port_name}\""
            ),
        )
    })
}

/// One GET of the group/version's discovery document, as the aggregator's own identity
/// (`system:kube-aggregator` in `system:masters`) with the front-proxy certificate. The
/// serving certificate is not verified here: "if someone owns the network and messes with
/// your status that's not so bad" [same `sync`]; only proxied requests check the caBundle.
async fn discovery_check(
    core: &Arc<Core>,
    ns: &str,
    name: &str,
    port: i64,
    path: &str,
) -> Result<(), String> {
    let connect = crate::admission::resolve_service(core, ns, name, port).map_err(|e| match e {
        crate::admission::CallError::ResolveService(m) => m,
        other => other.to_string(),
    })?;
    let url = format!("https://{connect}{path}");
    let ep = Endpoint {
        connect,
        server_name: format!("{name}.{ns}.svc"),
        path: path.to_owned(),
        ca_pem: String::new(),
        insecure: true,
    };
    let fut = async {
        let req = http::Request::get(path)
            .header(http::header::HOST, ep.server_name.clone())
            .header("X-Remote-User", "system:kube-aggregator")
            .header("X-Remote-Group", crate::auth::MASTERS)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = send_as(&ep, req, Some(&core.auth.front_proxy_client))
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        let code = resp.status().as_u16();
        if !(200..300).contains(&code) {
            return Err(format!("bad status from {url}: {code}"));
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("failing or missing response from {url}: {e}")),
        Err(_) => Err(format!("timed out waiting for {url}")),
    }
}

/// Writes the condition if it changed, keeping `lastTransitionTime` while the status stays
/// [apiregistration helper `SetAPIServiceCondition`].
fn write(core: &Core, seen: &Value, v: &Verdict) {
    let gr = crate::handlers::gr("apiregistration.k8s.io", "apiservices");
    let mut st = core.lock();
    let Some(cur) = st.get(&gr, &key("", name_of(seen))) else {
        return;
    };
    if uid_of(&cur) != uid_of(seen) || is_deleting(&cur) {
        return;
    }
    let mut conds: Vec<Value> = cur
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let i = conds.iter().position(|c| c["type"] == "Available");
    let old = i.map(|i| conds[i].clone());
    if let Some(o) = &old
        && o["status"] == v.status
        && o["reason"] == v.reason
        && o["message"] == v.message.as_str()
    {
        return;
    }
    let ltt = old
        .as_ref()
        .filter(|o| o["status"] == v.status)
        .and_then(|o| o.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now_rfc3339()));
    let cond = json!({"type": "Available", "status": v.status, "lastTransitionTime": ltt,
        "reason": v.reason, "message": v.message});
    match i {
        Some(i) => conds[i] = cond,
        None => conds.push(cond),
    }
    let mut obj = (*cur).clone();
    obj["status"] = json!({"conditions": conds});
    st.put(&gr, obj);
}
