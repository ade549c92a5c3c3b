//! The HTTPS server of the Snapshot API: TLS with the front proxy's client certificate, then
//! authentication from its headers, a SubjectAccessReview per request, and the handlers
//! (discovery, OpenAPI, get, list, watch, delete), which read the index and never a backend
//! (delete runs `restic forget --prune`, as it must).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::auth::{self, Authorizer, FrontProxy, User};
use super::cert::Serving;
use super::index::{Change, ChangeKind, Index};
use super::object::{
    self, Attributes, GROUP, IncludeObject, IndexedSnapshot, REPOSITORY_GROUP, REPOSITORY_RESOURCE,
    RESOURCE, VERSION,
};
use super::query::{ListOptions, page};
use super::refresh::Refresher;
use crate::context::RepoLocks;
use crate::error::Error;

pub type Body = BoxBody<Bytes, Infallible>;

/// How long a watch without `timeoutSeconds` runs before the server ends it (the client
/// then resumes from the last resourceVersion it saw), as the API server's default.
const WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a delete waits for the repository's Lease before it answers 409.
const LEASE_WAIT: Duration = Duration::from_secs(60);

/// What every request shares.
pub struct SnapshotApi {
    pub index: Arc<Index>,
    pub refresher: Arc<Refresher>,
    pub authorizer: Authorizer,
    pub front_proxy: FrontProxy,
    pub client: kube::Client,
    pub args: crate::cli::RunArgs,
    pub locks: RepoLocks,
}

impl std::fmt::Debug for SnapshotApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotApi").finish_non_exhaustive()
    }
}

fn tls_failed(e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        action: "build the Snapshot API's TLS configuration",
        reason: e.to_string(),
    }
}

/// The server's TLS: its serving certificate, and client certificates verified against the
/// front-proxy CA when presented (a request without one is refused later, with a Status).
pub fn tls_config(
    serving: &Serving,
    front_proxy: &FrontProxy,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(tls_failed)?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(tls_failed)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(front_proxy.client_ca_pem.as_bytes()) {
        roots.add(c.map_err(tls_failed)?).map_err(tls_failed)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(tls_failed)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_failed)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(tls_failed)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Accepts connections until the listener fails, each with the TLS configuration current
/// when it arrives (a renewed certificate applies to the next connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
    api: Arc<SnapshotApi>,
) -> Result<(), Error> {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%error, "the Snapshot API cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
        let api = api.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| auth::common_name(c.as_ref()));
            let svc = hyper::service::service_fn(move |req| {
                let (api, peer) = (api.clone(), peer.clone());
                async move { Ok::<_, Infallible>(handle(&api, peer.as_deref(), req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    body_response(code, v.to_string().into_bytes())
}

fn body_response(code: u16, json: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(json)).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn status_response(v: &Value) -> Response<Body> {
    let code = v.get("code").and_then(Value::as_u64).unwrap_or(500) as u16;
    json_response(code, v)
}

fn internal(message: &str) -> Response<Body> {
    status_response(&object::status_failure(500, "InternalError", message, None))
}

fn wants_table(req: &Request<hyper::body::Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            // The first acceptable type wins; the Table is asked for first when wanted.
            v.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

/// The resource request a path names.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Collection {
        namespace: Option<&'a str>,
        watch_path: bool,
    },
    Object {
        namespace: &'a str,
        name: &'a str,
    },
}

fn resource_target(rest: &str) -> Option<Target<'_>> {
    let (watch_path, rest) = match rest.strip_prefix("watch/") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        [r] if *r == RESOURCE => Some(Target::Collection {
            namespace: None,
            watch_path,
        }),
        ["namespaces", ns, r] if *r == RESOURCE => Some(Target::Collection {
            namespace: Some(ns),
            watch_path,
        }),
        ["namespaces", ns, r, name] if *r == RESOURCE && !watch_path => Some(Target::Object {
            namespace: ns,
            name,
        }),
        _ => None,
    }
}

async fn handle(
    api: &SnapshotApi,
    peer: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        return r;
    }
    // Only a certificate from the front proxy may name a user: anything else is anonymous,
    // which this server does not serve.
    let user = match auth::allowed_proxy(&api.front_proxy, peer)
        .then(|| auth::user_from_headers(&api.front_proxy, req.headers()))
        .flatten()
    {
        Some(u) => u,
        None => return status_response(&object::unauthorized()),
    };
    let gv = format!("/apis/{GROUP}/{VERSION}");
    match path.as_str() {
        "/apis" => return json_response(200, &object::api_group_list()),
        p if p == format!("/apis/{GROUP}") => return json_response(200, &object::api_group()),
        p if p == gv => return json_response(200, &object::api_resource_list()),
        "/openapi/v2" => return json_response(200, &object::openapi_v2()),
        "/openapi/v3" => return json_response(200, &object::openapi_v3_index()),
        p if p == format!("/openapi/v3{gv}") => return json_response(200, &object::openapi_v3()),
        _ => {}
    }
    let Some(target) = path
        .strip_prefix(&format!("{gv}/"))
        .and_then(resource_target)
    else {
        return status_response(&object::status_failure(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ));
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let opts = match ListOptions::parse(&query) {
        Ok(o) => o,
        Err(e) => return status_response(&object::bad_request(&e)),
    };
    let table = wants_table(&req);
    let method = req.method().clone();
    let (verb, namespace, name) = match (&target, &method) {
        (
            Target::Collection {
                namespace,
                watch_path,
            },
            &Method::GET,
        ) => (
            if opts.watch || *watch_path {
                "watch"
            } else {
                "list"
            },
            namespace.unwrap_or(""),
            "",
        ),
        (Target::Object { namespace, name }, &Method::GET) => ("get", *namespace, *name),
        (Target::Object { namespace, name }, &Method::DELETE) => ("delete", *namespace, *name),
        _ => {
            return status_response(&object::status_failure(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                Some(json!({"group": GROUP, "kind": RESOURCE})),
            ));
        }
    };
    let attrs = Attributes {
        verb: verb.into(),
        group: GROUP.into(),
        resource: RESOURCE.into(),
        namespace: namespace.into(),
        name: name.into(),
    };
    if let Some(refused) = authorize(api, &user, &attrs).await {
        return refused;
    }
    let include = IncludeObject::parse(opts.include_object.as_deref());
    let started = Instant::now();
    let mut resp = match (verb, target) {
        ("get", Target::Object { namespace, name }) => match api.index.get(namespace, name) {
            Some(s) if table => json_response(
                200,
                &object::build_table(&[&s], api.index.resource_version(), None, include),
            ),
            Some(s) => json_response(200, &object::build_snapshot(&s)),
            None => status_response(&object::not_found(name)),
        },
        ("delete", Target::Object { namespace, name }) => delete(api, namespace, name).await,
        ("watch", Target::Collection { namespace, .. }) => {
            return watch(api, namespace.map(str::to_owned), opts, table, include);
        }
        (_, Target::Collection { namespace, .. }) => {
            let (rv, items) = api.index.list(namespace, &opts);
            let refs: Vec<&IndexedSnapshot> = items.iter().map(|s| &**s).collect();
            let (items, cont) = page(refs, &opts, rv);
            if table {
                body_response(200, object::table_body(&items, rv, cont, include))
            } else {
                json_response(200, &object::build_list(&items, rv, cont))
            }
        }
        _ => internal("unroutable request"),
    };
    // What the server itself took (Server-Timing, a standard header): the benchmark reads it.
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!(
        "{verb};dur={:.3}",
        started.elapsed().as_secs_f64() * 1000.0
    )) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

/// The SubjectAccessReviews of a request: the request itself, then `get` on the Repositories
/// of its namespace, since a Snapshot is a view into a Repository. `None`: allowed.
async fn authorize(api: &SnapshotApi, user: &User, attrs: &Attributes) -> Option<Response<Body>> {
    let repository = Attributes {
        verb: "get".into(),
        group: REPOSITORY_GROUP.into(),
        resource: REPOSITORY_RESOURCE.into(),
        namespace: attrs.namespace.clone(),
        name: String::new(),
    };
    for a in [attrs, &repository] {
        match api.authorizer.authorize(user, a).await {
            Ok((true, _)) => {}
            Ok((false, reason)) => {
                return Some(status_response(&object::forbidden(&user.name, a, &reason)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot authorise a Snapshot API request");
                return Some(internal(&e.to_string()));
            }
        }
    }
    None
}

/// `restic forget --prune` of one snapshot, holding the repository's in-process lock and
/// Lease as retention does, then a fresh listing so watchers see it go.
async fn delete(api: &SnapshotApi, namespace: &str, name: &str) -> Response<Body> {
    let Some(snap) = api.index.get(namespace, name) else {
        return status_response(&object::not_found(name));
    };
    let key = crate::repository::repo_key(namespace, &snap.repository);
    let Some(repo) = api
        .refresher
        .repositories()
        .get(&ObjectRef::new(&snap.repository).within(namespace))
    else {
        return status_response(&object::not_found(name));
    };
    let opened = match crate::repository::open_with(&api.client, &api.args, &repo).await {
        Ok(o) => o,
        Err(e) => return internal(&format!("failed to open Repository {key}: {e}")),
    };
    let lock = api.locks.get(&key);
    let _in_process = lock.write().await;
    let deadline = Instant::now() + LEASE_WAIT;
    let _lease = loop {
        match crate::repo_lease::acquire_with(
            &api.client,
            &api.args.namespace,
            &api.args.pod_name,
            &key,
        )
        .await
        {
            Ok(Some(held)) => break held,
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(None) => {
                return status_response(&object::status_failure(
                    409,
                    "Conflict",
                    &format!(
                        "the repository {} is busy: its Lease is held (a backup's retention or another delete); try again",
                        repo.name_any()
                    ),
                    Some(json!({"name": name, "group": GROUP, "kind": RESOURCE})),
                ));
            }
            Err(e) => return internal(&e.to_string()),
        }
    };
    let restic = opened.restic.with_retry_lock(LEASE_WAIT);
    if let Err(e) = restic
        .forget_snapshots(std::slice::from_ref(&snap.snapshot.id), true)
        .await
    {
        return internal(&format!("failed to forget the snapshot {name}: {e}"));
    }
    tracing::info!(repository = %key, snapshot = %snap.snapshot.id, "forgot and pruned a snapshot");
    api.refresher.refresh(&key).await;
    json_response(
        200,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "group": GROUP, "kind": RESOURCE, "uid": snap.snapshot.id},
        }),
    )
}

/// The object of a watch event: the Snapshot, or a one-row Table.
fn event_object(s: &IndexedSnapshot, table: bool, include: IncludeObject) -> Value {
    if table {
        object::build_table(&[s], s.resource_version, None, include)
    } else {
        object::build_snapshot(s)
    }
}

struct WatchState {
    queued: VecDeque<Vec<u8>>,
    live: broadcast::Receiver<Change>,
    after: u64,
    namespace: Option<String>,
    opts: ListOptions,
    table: bool,
    include: IncludeObject,
    deadline: tokio::time::Instant,
}

/// Whether a watch of `namespace` (all when `None`) with `opts` shows the snapshot.
fn watched(namespace: Option<&str>, opts: &ListOptions, s: &IndexedSnapshot) -> bool {
    namespace.is_none_or(|ns| ns == s.namespace) && opts.matches(s)
}

impl WatchState {
    fn selects(&self, s: &IndexedSnapshot) -> bool {
        watched(self.namespace.as_deref(), &self.opts, s)
    }

    fn line(&self, change: &Change) -> Vec<u8> {
        object::watch_event(
            change.kind.as_str(),
            event_object(&change.snapshot, self.table, self.include),
        )
    }
}

/// A watch: first what the request asks to start with, then each change as it happens,
/// one JSON event per line, until the timeout or the client goes.
fn watch(
    api: &SnapshotApi,
    namespace: Option<String>,
    opts: ListOptions,
    table: bool,
    include: IncludeObject,
) -> Response<Body> {
    let timeout = opts
        .timeout_seconds
        .map_or(WATCH_TIMEOUT, Duration::from_secs);
    let mut queued = VecDeque::new();
    let (live, after) = match opts.resource_version {
        Some(rv) if !opts.send_initial_events => match api.index.subscribe(rv) {
            Ok(sub) => {
                for c in &sub.backlog {
                    let s = &c.snapshot;
                    if watched(namespace.as_deref(), &opts, s) {
                        queued.push_back(object::watch_event(
                            c.kind.as_str(),
                            event_object(s, table, include),
                        ));
                    }
                }
                (sub.live, sub.resource_version)
            }
            Err(expired) => {
                let status = object::status_failure(
                    410,
                    "Expired",
                    &format!(
                        "too old resource version: {} ({})",
                        expired.requested, expired.oldest
                    ),
                    None,
                );
                let body = object::watch_event("ERROR", status);
                let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                return r;
            }
        },
        _ => {
            let (items, sub) = api.index.subscribe_with_state(namespace.as_deref(), &opts);
            for s in &items {
                queued.push_back(object::watch_event(
                    ChangeKind::Added.as_str(),
                    event_object(s, table, include),
                ));
            }
            if opts.send_initial_events && opts.allow_bookmarks {
                queued.push_back(object::watch_event(
                    "BOOKMARK",
                    object::bookmark(sub.resource_version, true),
                ));
            }
            (sub.live, sub.resource_version)
        }
    };
    let state = WatchState {
        queued,
        live,
        after,
        namespace,
        opts,
        table,
        include,
        deadline: tokio::time::Instant::now() + timeout,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if let Some(line) = st.queued.pop_front() {
            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), st));
        }
        loop {
            match tokio::time::timeout_at(st.deadline, st.live.recv()).await {
                Ok(Ok(change)) => {
                    if change.snapshot.resource_version <= st.after || !st.selects(&change.snapshot)
                    {
                        continue;
                    }
                    let line = st.line(&change);
                    return Some((Ok(Frame::data(Bytes::from(line))), st));
                }
                // Fell behind or the index went away: end, and the client re-lists.
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_and_objects() {
        assert_eq!(
            resource_target("snapshots"),
            Some(Target::Collection {
                namespace: None,
                watch_path: false
            })
        );
        assert_eq!(
            resource_target("namespaces/demo/snapshots"),
            Some(Target::Collection {
                namespace: Some("demo"),
                watch_path: false
            })
        );
        assert_eq!(
            resource_target("watch/namespaces/demo/snapshots"),
            Some(Target::Collection {
                namespace: Some("demo"),
                watch_path: true
            })
        );
        assert_eq!(
            resource_target("namespaces/demo/snapshots/r-0123abcd"),
            Some(Target::Object {
                namespace: "demo",
                name: "r-0123abcd"
            })
        );
        assert_eq!(resource_target("namespaces/demo/widgets"), None);
        assert_eq!(resource_target("namespaces/demo/snapshots/a/b"), None);
    }
}
