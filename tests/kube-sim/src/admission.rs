//! Calls out of the server: admission webhooks (`AdmissionReview` v1 over HTTPS, mutations
//! applied as JSON patches) and the aggregation layer (requests for an APIService's
//! group/version proxied to its backing Service).

use crate::Core;
use crate::handlers::Ctx;
use crate::selectors::LabelSelector;
use crate::server::{Body, BodyError, error_response};
use crate::status::{ApiError, ApiResult};
use crate::store::key;
use crate::util::*;
use base64::Engine;
use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Where to reach a webhook or an aggregated API server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub connect: String,
    pub server_name: String,
    pub path: String,
    pub ca_pem: String,
    pub insecure: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("failed to resolve the service address: {0}")]
    ResolveService(String),
    #[error("failed to connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("failed to set up TLS: {0}")]
    SetUpTls(#[from] crate::tls::TlsError),
    #[error("failed the TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("failed the HTTP exchange: {0}")]
    Exchange(#[from] hyper::Error),
    #[error("failed to build the request: {0}")]
    BuildRequest(#[from] http::Error),
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

/// An explicit stand-in address for a Service port, when kube-sim runs without a cluster
/// behind it: [`crate::Options::service_addresses`], [`crate::KubeSim::map_service`] or the
/// Service's annotation.
pub(crate) fn mapped_address(core: &Core, ns: &str, name: &str, port: i64) -> Option<String> {
    let st = core.lock();
    let k = format!("{ns}/{name}:{port}");
    if let Some(a) = st
        .service_map
        .get(&k)
        .or_else(|| core.opts.service_addresses.get(&k))
    {
        return Some(a.clone());
    }
    st.get(&crate::handlers::gr("", "services"), &key(ns, name))?
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(crate::ADDRESS_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The EndpointSlices of a Service: those labelled `kubernetes.io/service-name=<name>` in its
/// namespace (the index kube-apiserver's `EndpointSliceGetter` keeps).
pub(crate) fn endpoint_slices(st: &crate::store::State, ns: &str, name: &str) -> Vec<Arc<Value>> {
    st.tables
        .get(&crate::handlers::gr("discovery.k8s.io", "endpointslices"))
        .map(|t| {
            t.objects
                .values()
                .filter(|s| {
                    namespace_of(s) == ns
                        && labels_of(s)
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            .and_then(Value::as_str)
                            == Some(name)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The name of the Service's port numbered `port` (`findServicePort`), `""` when unnamed.
pub(crate) fn service_port_name(svc: &Value, port: i64) -> Option<String> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p.get("port").and_then(Value::as_i64) == Some(port))
        .map(|p| {
            p.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        })
}

pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Resolves a Service port to one of its ready endpoints, as kube-apiserver does with
/// `--enable-aggregator-routing=true` (the docs' setting for an API server with no kube-proxy
/// on its host, as here) for both aggregated APIs and webhooks [apiserver:
/// pkg/util/proxy/proxy.go `ResolveEndpoint`; kube-apiserver `buildServiceResolver`]: the
/// Service's port by number gives the port name; an endpoint whose `ready` is not false, of a
/// slice with a port of that name, is picked at random. An explicit mapping (no cluster behind
/// kube-sim) comes first.
pub(crate) fn resolve_service(
    core: &Core,
    ns: &str,
    name: &str,
    port: i64,
) -> Result<String, CallError> {
    if let Some(a) = mapped_address(core, ns, name, port) {
        return Ok(a);
    }
    let st = core.lock();
    let svc = st
        .get(&crate::handlers::gr("", "services"), &key(ns, name))
        .ok_or_else(|| CallError::ResolveService(format!("service \"{name}\" not found")))?;
    let spec = svc.get("spec").cloned().unwrap_or(json!({}));
    let typ = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !matches!(typ, "ClusterIP" | "LoadBalancer" | "NodePort") {
        return Err(CallError::ResolveService(format!(
            "unsupported service type \"{typ}\""
        )));
    }
    let port_name = service_port_name(&svc, port).ok_or_else(|| {
        CallError::ResolveService(format!(
            "no service port {port} found for service \"{name}\""
        ))
    })?;
    let mut ready = Vec::new();
    for slice in endpoint_slices(&st, ns, name) {
        let Some(target) = slice
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str).unwrap_or("") == port_name)
            .and_then(|p| p.get("port").and_then(Value::as_i64))
        else {
            continue;
        };
        for ep in slice
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if ep.pointer("/conditions/ready").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            for a in ep
                .get("addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                ready.push(format!("{a}:{target}"));
            }
        }
    }
    if ready.is_empty() {
        return Err(CallError::ResolveService(format!(
            "no endpoints available for service \"{name}\""
        )));
    }
    let i = usize::try_from(random_u64() % ready.len() as u64).unwrap_or(0);
    Ok(ready.swap_remove(i))
}

fn endpoint(core: &Core, cc: &Value, default_port: i64) -> Result<Endpoint, CallError> {
    let ca_pem = cc
        .get("caBundle")
        .and_then(Value::as_str)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if let Some(url) = cc.get("url").and_then(Value::as_str) {
        let rest = url.strip_prefix("https://").unwrap_or(url);
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = hostport
            .rsplit_once(':')
            .map_or(hostport, |(h, _)| h)
            .trim_matches(['[', ']']);
        let connect = if hostport.contains(':') {
            hostport.to_owned()
        } else {
            format!("{hostport}:443")
        };
        return Ok(Endpoint {
            connect,
            server_name: host.to_owned(),
            path: path.to_owned(),
            ca_pem,
            insecure: false,
        });
    }
    let svc = cc.get("service").cloned().unwrap_or(json!({}));
    let ns = svc.get("namespace").and_then(Value::as_str).unwrap_or("");
    let name = svc.get("name").and_then(Value::as_str).unwrap_or("");
    let port = svc
        .get("port")
        .and_then(Value::as_i64)
        .unwrap_or(default_port);
    Ok(Endpoint {
        connect: resolve_service(core, ns, name, port)?,
        server_name: format!("{name}.{ns}.svc"),
        path: svc
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_owned(),
        ca_pem,
        insecure: false,
    })
}

/// Sends one request over a fresh TLS connection.
pub async fn send<B>(
    ep: &Endpoint,
    req: http::Request<B>,
) -> Result<Response<hyper::body::Incoming>, CallError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    send_as(ep, req, None).await
}

/// Like [`send`], presenting `cert` if the server asks for a client certificate.
pub async fn send_as<B>(
    ep: &Endpoint,
    req: http::Request<B>,
    cert: Option<&crate::tls::ClientCert>,
) -> Result<Response<hyper::body::Incoming>, CallError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(&ep.connect)
        .await
        .map_err(|source| CallError::Connect {
            addr: ep.connect.clone(),
            source,
        })?;
    let cfg = crate::tls::client_config_with_cert(&ep.ca_pem, ep.insecure, cert)?;
    let name = crate::tls::server_name(&ep.server_name)?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(CallError::Handshake)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "outbound connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

async fn post_json(ep: &Endpoint, body: &Value, timeout: Duration) -> Result<Value, String> {
    let fut = async {
        let req = http::Request::post(ep.path.clone())
            .header(http::header::HOST, ep.server_name.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(CallError::from)?;
        let resp = send(ep, req).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(CallError::from)?
            .to_bytes();
        Ok::<_, CallError>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| CallError::TimedOut(timeout).to_string())?
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("the server responded with status {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("failed to decode the response: {e}"))
}

fn rule_matches(rule: &Value, cx: &Ctx, op: &str, sub: &str) -> bool {
    let has = |k: &str, want: &str| {
        rule.get(k)
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "*" || x == want))
    };
    let resource = if sub.is_empty() {
        cx.def.plural.clone()
    } else {
        format!("{}/{sub}", cx.def.plural)
    };
    let res_ok = rule
        .get("resources")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter().filter_map(Value::as_str).any(|r| {
                r == resource
                    || r == "*/*"
                    || (r == "*" && sub.is_empty())
                    || (sub.is_empty() && r == cx.def.plural)
                    || r.strip_prefix("*/").is_some_and(|s| s == sub)
                    || r.strip_suffix("/*").is_some_and(|p| p == cx.def.plural)
            })
        });
    let scope_ok = match rule.get("scope").and_then(Value::as_str) {
        Some("Cluster") => !cx.def.namespaced,
        Some("Namespaced") => cx.def.namespaced,
        _ => true,
    };
    has("apiGroups", &cx.def.group)
        && has("apiVersions", &cx.def.version)
        && res_ok
        && has("operations", op)
        && scope_ok
}

fn webhook_matches(
    core: &Core,
    wh: &Value,
    cx: &Ctx,
    op: &str,
    sub: &str,
    obj: Option<&Value>,
    old: Option<&Value>,
) -> bool {
    let rules = wh
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !rules.iter().any(|r| rule_matches(r, cx, op, sub)) {
        return false;
    }
    if let Some(ns_sel) = wh.get("namespaceSelector") {
        let sel = LabelSelector::from_object(ns_sel);
        if !sel.is_empty() {
            let labels: Option<Value> = if cx.def.group.is_empty() && cx.def.plural == "namespaces"
            {
                obj.or(old)
                    .and_then(|o| o.pointer("/metadata/labels"))
                    .cloned()
            } else if cx.def.namespaced {
                core.lock()
                    .get(&crate::handlers::gr("", "namespaces"), &key("", &cx.ns))
                    .and_then(|n| n.pointer("/metadata/labels").cloned())
            } else {
                None
            };
            let cluster_scoped_other =
                !(cx.def.namespaced || (cx.def.group.is_empty() && cx.def.plural == "namespaces"));
            if !cluster_scoped_other && !sel.matches(labels.as_ref().and_then(Value::as_object)) {
                return false;
            }
        }
    }
    if let Some(o_sel) = wh.get("objectSelector") {
        let sel = LabelSelector::from_object(o_sel);
        if !sel.is_empty() {
            let m = |o: Option<&Value>| o.is_some_and(|o| sel.matches(labels_of(o)));
            if !(m(obj) || m(old)) {
                return false;
            }
        }
    }
    true
}

fn denial(name: &str, status: Option<&Value>) -> ApiError {
    let st = status.cloned().unwrap_or(json!({}));
    let mut code = st.get("code").and_then(Value::as_u64).unwrap_or(0) as u16;
    if code < 400 {
        code = 400;
    }
    let reason = match st.get("reason").and_then(Value::as_str).unwrap_or("") {
        "Forbidden" => "Forbidden",
        "BadRequest" => "BadRequest",
        "Invalid" => "Invalid",
        "Conflict" => "Conflict",
        "NotFound" => "NotFound",
        "Unauthorized" => "Unauthorized",
        "AlreadyExists" => "AlreadyExists",
        _ => "",
    };
    let denied = format!("admission webhook \"{name}\" denied the request");
    let msg = st.get("message").and_then(Value::as_str).unwrap_or("");
    let message = if !msg.is_empty() {
        format!("{denied}: {msg}")
    } else if !reason.is_empty() {
        format!("{denied}: {reason}")
    } else {
        format!("{denied} without explanation")
    };
    let mut e = ApiError::new(code, reason, message);
    e.details = st.get("details").cloned();
    e
}

/// Runs mutating then validating webhooks for a write. Returns the (possibly mutated) object.
pub async fn admit(
    cx: &Ctx,
    op: &str,
    sub: &str,
    obj: Option<Value>,
    old: Option<&Value>,
) -> ApiResult<Option<Value>> {
    // Webhook configurations are never subject to webhooks, so they cannot lock themselves out.
    if cx.def.group == "admissionregistration.k8s.io" {
        return Ok(obj);
    }
    let (mutating, validating) = {
        let st = cx.core.lock();
        let collect = |plural: &str| -> Vec<Value> {
            st.tables
                .get(&crate::handlers::gr("admissionregistration.k8s.io", plural))
                .map(|t| {
                    t.objects
                        .values()
                        .flat_map(|c| {
                            c.get("webhooks")
                                .and_then(Value::as_array)
                                .cloned()
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        (
            collect("mutatingwebhookconfigurations"),
            collect("validatingwebhookconfigurations"),
        )
    };
    if mutating.is_empty() && validating.is_empty() {
        return Ok(obj);
    }
    let mut obj = obj;
    for (hooks, mutate) in [(mutating, true), (validating, false)] {
        for wh in hooks {
            if !webhook_matches(&cx.core, &wh, cx, op, sub, obj.as_ref(), old) {
                continue;
            }
            let name = wh
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let uid = new_uid();
            let name_of_req = obj
                .as_ref()
                .or(old)
                .map(|o| name_of(o).to_owned())
                .unwrap_or_default();
            let gvk =
                json!({"group": cx.def.group, "version": cx.def.version, "kind": cx.def.kind});
            let gvr = json!({"group": cx.def.group, "version": cx.def.version, "resource": cx.def.plural});
            let mut request = json!({
                "uid": uid, "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
                "name": name_of_req, "operation": op,
                "userInfo": cx.user.to_json(),
                "object": obj.clone().unwrap_or(Value::Null),
                "oldObject": old.cloned().unwrap_or(Value::Null),
                "dryRun": cx.query.get("dryRun").is_some_and(|d| d == "All"),
                "options": {"kind": match op { "CREATE" => "CreateOptions", "UPDATE" => "UpdateOptions", _ => "DeleteOptions" }, "apiVersion": "meta.k8s.io/v1"},
            });
            if cx.def.namespaced {
                request["namespace"] = json!(cx.ns);
            }
            if !sub.is_empty() {
                request["subResource"] = json!(sub);
            }
            let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request});
            let timeout = Duration::from_secs(
                wh.get("timeoutSeconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(10),
            );
            let fail_open = wh.get("failurePolicy").and_then(Value::as_str) == Some("Ignore");
            let cc = wh.get("clientConfig").cloned().unwrap_or(json!({}));
            let result = match endpoint(&cx.core, &cc, 443) {
                Ok(ep) => post_json(&ep, &review, timeout).await,
                Err(e) => Err(e.to_string()),
            };
            let resp = match result {
                Ok(r) => r,
                Err(error) if fail_open => {
                    tracing::warn!(webhook = %name, %error, "ignoring a failed webhook call (failurePolicy Ignore)");
                    continue;
                }
                Err(error) => {
                    return Err(ApiError::internal(format!(
                        "failed calling webhook \"{name}\": failed to call webhook: {error}"
                    )));
                }
            };
            let r = resp.get("response").cloned().unwrap_or(json!({}));
            if r.get("uid").and_then(Value::as_str) != Some(uid.as_str()) && !fail_open {
                return Err(ApiError::internal(format!(
                    "failed calling webhook \"{name}\": expected response.uid=\"{uid}\""
                )));
            }
            if r.get("allowed").and_then(Value::as_bool) != Some(true) {
                return Err(denial(&name, r.get("status")));
            }
            if mutate
                && let (Some(p), Some(o)) = (r.get("patch").and_then(Value::as_str), obj.as_mut())
            {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(p)
                    .map_err(|e| {
                        ApiError::internal(format!(
                            "failed calling webhook \"{name}\": invalid patch: {e}"
                        ))
                    })?;
                *o = crate::patch::json_patch(o, &raw).map_err(|e| {
                    ApiError::internal(format!(
                        "failed calling webhook \"{name}\": failed to apply the patch: {}",
                        e.message
                    ))
                })?;
            }
        }
    }
    Ok(obj)
}

/// The aggregated API server behind `/apis/<group>/<version>`, if an APIService names one.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoint: Endpoint,
}

pub fn aggregated_target(core: &Core, path: &str) -> Option<Target> {
    let mut segs = path.trim_start_matches('/').split('/');
    if segs.next()? != "apis" {
        return None;
    }
    let (g, v) = (segs.next()?, segs.next()?);
    let st = core.lock();
    let svc = st.get(
        &crate::handlers::gr("apiregistration.k8s.io", "apiservices"),
        &key("", &format!("{v}.{g}")),
    )?;
    drop(st);
    target_of(core, &svc)
}

fn target_of(core: &Core, svc: &Value) -> Option<Target> {
    let spec = svc.get("spec")?;
    if spec.get("service").is_none_or(Value::is_null) {
        return None;
    }
    // Requests for an APIService that is not Available are refused before any dial
    // [kube-aggregator: pkg/apiserver/handler_proxy.go `ServeHTTP`].
    let available = svc
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Available" && c["status"] == "True")
        });
    let unreachable = |why: String| Endpoint {
        connect: String::new(),
        server_name: why,
        path: String::new(),
        ca_pem: String::new(),
        insecure: false,
    };
    let mut ep = if available {
        endpoint(core, spec, 443).unwrap_or_else(|e| unreachable(e.to_string()))
    } else {
        unreachable(format!("APIService {} is not available", name_of(svc)))
    };
    ep.insecure = spec.get("insecureSkipTLSVerify").and_then(Value::as_bool) == Some(true);
    Some(Target { endpoint: ep })
}

/// Forwards a request to an aggregated API server and streams its answer back. The
/// aggregator presents the front-proxy client certificate and says who the caller is in
/// `X-Remote-*` headers (whatever such headers the caller sent are dropped).
pub async fn proxy(
    core: &Arc<Core>,
    target: Target,
    req: http::Request<hyper::body::Incoming>,
    user: &crate::auth::UserInfo,
) -> Response<Body> {
    let ep = target.endpoint;
    if ep.connect.is_empty() {
        // `proxyError(w, req, "service unavailable", 503)`: a plain-text body, the cause only
        // in the server's log.
        tracing::debug!(why = %ep.server_name, "aggregated request refused");
        return plain_response(503, "service unavailable\n");
    }
    let (parts, body) = req.into_parts();
    let mut builder = http::Request::builder()
        .method(parts.method)
        .uri(
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
        )
        .header(http::header::HOST, ep.server_name.clone())
        .header("X-Remote-User", user.name.as_str());
    for g in &user.groups {
        builder = builder.header("X-Remote-Group", g.as_str());
    }
    for (k, vs) in &user.extra {
        let name = format!("X-Remote-Extra-{}", header_key_escape(k));
        for v in vs {
            builder = builder.header(name.as_str(), v.as_str());
        }
    }
    for (k, v) in parts.headers.iter() {
        if matches!(
            k.as_str(),
            "content-type" | "accept" | "user-agent" | "content-length"
        ) {
            builder = builder.header(k, v);
        }
    }
    let req = match builder.body(body) {
        Ok(r) => r,
        Err(e) => return error_response(&ApiError::internal(e.to_string())),
    };
    match send_as(&ep, req, Some(&core.auth.front_proxy_client)).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, body.map_err(|e| Box::new(e) as BodyError).boxed())
        }
        // The aggregator's `responder.Error`: the dial or TLS error as plain text, 503.
        Err(e) => plain_response(503, format!("{e}\n")),
    }
}

fn plain_response(code: u16, text: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(text.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Escapes an extra key for a header name as client-go does: bytes that are not header token
/// characters (and `%` itself) become `%XX`.
fn header_key_escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let token = b.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&b);
        if token {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Group/versions served by aggregated API servers; with `fetch`, their resource lists too.
pub async fn aggregated_apis(core: &Arc<Core>, fetch: bool) -> Vec<crate::discovery::Aggregated> {
    let services: Vec<Value> = {
        let st = core.lock();
        st.tables
            .get(&crate::handlers::gr(
                "apiregistration.k8s.io",
                "apiservices",
            ))
            .map(|t| t.objects.values().map(|o| (**o).clone()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for svc in services {
        let Some(target) = target_of(core, &svc) else {
            continue;
        };
        let group = svc
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let version = svc
            .pointer("/spec/version")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let resources = if fetch && !target.endpoint.connect.is_empty() {
            let ep = target.endpoint.clone();
            let path = format!("/apis/{group}/{version}");
            let fut = async move {
                // The aggregator's own discovery user.
                let req = http::Request::get(path)
                    .header(http::header::ACCEPT, "application/json")
                    .header("X-Remote-User", "system:kube-aggregator")
                    .header("X-Remote-Group", crate::auth::MASTERS)
                    .body(Full::new(Bytes::new()))
                    .ok()?;
                let resp = send_as(&ep, req, Some(&core.auth.front_proxy_client))
                    .await
                    .ok()?;
                let bytes = resp.into_body().collect().await.ok()?.to_bytes();
                serde_json::from_slice::<Value>(&bytes).ok()
            };
            tokio::time::timeout(Duration::from_secs(2), fut)
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        out.push(crate::discovery::Aggregated {
            group,
            version,
            resources,
        });
    }
    out
}
