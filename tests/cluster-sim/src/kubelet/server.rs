//! The kubelet's HTTPS endpoint on the node's address, port 10250 (the Node's
//! `daemonEndpoints.kubeletEndpoint`): `GET /containerLogs/<ns>/<pod>/<container>`, which
//! the API server calls for `pods/log` [k/k: pkg/kubelet/server/server.go
//! `getContainerLogs`], with `previous`, `tailLines` and `limitBytes`.

use crate::error::{Error, Result};
use bytes::Bytes;
use http_body_util::Full;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const KUBELET_PORT: u16 = 10250;

/// Aborts the server when the kubelet's loop ends.
#[derive(Debug)]
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn serve(node_ip: Ipv4Addr, node_root: PathBuf) -> Result<Serving> {
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
            let (acceptor, root) = (acceptor.clone(), root.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let root = root.clone();
                    async move { Ok::<_, std::convert::Infallible>(answer(&root, req.uri())) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    })))
}

fn respond(code: u16, body: impl Into<Bytes>) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(body.into()));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_REQUEST);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn answer(root: &Path, uri: &http::Uri) -> http::Response<Full<Bytes>> {
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
        Ok(mut text) => {
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
) -> std::result::Result<String, String> {
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
        (Some(d), Some(n)) => std::fs::read_to_string(d.join(format!("{n}.log")))
            .map_err(|e| format!("failed to read the log: {e}")),
        _ if previous => Err(format!(
            "previous terminated container \"{container}\" in pod \"{pod}\" not found"
        )),
        _ => Err(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start"
        )),
    }
}
