//! A test image for the simulated cluster: an HTTP server on :8080 that shows the pod
//! from inside. `/readyz` answers 503 until `/ready-now` was called; `/env` is the
//! environment, `/exit?<code>` ends the process, `/file?<path>` a file's content, `/whoami` the pod read from the API server
//! with the in-cluster configuration (the mounted token, CA and KUBERNETES_SERVICE_*).

use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", 8080))
        .await
        .context("failed to listen on :8080")?;
    let ready = Arc::new(AtomicBool::new(false));
    loop {
        let (mut s, _) = listener.accept().await?;
        let ready = ready.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let target = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let (code, body) = answer(&target, &ready).await;
            let resp = format!(
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

async fn answer(target: &str, ready: &AtomicBool) -> (u16, String) {
    match target.split_once('?').map_or((target, ""), |(p, q)| (p, q)) {
        ("/readyz", _) if ready.load(Ordering::SeqCst) => (200, "ok".into()),
        ("/readyz", _) => (503, "not yet".into()),
        ("/ready-now", _) => {
            ready.store(true, Ordering::SeqCst);
            (200, "ok".into())
        }
        ("/env", _) => {
            let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            (200, serde_json::to_string(&env).unwrap_or_default())
        }
        ("/file", path) => match std::fs::read_to_string(path) {
            Ok(s) => (200, s),
            Err(e) => (404, e.to_string()),
        },
        ("/exit", code) => {
            let code: i32 = code.parse().unwrap_or(1);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                std::process::exit(code);
            });
            (200, "bye".into())
        }
        ("/whoami", _) => match whoami().await {
            Ok(s) => (200, s),
            Err(e) => (500, format!("{e:#}")),
        },
        _ => (404, "not found".into()),
    }
}

async fn whoami() -> anyhow::Result<String> {
    let cfg = kube::Config::incluster().context("failed to load the in-cluster configuration")?;
    let client = kube::Client::try_from(cfg)?;
    let ns = std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")?;
    let name = std::env::var("POD_NAME").context("POD_NAME")?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, ns.trim());
    let pod = pods.get(&name).await.context("failed to read my pod")?;
    Ok(pod.metadata.uid.unwrap_or_default())
}
