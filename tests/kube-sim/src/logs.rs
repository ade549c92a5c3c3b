//! `GET pods/<name>/log`: the API server asks the kubelet of the pod's node for the
//! container's log and streams its answer back [k/k: pkg/registry/core/pod/rest/log.go
//! `LogREST.Get`; pkg/registry/core/pod/strategy.go `LogLocation`]: the container named by
//! `container` (the only one when the pod has one), at
//! `https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/<ns>/<pod>/<container>`
//! with the log options passed on. Without `--kubelet-certificate-authority` the kubelet's
//! serving certificate is not verified, as here.

use crate::admission::{Endpoint, send_as};
use crate::handlers::{Ctx, gr};
use crate::server::{Body, BodyError};
use crate::status::{ApiError, ApiResult};
use crate::store::key;
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

/// The `PodLogOptions` the kubelet understands, passed on as they came.
const OPTIONS: &[&str] = &[
    "previous",
    "tailLines",
    "limitBytes",
    "sinceSeconds",
    "sinceTime",
    "timestamps",
    "follow",
];

pub async fn pod_log(cx: &Ctx, name: &str) -> ApiResult<Response<Body>> {
    let (pod, node) = {
        let st = cx.core.lock();
        let pod = st
            .get(&gr("", "pods"), &key(&cx.ns, name))
            .ok_or_else(|| ApiError::not_found("", "pods", name))?;
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .and_then(|n| st.get(&gr("", "nodes"), &key("", n)));
        (pod, node)
    };
    let names = |path: &str| -> Vec<String> {
        pod.pointer(path)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let containers = names("/spec/containers");
    let all: Vec<String> = containers
        .iter()
        .cloned()
        .chain(names("/spec/initContainers"))
        .chain(names("/spec/ephemeralContainers"))
        .collect();
    let container = match cx.query.get("container").filter(|c| !c.is_empty()) {
        Some(c) => c.clone(),
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )));
        }
    };
    if !all.contains(&container) {
        return Err(ApiError::bad_request(format!(
            "container {container} is not valid for pod {name}"
        )));
    }
    let node = node.ok_or_else(|| {
        ApiError::bad_request(format!("pod {name} does not have a host assigned"))
    })?;
    let ip = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a.get("address").and_then(Value::as_str))
        .ok_or_else(|| {
            ApiError::internal(format!(
                "node {} has no InternalIP",
                crate::util::name_of(&node)
            ))
        })?
        .to_owned();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    let query: Vec<String> = OPTIONS
        .iter()
        .filter_map(|k| cx.query.get(*k).map(|v| format!("{k}={v}")))
        .collect();
    let path = format!(
        "/containerLogs/{}/{name}/{container}{}{}",
        cx.ns,
        if query.is_empty() { "" } else { "?" },
        query.join("&")
    );
    let ep = Endpoint {
        connect: format!("{ip}:{port}"),
        server_name: ip.clone(),
        path: path.clone(),
        ca_pem: String::new(),
        insecure: true,
    };
    let req = http::Request::get(path)
        .header(http::header::HOST, ip)
        .body(Full::new(Bytes::new()))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let resp = send_as(&ep, req, Some(&cx.core.auth.kubelet_client))
        .await
        .map_err(|e| ApiError::internal(format!("failed to get the log from the kubelet: {e}")))?;
    let (mut parts, body) = resp.into_parts();
    if !parts.status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        return Err(ApiError::bad_request(text));
    }
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(Response::from_parts(
        parts,
        body.map_err(|e| Box::new(e) as BodyError).boxed(),
    ))
}
