//! A test image for the simulated cluster: an HTTP server on :8080 that shows the pod
//! from inside. `/readyz` answers 503 until `/ready-now` was called; `/env` is the
//! environment, `/exit?<code>` ends the process, `/file?<path>` a file's content, `/whoami` the pod read from the API server
//! with the in-cluster configuration (the mounted token, CA and KUBERNETES_SERVICE_*).
//! `/unready-now` makes `/readyz` fail again; `/get?<ip>:<port><path>` is the status of a GET
//! this pod sends there.
//!
//! With `TLS_DIR` (holding `tls.crt`, `tls.key`) it also serves HTTPS on :8443, as an
//! extension API server or an admission webhook would: `/apis/<group>/<version>` is a discovery
//! document, anything below it answers who the caller is (the `X-Remote-*` headers and the
//! client certificate's subject, verified against `CLIENT_CA` when that file is given), and
//! `POST /validate` reviews an `AdmissionReview`, refusing objects named `deny-*`.

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
    if let Ok(dir) = std::env::var("TLS_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let id = kube_sim::TlsIdentity {
            ca_pem: String::new(),
            cert_pem: std::fs::read_to_string(dir.join("tls.crt")).context("tls.crt")?,
            key_pem: std::fs::read_to_string(dir.join("tls.key")).context("tls.key")?,
        };
        let cfg = match std::env::var("CLIENT_CA") {
            Ok(f) => id.server_config_with_client_ca(&std::fs::read_to_string(f)?)?,
            Err(_) => id.server_config()?,
        };
        let tls = tokio::net::TcpListener::bind(("0.0.0.0", 8443))
            .await
            .context("failed to listen on :8443")?;
        tokio::spawn(serve_tls(tls, tokio_rustls::TlsAcceptor::from(cfg)));
    }
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
        ("/unready-now", _) => {
            ready.store(false, Ordering::SeqCst);
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
        ("/get", target) => match get(target).await {
            Ok(status) => (200, status),
            Err(e) => (502, format!("{e:#}")),
        },
        ("/whoami", _) => match whoami().await {
            Ok(s) => (200, s),
            Err(e) => (500, format!("{e:#}")),
        },
        _ => (404, "not found".into()),
    }
}

/// The status line's code of `GET <path>` at `<ip>:<port>`.
async fn get(target: &str) -> anyhow::Result<String> {
    let (addr, path) = target.split_at(target.find('/').unwrap_or(target.len()));
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("failed to connect to {addr}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.split_whitespace().nth(1).unwrap_or("").to_owned())
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

async fn serve_tls(listener: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let client = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| kube_sim::tls::subject_of(c.as_ref()));
            let svc = hyper::service::service_fn(move |req| {
                let client = client.clone();
                async move { Ok::<_, std::convert::Infallible>(extension(req, client).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

async fn extension(
    req: http::Request<hyper::body::Incoming>,
    client: Option<(String, Vec<String>)>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_owned();
    let header = |n: &str| -> Vec<String> {
        req.headers()
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let (user, groups) = (header("x-remote-user"), header("x-remote-group"));
    let post = req.method() == http::Method::POST;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let answer = match segs.as_slice() {
        ["validate"] if post => review(&body),
        ["apis", g, v] => serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{g}/{v}"),
            "resources": [{"name": "whoamis", "singularName": "whoami", "namespaced": false,
                "kind": "WhoAmI", "verbs": ["get", "list"]}],
        }),
        ["apis", _, _, ..] => serde_json::json!({
            "user": user, "groups": groups,
            "clientCertificate": client.map(|(cn, orgs)| serde_json::json!({"commonName": cn, "organizations": orgs})),
        }),
        _ => {
            let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"not found",
            )));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
        answer.to_string(),
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// An `AdmissionReview` answer: objects named `deny-*` are refused.
fn review(body: &[u8]) -> serde_json::Value {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let uid = req["request"]["uid"].clone();
    let name = req["request"]["object"]["metadata"]["name"]
        .as_str()
        .unwrap_or("");
    let mut response = serde_json::json!({"uid": uid, "allowed": !name.starts_with("deny-")});
    if name.starts_with("deny-") {
        response["status"] =
            serde_json::json!({"code": 403, "message": format!("sim-test-server refuses {name}")});
    }
    serde_json::json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}
