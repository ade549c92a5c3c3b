//! The aggregation layer: an APIService registered in kube-sim points at a Service that is mapped
//! to a small HTTPS backend started here. Requests under its group/version are proxied to the
//! backend (reached through the Service, verified with the APIService's caBundle), and discovery
//! lists the group once the APIService is Available.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube::api::{Api, DynamicObject, PostParams};
use kube_sim::{KubeSim, Options, TlsIdentity};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GROUP: &str = "example.test.io";
const VERSION: &str = "v1alpha1";

/// What the backend saw: method, path and the X-Remote-User header of each request.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

fn widget(name: &str, colour: &str) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "Widget",
        "metadata": {"name": name, "namespace": "x", "resourceVersion": "7", "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {"colour": colour},
    })
}

async fn backend(
    seen: Seen,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let user = req
        .headers()
        .get("x-remote-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    seen.lock().unwrap().push((method, path.clone(), user));
    let gv = format!("/apis/{GROUP}/{VERSION}");
    let (code, body) = if path == gv {
        (
            200,
            json!({
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{GROUP}/{VERSION}"),
                "resources": [{"name": "widgets", "singularName": "widget", "namespaced": true, "kind": "Widget", "verbs": ["get", "list"]}],
            }),
        )
    } else if path == format!("{gv}/namespaces/x/widgets") {
        (
            200,
            json!({
                "apiVersion": format!("{GROUP}/{VERSION}"), "kind": "WidgetList",
                "metadata": {"resourceVersion": "7"},
                "items": [widget("sprocket", "red"), widget("gear", "blue")],
            }),
        )
    } else {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("backend has no {path}")}),
        )
    };
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn start_backend(id: &TlsIdentity, seen: Seen) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| backend(seen.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A plain GET through kube-sim: status and parsed JSON body.
async fn get(sim: &KubeSim, path: &str, accept: &str) -> (u16, Value) {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, sim.addr().to_string())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", kube_sim::ADMIN_TOKEN),
            )
            .header(hyper::header::ACCEPT, accept)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        // The aggregator's own errors are plain text; they come back as a JSON string.
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (code, v)
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("GET {path} hung"))
}

/// The APIService of the widgets group, served by `widgets/widgets-api:8443`.
fn widgets_apiservice(ca_pem: &str) -> DynamicObject {
    let mut svc = DynamicObject::new(&format!("{VERSION}.{GROUP}"), &apiservices());
    svc.data = json!({"spec": {
        "group": GROUP, "version": VERSION, "groupPriorityMinimum": 1000, "versionPriority": 15,
        "service": {"namespace": "widgets", "name": "widgets-api", "port": 8443},
        "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
    }});
    svc
}

fn apiservices() -> kube::api::ApiResource {
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_api_is_proxied_and_discovered() {
    let id = TlsIdentity::generate(&["127.0.0.1", "widgets-api.widgets.svc"]).unwrap();
    let seen: Seen = Arc::default();
    let backend_addr = start_backend(&id, seen.clone()).await;
    let sim = KubeSim::start(Options::default()).await.unwrap();
    sim.map_service("widgets", "widgets-api", 8443, &backend_addr.to_string());
    let client = sim.client().await.unwrap();

    // Before registration the group is unknown.
    let (code, _) = get(
        &sim,
        &format!("/apis/{GROUP}/{VERSION}/namespaces/x/widgets"),
        "application/json",
    )
    .await;
    assert_eq!(code, 404);

    let ar = apiservices();
    let svc = widgets_apiservice(&id.ca_pem);
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    api.create(&PostParams::default(), &svc).await.unwrap();

    // The APIService becomes Available.
    wait_available(&api).await;

    // A list through kube-sim is the backend's answer, verbatim.
    let path = format!("/apis/{GROUP}/{VERSION}/namespaces/x/widgets");
    let (code, list) = get(&sim, &path, "application/json").await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["kind"], "WidgetList");
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sprocket", "gear"]);
    {
        let seen = seen.lock().unwrap();
        let hit = seen
            .iter()
            .find(|(m, p, _)| m == "GET" && *p == path)
            .expect("the backend saw the list request");
        assert!(
            !hit.2.is_empty(),
            "the proxy names the user (X-Remote-User)"
        );
    }

    // The backend's errors come back as they are.
    let (code, status) = get(
        &sim,
        &format!("/apis/{GROUP}/{VERSION}/namespaces/x/gadgets"),
        "application/json",
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(status["reason"], "NotFound");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("backend has no"),
        "{status}"
    );

    // The group/version resource list is the backend's.
    let (code, rl) = get(
        &sim,
        &format!("/apis/{GROUP}/{VERSION}"),
        "application/json",
    )
    .await;
    assert_eq!(code, 200, "{rl}");
    assert_eq!(rl["resources"][0]["name"], "widgets");

    // Legacy discovery: /apis and /apis/<group> list the group.
    let (code, groups) = get(&sim, "/apis", "application/json").await;
    assert_eq!(code, 200);
    let entry = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == GROUP)
        .unwrap_or_else(|| panic!("/apis does not list {GROUP}: {groups}"));
    assert_eq!(
        entry["preferredVersion"]["groupVersion"],
        format!("{GROUP}/{VERSION}")
    );
    let (code, group) = get(&sim, &format!("/apis/{GROUP}"), "application/json").await;
    assert_eq!(code, 200, "{group}");
    assert_eq!(group["kind"], "APIGroup");
    assert_eq!(group["versions"][0]["version"], VERSION);

    // Aggregated discovery (what kubectl asks for) carries the backend's resources.
    let (code, agg) = get(
        &sim,
        "/apis",
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
    )
    .await;
    assert_eq!(code, 200);
    let item = agg["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["metadata"]["name"] == GROUP)
        .unwrap_or_else(|| panic!("aggregated discovery lacks {GROUP}: {agg}"));
    assert_eq!(item["versions"][0]["freshness"], "Current");
    assert_eq!(item["versions"][0]["resources"][0]["resource"], "widgets");
    assert_eq!(item["versions"][0]["resources"][0]["scope"], "Namespaced");

    // kube-rs reaches the aggregated resource like any other.
    let widgets = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(GROUP, VERSION, "Widget"),
        "widgets",
    );
    let listed = Api::<DynamicObject>::namespaced_with(client.clone(), "x", &widgets)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 2);

    common::require_kubectl();
    {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kc).unwrap();
        let kubectl = |args: &[&str]| {
            let mut c = tokio::process::Command::new("kubectl");
            c.args(args)
                .env("KUBECONFIG", &kc)
                .env("KUBECACHEDIR", dir.path().join("cache"));
            c
        };
        let out = kubectl(&["get", "--raw", &path]).output().await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(raw["items"][0]["metadata"]["name"], "sprocket");

        let out = kubectl(&["get", "widgets.example.test.io", "-n", "x"])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("kubectl get widgets:\n{stdout}");
        assert!(
            out.status.success(),
            "kubectl get widgets: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("sprocket") && stdout.contains("gear"),
            "kubectl printed: {stdout}"
        );
    }

    // When the backend cannot be reached, the answer is a 503 with the dial error as plain
    // text (kube-aggregator's `responder.Error`), not a hang.
    sim.map_service("widgets", "widgets-api", 8443, "127.0.0.1:1");
    let (code, text) = get(&sim, &path, "application/json").await;
    assert_eq!(code, 503, "{text}");
    assert!(
        text.as_str().is_some_and(|t| t.contains("127.0.0.1:1")),
        "{text}"
    );
}

/// What the backend saw of one request: the client certificate's CN and the headers.
type Calls = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

/// A backend that, like an extension API server, asks for the front-proxy client certificate
/// and answers every request with an empty list.
async fn start_recording_backend(
    cfg: Arc<rustls::ServerConfig>,
    calls: Calls,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let calls = calls.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| kube_sim::tls::subject_of(c.as_ref()))
                    .map(|(cn, _)| cn)
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        calls
                            .lock()
                            .unwrap()
                            .push((cn.clone(), req.headers().clone()));
                        let body = json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": "WidgetList",
                        "metadata": {"resourceVersion": "1"}, "items": []});
                        let mut resp =
                            hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        async move { Ok::<_, Infallible>(resp) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// Waits until the widgets APIService is Available: until then the aggregator answers 503.
async fn wait_available(api: &Api<DynamicObject>) {
    for _ in 0..100 {
        let got = api.get(&format!("{VERSION}.{GROUP}")).await.unwrap();
        let available = got.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Available" && c["status"] == "True")
            });
        if available {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the APIService never became Available");
}

/// A request as `token` with extra headers: status and body.
async fn get_as(sim: &KubeSim, path: &str, token: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path)
        .header(hyper::header::HOST, sim.addr().to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::ACCEPT, "application/json");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_requests_carry_the_front_proxy_identity() {
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let client = sim.client().await.unwrap();

    // What an extension server reads to trust the aggregator.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "kube-system");
    let auth = cms
        .get("extension-apiserver-authentication")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        auth["requestheader-client-ca-file"],
        sim.front_proxy_ca_pem()
    );
    assert_eq!(auth["client-ca-file"], sim.ca_pem());
    assert_eq!(
        auth["requestheader-allowed-names"],
        r#"["front-proxy-client"]"#
    );
    assert_eq!(
        auth["requestheader-username-headers"],
        r#"["X-Remote-User"]"#
    );
    assert_eq!(auth["requestheader-group-headers"], r#"["X-Remote-Group"]"#);
    assert_eq!(
        auth["requestheader-extra-headers-prefix"],
        r#"["X-Remote-Extra-"]"#
    );

    let id = TlsIdentity::generate(&["127.0.0.1", "widgets-api.widgets.svc"]).unwrap();
    let calls: Calls = Arc::default();
    let cfg = id
        .server_config_with_client_ca(&auth["requestheader-client-ca-file"])
        .unwrap();
    let addr = start_recording_backend(cfg, calls.clone()).await;
    sim.map_service("widgets", "widgets-api", 8443, &addr.to_string());
    let ar = apiservices();
    let svc = widgets_apiservice(&id.ca_pem);
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    api.create(&PostParams::default(), &svc).await.unwrap();
    wait_available(&api).await;

    // A ServiceAccount with a token.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}});
    let nss: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&()),
    );
    nss.create(&PostParams::default(), &serde_json::from_value(ns).unwrap())
        .await
        .unwrap();
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), "x");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap(),
    )
    .await
    .unwrap();
    let tr = sas
        .create_token_request("reader", &PostParams::default(), &Default::default())
        .await
        .unwrap();
    let token = tr.status.unwrap().token;
    let path = format!("/apis/{GROUP}/{VERSION}/namespaces/x/widgets");

    // Without a grant, kube-sim's own authorizer refuses before anything is proxied.
    let (code, st) = get_as(&sim, &path, &token, &[]).await;
    assert_eq!(code, 403, "{st}");
    assert_eq!(
        st["message"],
        format!(
            r#"widgets.{GROUP} is forbidden: User "system:serviceaccount:x:reader" cannot list resource "widgets" in API group "{GROUP}" in the namespace "x""#
        )
    );
    assert!(calls.lock().unwrap().iter().all(|(_, h)| {
        h.get("x-remote-user")
            .is_none_or(|u| u != "system:serviceaccount:x:reader")
    }));

    // With one, the backend gets the caller from the aggregator, not from the caller.
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), "x");
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "w"},
        "rules": [{"apiGroups": [GROUP], "resources": ["widgets"], "verbs": ["list"]}]}))
            .unwrap(),
        )
        .await
        .unwrap();
    let rbs: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(client.clone(), "x");
    rbs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "w"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "w"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "x"}]}))
        .unwrap(),
    )
    .await
    .unwrap();
    let (code, list) = get_as(
        &sim,
        &path,
        &token,
        &[
            ("X-Remote-User", "root"),
            ("X-Remote-Group", "system:masters"),
        ],
    )
    .await;
    assert_eq!(code, 200, "{list}");
    let calls = calls.lock().unwrap();
    let (cn, h) = calls
        .iter()
        .rev()
        .find(|(_, h)| {
            h.get("x-remote-user")
                .is_some_and(|u| u != "system:kube-aggregator")
        })
        .expect("the backend saw the request");
    assert_eq!(
        cn, "front-proxy-client",
        "the aggregator presents the front-proxy certificate"
    );
    let all = |name: &str| -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("x-remote-user"), ["system:serviceaccount:x:reader"]);
    assert_eq!(
        all("x-remote-group"),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:x",
            "system:authenticated"
        ]
    );
    let jti = all("x-remote-extra-authentication.kubernetes.io%2fcredential-id");
    assert_eq!(jti.len(), 1, "{h:?}");
    assert!(jti[0].starts_with("JTI="), "{jti:?}");
}
