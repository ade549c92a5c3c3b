//! The kubelet's HTTPS endpoint on the node's address, port 10250 (the Node's
//! `daemonEndpoints.kubeletEndpoint`): `GET /containerLogs/<ns>/<pod>/<container>`, which
//! the API server calls for `pods/log` [k/k: pkg/kubelet/server/server.go
//! `getContainerLogs`], with `previous`, `tailLines`, `limitBytes` and `follow` (the log
//! streams until the container's process ends).

use crate::error::{Error, Result};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The log files whose container process still runs.
pub type LiveLogs = Arc<Mutex<BTreeSet<PathBuf>>>;

/// One entry of [`LiveLogs`], removed when the process it belongs to is dropped.
#[derive(Debug)]
pub struct LiveLog {
    set: LiveLogs,
    path: PathBuf,
}

impl LiveLog {
    pub fn new(set: &LiveLogs, path: PathBuf) -> Self {
        lock(set).insert(path.clone());
        Self {
            set: set.clone(),
            path,
        }
    }
}

impl Drop for LiveLog {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.path);
    }
}

fn lock(set: &LiveLogs) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
    set.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Body = BoxBody<Bytes, Infallible>;

pub const KUBELET_PORT: u16 = 10250;

/// Aborts the server when the kubelet's loop ends.
#[derive(Debug)]
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn serve(node_ip: Ipv4Addr, node_root: PathBuf, live: LiveLogs) -> Result<Serving> {
    let id =
        kube_sim::TlsIdentity::generate(&[&node_ip.to_string()]).map_err(|e| Error::Invalid {
            action: "make the kubelet's serving certificate",
            message: e.to_string(),
        })?;
    let cfg = id.server_config().map_err(|e| Error::Invalid {
        action: "make the kubelet's serving certificate",
        message: e.to_string(),
    })?;
    let listener = tokio::net::TcpListener::bind((node_ip, KUBELET_PORT))
        .await
        .map_err(Error::io("listen on", format!("{node_ip}:{KUBELET_PORT}")))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let root = Arc::new(node_root);
    Ok(Serving(tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, root, live) = (acceptor.clone(), root.clone(), live.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (root, live) = (root.clone(), live.clone());
                    async move { Ok::<_, Infallible>(answer(&root, &live, req.uri())) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    })))
}

fn respond(code: u16, body: impl Into<Bytes>) -> http::Response<Body> {
    with_body(code, Full::new(body.into()).boxed())
}

fn with_body(code: u16, body: Body) -> http::Response<Body> {
    let mut r = http::Response::new(body);
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_REQUEST);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn answer(root: &Path, live: &LiveLogs, uri: &http::Uri) -> http::Response<Body> {
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = segs.as_slice() else {
        return respond(404, "404 page not found\n");
    };
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let previous = q("previous") == Some("true");
    match read_log(root, ns, pod, container, previous) {
        Ok((mut text, path)) => {
            if q("follow") == Some("true") && !previous {
                return with_body(200, follow(text.into_bytes(), path, live.clone()));
            }
            if let Some(n) = q("tailLines").and_then(|n| n.parse::<usize>().ok()) {
                let lines: Vec<&str> = text.split_inclusive('\n').collect();
                text = lines[lines.len().saturating_sub(n)..].concat();
            }
            if let Some(n) = q("limitBytes").and_then(|n| n.parse::<usize>().ok()) {
                let mut bytes = text.into_bytes();
                bytes.truncate(n);
                return respond(200, bytes);
            }
            respond(200, text)
        }
        Err(message) => respond(400, message),
    }
}

/// The log of the container's current run, or with `previous` of the run before it: the
/// kubelet keeps one file per restart in `/var/log/pods/<ns>_<pod>_<uid>/<container>/`.
fn read_log(
    root: &Path,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> std::result::Result<(String, PathBuf), String> {
    let base = root.join("var/log/pods");
    let prefix = format!("{ns}_{pod}_");
    let dir = std::fs::read_dir(&base)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path().join(container));
    let mut runs: Vec<u32> = dir
        .as_ref()
        .and_then(|d| std::fs::read_dir(d).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".log")?
                .parse()
                .ok()
        })
        .collect();
    runs.sort_unstable();
    let run = if previous {
        runs.len().checked_sub(2).map(|i| runs[i])
    } else {
        runs.last().copied()
    };
    match (dir, run) {
        (Some(d), Some(n)) => {
            let path = d.join(format!("{n}.log"));
            std::fs::read_to_string(&path)
                .map(|t| (t, path))
                .map_err(|e| format!("failed to read the log: {e}"))
        }
        _ if previous => Err(format!(
            "previous terminated container \"{container}\" in pod \"{pod}\" not found"
        )),
        _ => Err(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start"
        )),
    }
}

/// The log so far, then what the process writes, until it is gone and its last bytes sent.
fn follow(first: Vec<u8>, path: PathBuf, live: LiveLogs) -> Body {
    let start = (Some(first), path, live, 0u64);
    let stream = futures::stream::unfold(start, |(first, path, live, offset)| async move {
        if let Some(f) = first {
            let n = f.len() as u64;
            return Some((
                Ok(hyper::body::Frame::data(Bytes::from(f))),
                (None, path, live, n),
            ));
        }
        loop {
            let running = lock(&live).contains(&path);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len > offset {
                use std::io::{Read, Seek};
                let mut buf = Vec::new();
                let read = std::fs::File::open(&path).and_then(|mut f| {
                    f.seek(std::io::SeekFrom::Start(offset))?;
                    f.take(len - offset).read_to_end(&mut buf)
                });
                if read.is_err() {
                    return None;
                }
                let n = offset + buf.len() as u64;
                return Some((
                    Ok(hyper::body::Frame::data(Bytes::from(buf))),
                    (None, path, live, n),
                ));
            }
            if !running {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}
