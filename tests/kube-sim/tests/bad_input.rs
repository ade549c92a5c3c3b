//! Bad requests over raw HTTP get the real server's `Status` answers (code, reason, message,
//! causes), never a hang or a dropped connection, and the server keeps serving afterwards.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kube_sim::{KubeSim, Options};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One keep-alive HTTP/1.1 connection to the server: every request below goes over it, so a
/// request that wedged or closed the connection would fail the ones after it.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(sim: &KubeSim) -> Self {
        let tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self {
            sender,
            host: sim.addr().to_string(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: &str) -> (u16, String, Value) {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", kube_sim::ADMIN_TOKEN),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let fut = async {
            self.sender.ready().await.unwrap();
            let resp = self.sender.send_request(req).await.unwrap();
            let code = resp.status().as_u16();
            let ct = resp
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{method} {path}: not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            (code, ct, v)
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10s"))
    }

    /// Sends a request that must fail, and checks the `Status` it gets back.
    async fn expect_status(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
        code: u16,
        reason: &str,
    ) -> Value {
        let (got, ct, status) = self.send(method, path, body).await;
        let what = format!("{method} {path} {body}");
        assert_eq!(got, code, "{what}: {status}");
        assert!(
            ct.starts_with("application/json"),
            "{what}: content type {ct}"
        );
        assert_eq!(status["kind"], "Status", "{what}: {status}");
        assert_eq!(status["apiVersion"], "v1", "{what}: {status}");
        assert_eq!(status["status"], "Failure", "{what}: {status}");
        assert_eq!(status["code"], code, "{what}: {status}");
        assert_eq!(status["reason"], reason, "{what}: {status}");
        assert!(
            status["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: no message: {status}"
        );
        status
    }
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_status_answers() {
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let mut c = Conn::open(&sim).await;

    // Malformed JSON.
    let s = c
        .expect_status(
            "POST",
            CMS,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"#,
            400,
            "BadRequest",
        )
        .await;
    assert!(s["message"].as_str().unwrap().contains("json"), "{s}");
    // JSON that is not an object, and no body at all.
    c.expect_status("POST", CMS, "[1, 2]", 400, "BadRequest")
        .await;
    c.expect_status("POST", CMS, "", 400, "BadRequest").await;

    // Unknown resources and groups, in every shape of path.
    for path in [
        "/api/v1/namespaces/default/frobs",
        "/api/v1/frobs",
        "/apis/nope.example.io/v1/widgets",
        "/apis/nope.example.io/v1/namespaces/default/widgets/w",
        "/apis/nope.example.io",
        "/apis/apps/v9/deployments",
        "/no/such/thing",
    ] {
        c.expect_status("GET", path, "", 404, "NotFound").await;
    }
    c.expect_status(
        "POST",
        "/api/v1/namespaces/default/frobs",
        r#"{"apiVersion":"v1","kind":"Frob","metadata":{"name":"f"}}"#,
        404,
        "NotFound",
    )
    .await;

    // An unknown resource under a namespace is no route for any method (not a subresource of
    // the namespace), and subresources a resource lacks, or paths too deep, are no route either.
    for method in ["PUT", "PATCH", "DELETE"] {
        c.expect_status(
            method,
            "/api/v1/namespaces/default/frobs",
            "{}",
            404,
            "NotFound",
        )
        .await;
    }
    let s = c
        .expect_status(
            "GET",
            "/api/v1/namespaces/missing/frobs",
            "",
            404,
            "NotFound",
        )
        .await;
    assert_eq!(
        s["message"], "the server could not find the requested resource",
        "{s}"
    );
    c.expect_status("GET", &format!("{CMS}/cm/status"), "", 404, "NotFound")
        .await;
    c.expect_status("GET", &format!("{CMS}/cm/data/extra"), "", 404, "NotFound")
        .await;

    // A namespaced object POSTed to the all-namespaces collection: the real server serves only
    // list/watch there, so it answers 405 MethodNotAllowed (kubernetes/kubernetes#12737).
    c.expect_status(
        "POST",
        "/api/v1/configmaps",
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"nowhere","namespace":"default"}}"#,
        405,
        "MethodNotAllowed",
    )
    .await;
    // A namespaced object named without a namespace is not a route at all.
    c.expect_status("GET", "/api/v1/configmaps/some", "", 404, "NotFound")
        .await;

    // An invalid name: 422 Invalid with a cause naming the field.
    let s = c
        .expect_status(
            "POST",
            CMS,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Not_A_Valid_Name"}}"#,
            422,
            "Invalid",
        )
        .await;
    assert_eq!(s["details"]["name"], "Not_A_Valid_Name", "{s}");
    assert_eq!(s["details"]["kind"], "ConfigMap", "{s}");
    let causes = s["details"]["causes"].as_array().expect("details.causes");
    assert!(
        causes
            .iter()
            .any(|c| c["field"] == "metadata.name" && c["reason"] == "FieldValueInvalid"),
        "{s}"
    );
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .starts_with("ConfigMap \"Not_A_Valid_Name\" is invalid: metadata.name"),
        "{s}"
    );
    // No name at all.
    let s = c
        .expect_status(
            "POST",
            CMS,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{}}"#,
            422,
            "Invalid",
        )
        .await;
    assert!(
        s["details"]["causes"]
            .as_array()
            .is_some_and(|c| !c.is_empty()),
        "{s}"
    );

    // An update with a stale resourceVersion: 409 Conflict.
    let (code, _, created) = c
        .send(
            "POST",
            CMS,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm"},"data":{"a":"1"}}"#,
        )
        .await;
    assert_eq!(code, 201, "{created}");
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut updated = created.clone();
    updated["data"]["a"] = json!("2");
    let (code, _, after) = c
        .send("PUT", &format!("{CMS}/cm"), &updated.to_string())
        .await;
    assert_eq!(code, 200, "{after}");
    assert_ne!(after["metadata"]["resourceVersion"], rv);
    // The same body again carries the old resourceVersion.
    updated["data"]["a"] = json!("3");
    let s = c
        .expect_status(
            "PUT",
            &format!("{CMS}/cm"),
            &updated.to_string(),
            409,
            "Conflict",
        )
        .await;
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified"),
        "{s}"
    );
    assert_eq!(s["details"]["name"], "cm", "{s}");
    // Creating it again: 409 AlreadyExists.
    c.expect_status(
        "POST",
        CMS,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cm"}}"#,
        409,
        "AlreadyExists",
    )
    .await;

    // A body whose kind or apiVersion does not match the path: 400 BadRequest.
    let s = c
        .expect_status(
            "POST",
            CMS,
            r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"wrong-kind"}}"#,
            400,
            "BadRequest",
        )
        .await;
    assert!(s["message"].as_str().unwrap().contains("Secret"), "{s}");
    c.expect_status(
        "POST",
        CMS,
        r#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"wrong-version"}}"#,
        400,
        "BadRequest",
    )
    .await;
    // A body naming another object than the path does.
    c.expect_status(
        "PUT",
        &format!("{CMS}/cm"),
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"other"}}"#,
        400,
        "BadRequest",
    )
    .await;
    // A body in another namespace than the path.
    c.expect_status(
        "POST",
        CMS,
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"elsewhere","namespace":"kube-system"}}"#,
        400,
        "BadRequest",
    )
    .await;

    // A method the resource does not serve.
    c.expect_status("PUT", CMS, "{}", 405, "MethodNotAllowed")
        .await;

    // None of that broke anything: the same connection still serves normal requests.
    let (code, _, got) = c.send("GET", &format!("{CMS}/cm"), "").await;
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["data"]["a"], "2");
    let (code, _, list) = c.send("GET", CMS, "").await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "ConfigMapList");
    // `cm` and the `kube-root-ca.crt` every namespace has.
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
}

/// Bytes that are not HTTP at all get an answer and a closed connection, and the server lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_is_answered() {
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    tcp.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .expect("the server closed the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");

    // A raw, hand-written request on a fresh connection still works.
    let mut tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    tcp.write_all(
        b"GET /api/v1/namespaces/default HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer kube-sim\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .expect("the server answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"kind\":\"Namespace\""), "{text}");
}
