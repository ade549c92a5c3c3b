//! HTTP plumbing: the accept loop (plain or TLS), request parsing, routing to handlers, and
//! turning every failure into a `Status` response so no request panics or hangs.

use crate::Core;
use crate::auth::{self, UserInfo};
use crate::discovery;
use crate::handlers::{self, Ctx};
use crate::rbac;
use crate::status::{ApiError, ApiResult};
use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BodyError>;

/// Largest request body accepted, as the real server's 3 MiB limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

pub async fn serve(core: Arc<Core>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut shutdown = core.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(error) => {
                tracing::warn!(%error, "failed to accept a connection");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let core = core.clone();
        let acceptor = acceptor.clone();
        let mut shutdown = core.shutdown.clone();
        tokio::spawn(async move {
            let builder = hyper::server::conn::http1::Builder::new();
            let result = match acceptor {
                Some(acc) => match acc.accept(stream).await {
                    Ok(tls) => {
                        // A client certificate rustls verified against the cluster CA.
                        let peer_user = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| crate::tls::subject_of(c.as_ref()))
                            .map(Arc::new);
                        let svc = service(core, peer_user);
                        let conn = builder.serve_connection(TokioIo::new(tls), svc);
                        tokio::select! { r = conn => r, _ = shutdown.changed() => Ok(()) }
                    }
                    Err(error) => {
                        tracing::debug!(%error, %peer, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service(core, None));
                    tokio::select! { r = conn => r, _ = shutdown.changed() => Ok(()) }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
}

type PeerUser = Option<Arc<(String, Vec<String>)>>;

fn service(
    core: Arc<Core>,
    peer_user: PeerUser,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        let core = core.clone();
        let peer_user = peer_user.clone();
        async move { Ok::<_, Infallible>(handle(core, peer_user, req).await) }
    })
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn json_response(code: u16, v: &Value) -> Response<Body> {
    json_response_typed(code, v, "application/json")
}

pub fn json_response_typed(code: u16, v: &Value, content_type: &str) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(ct) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) if hex.len() == 2 => {
                        out.push(v);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        m.insert(percent_decode(k), percent_decode(v));
    }
    m
}

fn header(h: &HeaderMap, name: http::header::HeaderName) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Authentication (with impersonation): who the request acts as.
fn identify(core: &Core, headers: &HeaderMap, peer_user: &PeerUser) -> ApiResult<UserInfo> {
    let user = auth::authenticate(core, headers, peer_user.as_deref(), core.opts.tls)?;
    Ok(auth::impersonate(core, &user, headers)?.unwrap_or(user))
}

async fn handle(
    core: Arc<Core>,
    peer_user: PeerUser,
    req: http::Request<Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let query = parse_query(req.uri().query());
    let headers = req.headers().clone();
    let started = std::time::Instant::now();
    // The filter chain of the real server: authenticate, impersonate, authorize.
    let user = match identify(&core, &headers, &peer_user) {
        Ok(u) => u,
        Err(e) => return error_response(&e),
    };
    let attrs = rbac::attributes(&method, &path, &query);
    {
        let what = if attrs.resource_request {
            if attrs.subresource.is_empty() {
                format!("{} {}", attrs.verb, attrs.resource)
            } else {
                format!("{} {}/{}", attrs.verb, attrs.resource, attrs.subresource)
            }
        } else {
            format!("{} {}", attrs.verb, attrs.path)
        };
        *core
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }
    if let rbac::Decision::Deny(reason) = rbac::authorize(&core, &user, &attrs) {
        return error_response(&rbac::forbidden(&user, &attrs, &reason));
    }
    // Aggregated APIs get the raw request, streamed.
    if let Some(target) = crate::admission::aggregated_target(&core, &path) {
        return crate::admission::proxy(&core, target, req, &user).await;
    }
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let resp = match route(core, &method, &path, query, &headers, body, user).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %path, query = %raw_query, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

async fn read_body(req: http::Request<Incoming>) -> ApiResult<Bytes> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("the request body could not be read: {e}"),
        )),
    }
}

async fn route(
    core: Arc<Core>,
    method: &Method,
    path: &str,
    query: HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
    user: UserInfo,
) -> ApiResult<Response<Body>> {
    let accept = header(headers, http::header::ACCEPT);
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let get_only = || -> ApiResult<()> {
        if method == Method::GET || method == Method::HEAD {
            Ok(())
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segs.as_slice() {
        ["version"] => {
            get_only()?;
            return Ok(json_response(200, &discovery::version_info()));
        }
        ["healthz" | "readyz" | "livez", ..] => {
            let mut r = Response::new(full("ok"));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return Ok(r);
        }
        ["openapi", "v2"] => {
            get_only()?;
            // client-go asks for protobuf only; JSON clients get JSON.
            if accept.contains("protobuf") && !accept.contains("json") {
                return Err(ApiError::not_acceptable("application/json"));
            }
            let st = core.lock();
            return Ok(json_response(200, &discovery::openapi_v2(&st.registry)));
        }
        ["openapi", "v3"] => {
            get_only()?;
            let epoch = core.epoch.load(std::sync::atomic::Ordering::Relaxed);
            let st = core.lock();
            return Ok(json_response(
                200,
                &discovery::openapi_v3_root(&st.registry, epoch),
            ));
        }
        ["openapi", "v3", "api", v] => {
            get_only()?;
            let st = core.lock();
            return Ok(json_response(
                200,
                &discovery::openapi_v3_gv(&st.registry, "", v),
            ));
        }
        ["openapi", "v3", "apis", g, v] => {
            get_only()?;
            let st = core.lock();
            if st.registry.in_group_version(g, v).is_empty() {
                return Err(ApiError::no_route());
            }
            return Ok(json_response(
                200,
                &discovery::openapi_v3_gv(&st.registry, g, v),
            ));
        }
        ["api"] | ["apis"] => {
            get_only()?;
            let legacy = segs[0] == "api";
            let agg = crate::admission::aggregated_apis(
                &core,
                discovery::aggregated_version(&accept).is_some(),
            )
            .await;
            let st = core.lock();
            if let Some(v) = discovery::aggregated_version(&accept) {
                let doc = discovery::aggregated(&st.registry, &agg, legacy, v);
                let ct = format!(
                    "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
                );
                return Ok(json_response_typed(200, &doc, &ct));
            }
            if legacy {
                let addr = core
                    .server_addr
                    .lock()
                    .map(|a| a.clone())
                    .unwrap_or_default();
                return Ok(json_response(200, &discovery::api_versions(&addr)));
            }
            return Ok(json_response(
                200,
                &discovery::api_group_list(&st.registry, &agg),
            ));
        }
        ["apis", g] => {
            get_only()?;
            let agg = crate::admission::aggregated_apis(&core, false).await;
            let st = core.lock();
            return discovery::api_group(&st.registry, &agg, g)
                .map(|v| json_response(200, &v))
                .ok_or_else(ApiError::no_route);
        }
        ["api", "v1"] | ["apis", _, _] => {
            get_only()?;
            let (g, v) = if segs[0] == "api" {
                ("", "v1")
            } else {
                (segs[1], segs[2])
            };
            let st = core.lock();
            let defs = st.registry.in_group_version(g, v);
            if defs.is_empty() {
                return Err(ApiError::no_route());
            }
            return Ok(json_response(200, &discovery::resource_list(&defs, g, v)));
        }
        _ => {}
    }
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Err(ApiError::no_route()),
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let registry_lookup = |plural: &str| core.lock().registry.get(group, version, plural);
    let (ns, plural, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if registry_lookup(plural).is_some_and(|d| d.namespaced) =>
        {
            (
                Some(*ns),
                *plural,
                tail.first().copied(),
                tail.get(1).copied(),
            )
        }
        [plural, tail @ ..] => (None, *plural, tail.first().copied(), tail.get(1).copied()),
        [] => return Err(ApiError::no_route()),
    };
    // At most `<plural>/<name>/<subresource>` after the optional namespace.
    let tail_len = rest.len() - if ns.is_some() { 3 } else { 1 };
    if tail_len > 2 {
        return Err(ApiError::no_route());
    }
    let def = registry_lookup(plural).ok_or_else(ApiError::no_route)?;
    if def.namespaced && ns.is_none() && name.is_some() {
        // A namespaced object addressed without a namespace.
        return Err(ApiError::no_route());
    }
    // A subresource the resource does not have is no route, whatever the method (so
    // `POST /api/v1/namespaces/default/frobs` is 404 like on the real server, not a 405 on
    // namespace "default"), and is refused before the object is looked up.
    if let Some(s) = sub {
        let served = match s {
            "status" => def.status,
            "scale" => def.scale.is_some(),
            "finalize" => def.group.is_empty() && def.plural == "namespaces",
            "token" => def.group.is_empty() && def.plural == "serviceaccounts",
            "binding" | "log" => def.group.is_empty() && def.plural == "pods",
            _ => false,
        };
        if !served {
            return Err(ApiError::no_route());
        }
    }
    let ctx = Ctx {
        core: core.clone(),
        def,
        ns: ns.unwrap_or("").to_owned(),
        all_namespaces: ns.is_none(),
        query,
        accept,
        content_type: header(headers, http::header::CONTENT_TYPE),
        user_agent: header(headers, http::header::USER_AGENT),
        user,
        warnings: Default::default(),
    };
    let mut resp = dispatch(
        &ctx,
        method,
        name,
        sub,
        is_watch_request(&ctx, watch_prefix),
        &body,
    )
    .await?;
    let warnings = ctx.warnings.lock().map(|w| w.clone()).unwrap_or_default();
    for w in warnings {
        if let Ok(v) = http::HeaderValue::from_str(&w) {
            resp.headers_mut().append(http::header::WARNING, v);
        }
    }
    Ok(resp)
}

fn is_watch_request(ctx: &Ctx, watch_prefix: bool) -> bool {
    watch_prefix
        || matches!(
            ctx.query.get("watch").map(String::as_str),
            Some("true" | "1")
        )
}

async fn dispatch(
    ctx: &Ctx,
    method: &Method,
    name: Option<&str>,
    sub: Option<&str>,
    is_watch: bool,
    body: &[u8],
) -> ApiResult<Response<Body>> {
    if sub == Some("token") || ctx.def.create_only {
        return create_only(ctx, method, name, sub, body);
    }
    match (method.clone(), name, sub) {
        (Method::GET, None, None) if is_watch => crate::watch::serve(ctx, None).await,
        (Method::GET, Some(n), None) if is_watch => crate::watch::serve(ctx, Some(n)).await,
        (Method::GET, None, None) => handlers::list(ctx),
        (Method::GET, Some(n), Some("log")) => crate::logs::pod_log(ctx, n).await,
        (Method::GET, Some(n), sub) => handlers::get(ctx, n, sub.unwrap_or("")),
        (Method::POST, Some(n), Some("binding")) => handlers::bind_pod(ctx, n, body).await,
        (Method::POST, None, None) => {
            if ctx.def.namespaced && ctx.all_namespaces {
                return Err(ApiError::method_not_allowed());
            }
            handlers::create(ctx, body).await
        }
        (Method::PUT, Some(n), sub) => handlers::update(ctx, n, sub.unwrap_or(""), body).await,
        (Method::PATCH, Some(n), sub) => handlers::patch(ctx, n, sub.unwrap_or(""), body).await,
        (Method::DELETE, Some(n), None) => handlers::delete(ctx, n, body).await,
        (Method::DELETE, None, None) => handlers::delete_collection(ctx, body).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// The kinds that are only ever created and answered, never stored: TokenRequest and the
/// access and token reviews.
fn create_only(
    ctx: &Ctx,
    method: &Method,
    name: Option<&str>,
    sub: Option<&str>,
    body: &[u8],
) -> ApiResult<Response<Body>> {
    if *method != Method::POST || (sub.is_none() && name.is_some()) {
        return Err(ApiError::method_not_allowed());
    }
    let req = handlers::parse_body(body, &ctx.content_type)?;
    let answer = match (sub, name) {
        (Some(_), Some(sa)) => auth::token_request(&ctx.core, &ctx.ns, sa, req)?,
        _ => rbac::review(
            &ctx.core,
            &ctx.user,
            &ctx.def.group,
            &ctx.def.plural,
            &ctx.ns,
            req,
        )
        .unwrap_or_else(|| Err(ApiError::method_not_allowed()))?,
    };
    Ok(json_response(201, &answer))
}
