//! A benchmark hook for the bench crate: time a list of N objects and the delivery of one
//! change to M concurrent watchers, over real HTTP connections to an in-process server.

use crate::{KubeSim, Options, StartError};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub objects: usize,
    pub watchers: usize,
    /// Bytes of the list response.
    pub list_bytes: usize,
    /// GET of the whole collection, until the last byte arrived.
    pub list: Duration,
    /// From sending the change until the first watcher saw it.
    pub watch_first: Duration,
    /// From sending the change until every watcher saw it.
    pub watch_all: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("failed to start the server: {0}")]
    Start(#[from] StartError),
    #[error("failed to connect: {0}")]
    Connect(std::io::Error),
    #[error("failed an HTTP exchange: {0}")]
    Exchange(#[from] hyper::Error),
    #[error("failed to build a request: {0}")]
    BuildRequest(#[from] http::Error),
    #[error("a watcher ended before it saw the change")]
    WatcherEnded,
}

async fn connect(
    addr: std::net::SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, BenchError> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(BenchError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Stores `objects` ConfigMaps, lists them once, opens `watchers` watches and patches one
/// object, timing each step.
pub async fn list_and_watch(objects: usize, watchers: usize) -> Result<BenchReport, BenchError> {
    let sim = KubeSim::start(Options::default()).await?;
    let addr = sim.addr();
    {
        let mut st = sim.core().lock();
        st.put(
            &crate::handlers::gr("", "namespaces"),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench", "uid": crate::util::new_uid()},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        );
        for i in 0..objects {
            st.put(
                &crate::handlers::gr("", "configmaps"),
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("cm-{i:05}"), "namespace": "bench", "uid": crate::util::new_uid(),
                        "creationTimestamp": crate::util::now_rfc3339(), "labels": {"app": "bench", "shard": (i % 10).to_string()}},
                    "data": {"key": "value", "index": i.to_string()}}),
            );
        }
    }
    let mut client = connect(addr).await?;
    let started = Instant::now();
    let resp = client
        .send_request(
            http::Request::get("/api/v1/namespaces/bench/configmaps")
                .header("host", "kube-sim")
                .body(Full::new(Bytes::new()))?,
        )
        .await?;
    let body = resp.into_body().collect().await?.to_bytes();
    let list = started.elapsed();
    let rv = sim.resource_version();

    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for _ in 0..watchers {
        let mut c = connect(addr).await?;
        let seen_tx = seen_tx.clone();
        let ready_tx = ready_tx.clone();
        let req = http::Request::get(format!(
            "/api/v1/namespaces/bench/configmaps?watch=true&resourceVersion={rv}"
        ))
        .header("host", "kube-sim")
        .body(Full::new(Bytes::new()))?;
        tokio::spawn(async move {
            let Ok(resp) = c.send_request(req).await else {
                return;
            };
            let _ = ready_tx.send(());
            let mut body = resp.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref()
                    && d.windows(8).any(|w| w == b"MODIFIED")
                {
                    let _ = seen_tx.send(Instant::now());
                    return;
                }
            }
        });
    }
    drop(seen_tx);
    for _ in 0..watchers {
        ready_rx.recv().await.ok_or(BenchError::WatcherEnded)?;
    }
    let mut writer = connect(addr).await?;
    let started = Instant::now();
    let resp = writer
        .send_request(
            http::Request::patch("/api/v1/namespaces/bench/configmaps/cm-00000")
                .header("host", "kube-sim")
                .header("content-type", "application/merge-patch+json")
                .body(Full::new(Bytes::from_static(
                    br#"{"data":{"key":"changed"}}"#,
                )))?,
        )
        .await?;
    let _ = resp.into_body().collect().await?;
    let mut first = None;
    let mut last = started;
    for _ in 0..watchers {
        let t = seen_rx.recv().await.ok_or(BenchError::WatcherEnded)?;
        first.get_or_insert(t);
        last = last.max(t);
    }
    let _ = Empty::<Bytes>::new();
    sim.shutdown();
    Ok(BenchReport {
        objects,
        watchers,
        list_bytes: body.len(),
        list,
        watch_first: first
            .map(|f| f.saturating_duration_since(started))
            .unwrap_or_default(),
        watch_all: last.saturating_duration_since(started),
    })
}
