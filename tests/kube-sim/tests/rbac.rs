//! Authentication and RBAC as a user meets them through kubectl on an HTTPS kube-sim: a
//! ServiceAccount token from `kubectl create token` can do exactly what its Role allows and is
//! refused everything else with the real Forbidden message; `kubectl auth can-i --as` agrees;
//! tokens bound to a pod die with the pod and expire; client certificates name user and
//! groups; access reviews answer as the RBAC authorizer does.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Out;

use kube_sim::{KubeSim, Options};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

struct Cluster {
    sim: KubeSim,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        common::require_kubectl();
        let sim = KubeSim::start(Options {
            tls: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin"), sim.kubeconfig_yaml()).unwrap();
        Self { sim, dir }
    }

    fn kubeconfig(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p
    }

    fn admin(&self) -> PathBuf {
        self.dir.path().join("admin")
    }

    async fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Out {
        common::kubectl(
            kubeconfig,
            &self.dir.path().join("cache"),
            args,
            stdin.unwrap_or(""),
        )
        .await
    }

    /// An admin kubectl command that must succeed.
    async fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl_as(&self.admin(), args, None).await;
        assert!(out.ok, "kubectl {args:?}: {}", out.stderr);
        out.stdout
    }

    async fn apply(&self, yaml: &str) {
        let out = self
            .kubectl_as(&self.admin(), &["apply", "-f", "-"], Some(yaml))
            .await;
        assert!(out.ok, "apply: {}", out.stderr);
    }

    /// `GET` of the configmaps in ns1 as `token`.
    async fn list_configmaps(&self, token: &str) -> (u16, Value) {
        self.raw(
            "GET",
            "/api/v1/namespaces/ns1/configmaps",
            Some(token),
            &Value::Null,
        )
        .await
    }

    /// A raw JSON request as `token` (the admin's when `None`): status code and body.
    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        let client = reqwest_like(&self.sim).await;
        client
            .send(method, path, token.unwrap_or(kube_sim::ADMIN_TOKEN), body)
            .await
    }
}

/// A tiny HTTPS client trusting the cluster CA.
struct Raw {
    connector: tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
}

async fn reqwest_like(sim: &KubeSim) -> Raw {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Raw {
        connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)),
        addr: sim.addr(),
    }
}

use rustls::pki_types::pem::PemObject;

impl Raw {
    async fn send(&self, method: &str, path: &str, token: &str, body: &Value) -> (u16, Value) {
        use http_body_util::{BodyExt, Full};
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = self.connector.connect(name, tcp).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json");
        if !token.is_empty() {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = if body.is_null() {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::from(body.to_string())
        };
        let resp = sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let code = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ns1}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa1, namespace: ns1}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm-reader, namespace: ns1}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [settings]
  verbs: [update, patch]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: sa1-reads, namespace: ns1}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
subjects:
- {kind: ServiceAccount, name: sa1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: ns1}
data: {mode: slow}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: locked, namespace: ns1}
data: {mode: slow}
"#;

fn forbidden(msg: &str) -> String {
    format!("Error from server (Forbidden): {msg}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_can_do_exactly_what_its_role_allows() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    let token = c.admin_ok(&["create", "token", "sa1", "-n", "ns1"]).await;
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let sa = c.kubeconfig("sa1", &c.sim.kubeconfig_with_token(token));
    let user = "system:serviceaccount:ns1:sa1";

    // What the Role allows.
    let out = c
        .kubectl_as(&sa, &["get", "configmaps", "-n", "ns1", "-o", "name"], None)
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("configmap/settings"), "{}", out.stdout);
    let out = c
        .kubectl_as(
            &sa,
            &[
                "patch",
                "configmap",
                "settings",
                "-n",
                "ns1",
                "-p",
                r#"{"data":{"mode":"fast"}}"#,
            ],
            None,
        )
        .await;
    assert!(
        out.ok,
        "a named rule allows patching settings: {}",
        out.stderr
    );

    // Everything else is Forbidden, with the real message.
    let refused = [
        (
            vec!["get", "secrets", "-n", "ns1"],
            format!(
                r#"secrets is forbidden: User "{user}" cannot list resource "secrets" in API group "" in the namespace "ns1""#
            ),
        ),
        (
            vec!["get", "configmaps", "-n", "other"],
            format!(
                r#"configmaps is forbidden: User "{user}" cannot list resource "configmaps" in API group "" in the namespace "other""#
            ),
        ),
        (
            vec![
                "patch",
                "configmap",
                "locked",
                "-n",
                "ns1",
                "-p",
                r#"{"data":{"mode":"fast"}}"#,
            ],
            format!(
                r#"configmaps "locked" is forbidden: User "{user}" cannot patch resource "configmaps" in API group "" in the namespace "ns1""#
            ),
        ),
        (
            vec!["delete", "configmap", "settings", "-n", "ns1"],
            format!(
                r#"configmaps "settings" is forbidden: User "{user}" cannot delete resource "configmaps" in API group "" in the namespace "ns1""#
            ),
        ),
        (
            vec!["get", "nodes"],
            format!(
                r#"nodes is forbidden: User "{user}" cannot list resource "nodes" in API group "" at the cluster scope"#
            ),
        ),
        (
            vec!["create", "deployment", "d", "--image=busybox", "-n", "ns1"],
            format!(
                r#"deployments.apps is forbidden: User "{user}" cannot create resource "deployments" in API group "apps" in the namespace "ns1""#
            ),
        ),
        (
            vec!["get", "configmaps", "-n", "ns1", "--as", "alice"],
            format!(
                r#"users "alice" is forbidden: User "{user}" cannot impersonate resource "users" in API group "" at the cluster scope"#
            ),
        ),
    ];
    for (args, msg) in refused {
        let out = c.kubectl_as(&sa, &args, None).await;
        assert!(!out.ok, "kubectl {args:?} must be refused: {}", out.stdout);
        // kubectl prints server errors as `Error from server (Forbidden): …`, except
        // `create <generator>`, which says `error: failed to create …: …`.
        let want = if args[0] == "create" {
            msg.clone()
        } else {
            forbidden(&msg)
        };
        assert!(
            out.stderr.contains(&want),
            "kubectl {args:?}:\n  got: {}\n want: {msg}",
            out.stderr
        );
    }
    let kept = c
        .admin_ok(&[
            "get",
            "cm",
            "locked",
            "-n",
            "ns1",
            "-o",
            "jsonpath={.data.mode}",
        ])
        .await;
    assert_eq!(kept, "slow", "a refused patch changed nothing");

    // `kubectl auth can-i`, as the account and by impersonation, says the same.
    let as_sa = format!("--as={user}");
    for (args, want) in [
        (vec!["list", "configmaps", "-n", "ns1"], true),
        (vec!["update", "configmaps/settings", "-n", "ns1"], true),
        (
            vec![
                "get",
                "deployments.apps",
                "--subresource=scale",
                "-n",
                "ns1",
            ],
            true,
        ),
        (vec!["list", "secrets", "-n", "ns1"], false),
        (vec!["update", "configmaps/locked", "-n", "ns1"], false),
        (vec!["list", "configmaps", "-n", "other"], false),
        (vec!["get", "deployments.apps", "-n", "ns1"], false),
    ] {
        let mut admin_args = vec!["auth", "can-i"];
        admin_args.extend(&args);
        admin_args.push(&as_sa);
        let out = c.kubectl_as(&c.admin(), &admin_args, None).await;
        assert_eq!(
            out.stdout.trim(),
            if want { "yes" } else { "no" },
            "can-i {args:?} --as: {}",
            out.stderr
        );
        assert_eq!(out.ok, want, "can-i exits 0 only for yes");
        let mut own = vec!["auth", "can-i"];
        own.extend(&args);
        let out = c.kubectl_as(&sa, &own, None).await;
        assert_eq!(
            out.stdout.trim(),
            if want { "yes" } else { "no" },
            "can-i {args:?} as the account: {}",
            out.stderr
        );
    }

    // whoami names the account and its groups.
    let out = c
        .kubectl_as(&sa, &["auth", "whoami", "-o", "json"], None)
        .await;
    assert!(out.ok, "{}", out.stderr);
    let who: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(who["status"]["userInfo"]["username"], user);
    assert_eq!(
        who["status"]["userInfo"]["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:ns1",
            "system:authenticated"
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_once_unknown_expired_or_unbound() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: ns1}\nspec:\n  serviceAccountName: sa1\n  containers: [{name: c, image: busybox}]\n").await;
    let pod_uid = c
        .admin_ok(&[
            "get",
            "pod",
            "app",
            "-n",
            "ns1",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await;

    let unauthorized = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Unauthorized", "reason": "Unauthorized", "code": 401});

    // An unknown token: 401 with the real Status, and kubectl's login error.
    let (code, body) = c.list_configmaps("not-a-token").await;
    assert_eq!((code, &body), (401, &unauthorized));
    let bogus = c.kubeconfig("bogus", &c.sim.kubeconfig_with_token("eyJ.eyJ.sig"));
    let out = c
        .kubectl_as(&bogus, &["get", "cm", "-n", "ns1"], None)
        .await;
    assert!(
        out.stderr
            .contains("error: You must be logged in to the server (Unauthorized)"),
        "{}",
        out.stderr
    );

    // A token bound to the pod works while the pod exists, and names it.
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "app", "uid": pod_uid}}});
    let (code, tr) = c
        .raw(
            "POST",
            "/api/v1/namespaces/ns1/serviceaccounts/sa1/token",
            None,
            &req,
        )
        .await;
    assert_eq!(code, 201, "{tr}");
    assert_eq!(tr["spec"]["expirationSeconds"], 3600);
    assert_eq!(
        tr["spec"]["audiences"],
        json!(["https://kubernetes.default.svc.cluster.local"])
    );
    let bound = tr["status"]["token"].as_str().unwrap().to_owned();
    let review = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
    let (code, who) = c
        .raw(
            "POST",
            "/apis/authentication.k8s.io/v1/selfsubjectreviews",
            Some(&bound),
            &review,
        )
        .await;
    assert_eq!(code, 201, "{who}");
    assert_eq!(
        who["status"]["userInfo"]["username"],
        "system:serviceaccount:ns1:sa1"
    );
    assert_eq!(
        who["status"]["userInfo"]["extra"]["authentication.kubernetes.io/pod-name"],
        json!(["app"])
    );
    assert_eq!(
        who["status"]["userInfo"]["extra"]["authentication.kubernetes.io/pod-uid"],
        json!([pod_uid])
    );

    // A pod of another account cannot have tokens of this one; a stale UID conflicts.
    let wrong = json!({"spec": {"boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "app", "uid": "x"}}});
    let (code, st) = c
        .raw(
            "POST",
            "/api/v1/namespaces/ns1/serviceaccounts/sa1/token",
            None,
            &wrong,
        )
        .await;
    assert_eq!(code, 409, "{st}");
    c.admin_ok(&["create", "sa", "sa2", "-n", "ns1"]).await;
    let (code, st) = c
        .raw(
            "POST",
            "/api/v1/namespaces/ns1/serviceaccounts/sa2/token",
            None,
            &req,
        )
        .await;
    assert_eq!(code, 400, "{st}");
    assert_eq!(
        st["message"],
        r#"cannot bind token for serviceaccount "sa2" to pod running with serviceaccount "sa1""#
    );

    // Too short a lifetime is invalid, as the real validation says.
    let out = c
        .kubectl_as(
            &c.admin(),
            &["create", "token", "sa1", "-n", "ns1", "--duration=1m"],
            None,
        )
        .await;
    assert!(!out.ok);
    assert!(
        out.stderr.contains(r#"TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 10 minutes"#),
        "{}",
        out.stderr
    );

    // A token for another audience is not for the API server.
    let vault = c
        .admin_ok(&["create", "token", "sa1", "-n", "ns1", "--audience=vault"])
        .await;
    let (code, _) = c
        .raw(
            "GET",
            "/api/v1/namespaces/ns1/configmaps",
            Some(vault.trim()),
            &Value::Null,
        )
        .await;
    assert_eq!(code, 401);

    // Deleting the pod invalidates its token; an unbound token of the account lives on.
    let unbound = c.admin_ok(&["create", "token", "sa1", "-n", "ns1"]).await;
    let unbound = unbound.trim().to_owned();
    c.admin_ok(&["delete", "pod", "app", "-n", "ns1"]).await;
    let (code, body) = c.list_configmaps(&bound).await;
    assert_eq!((code, &body), (401, &unauthorized));
    let (code, _) = c.list_configmaps(&unbound).await;
    assert_eq!(code, 200);

    // An hour later it has expired.
    c.sim
        .advance_token_clock(std::time::Duration::from_secs(3600));
    let (code, body) = c.list_configmaps(&unbound).await;
    assert_eq!((code, &body), (401, &unauthorized));

    // Without credentials the request is anonymous, and anonymous may read only public info.
    let (code, st) = c.list_configmaps("").await;
    assert_eq!(code, 403, "{st}");
    assert_eq!(
        st["message"],
        r#"configmaps is forbidden: User "system:anonymous" cannot list resource "configmaps" in API group "" in the namespace "ns1""#
    );
    let (code, _) = c.raw("GET", "/version", Some(""), &Value::Null).await;
    assert_eq!(code, 200);

    // Every namespace has the cluster CA, for pods to trust the API server with.
    let ca = c
        .admin_ok(&[
            "get",
            "configmap",
            "kube-root-ca.crt",
            "-n",
            "other",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])
        .await;
    assert_eq!(ca, c.sim.ca_pem());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_reviews_answer_as_the_authorizer_does() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    let sar = |verb: &str, resource: &str, ns: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": "system:serviceaccount:ns1:sa1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:ns1", "system:authenticated"],
                "resourceAttributes": {"verb": verb, "resource": resource, "namespace": ns}}})
    };
    let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    let (code, r) = c
        .raw("POST", path, None, &sar("list", "configmaps", "ns1"))
        .await;
    assert_eq!(code, 201, "{r}");
    assert_eq!(r["status"]["allowed"], true);
    assert_eq!(
        r["status"]["reason"],
        r#"RBAC: allowed by RoleBinding "sa1-reads/ns1" of Role "cm-reader" to ServiceAccount "sa1/ns1""#
    );
    let (_, r) = c
        .raw("POST", path, None, &sar("list", "secrets", "ns1"))
        .await;
    assert_eq!(r["status"], json!({"allowed": false}));
    // Discovery is for every authenticated user.
    let np = json!({"spec": {"user": "bob", "groups": ["system:authenticated"], "nonResourceAttributes": {"path": "/apis/apps", "verb": "get"}}});
    let (_, r) = c.raw("POST", path, None, &np).await;
    assert_eq!(r["status"]["allowed"], true, "{r}");
    assert_eq!(
        r["status"]["reason"],
        r#"RBAC: allowed by ClusterRoleBinding "system:discovery" of ClusterRole "system:discovery" to Group "system:authenticated""#
    );
    // A binding to a missing role is named in the reason.
    c.admin_ok(&[
        "create",
        "rolebinding",
        "dangling",
        "-n",
        "ns1",
        "--clusterrole=gone",
        "--serviceaccount=ns1:sa1",
    ])
    .await;
    let (_, r) = c
        .raw("POST", path, None, &sar("list", "secrets", "ns1"))
        .await;
    assert_eq!(
        r["status"],
        json!({"allowed": false, "reason": r#"RBAC: clusterrole.rbac.authorization.k8s.io "gone" not found"#})
    );
    // Neither user nor groups is invalid.
    let (code, r) = c
        .raw(
            "POST",
            path,
            None,
            &json!({"spec": {"resourceAttributes": {"verb": "get", "resource": "pods"}}}),
        )
        .await;
    assert_eq!(code, 422, "{r}");

    // The account itself may not ask about others, only about itself.
    let token = c.admin_ok(&["create", "token", "sa1", "-n", "ns1"]).await;
    let (code, r) = c
        .raw(
            "POST",
            path,
            Some(token.trim()),
            &sar("list", "configmaps", "ns1"),
        )
        .await;
    assert_eq!(code, 403, "{r}");
    let ssar = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": "get", "resource": "configmaps", "namespace": "ns1", "name": "x"}}});
    let (code, r) = c
        .raw(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            Some(token.trim()),
            &ssar,
        )
        .await;
    assert_eq!(code, 201, "{r}");
    assert_eq!(r["status"]["allowed"], true);

    // system:auth-delegator lets an extension server review tokens and access.
    c.admin_ok(&[
        "create",
        "clusterrolebinding",
        "sa1-delegates",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=ns1:sa1",
    ])
    .await;
    let (code, r) = c
        .raw(
            "POST",
            path,
            Some(token.trim()),
            &sar("list", "configmaps", "ns1"),
        )
        .await;
    assert_eq!((code, &r["status"]["allowed"]), (201, &json!(true)), "{r}");
    let tr = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token.trim()}});
    let (code, r) = c
        .raw(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(token.trim()),
            &tr,
        )
        .await;
    assert_eq!(code, 201, "{r}");
    assert_eq!(r["status"]["authenticated"], true);
    assert_eq!(
        r["status"]["user"]["username"],
        "system:serviceaccount:ns1:sa1"
    );

    // `kubectl auth can-i --list` shows the rules of the account.
    let out = c
        .kubectl_as(
            &c.admin(),
            &[
                "auth",
                "can-i",
                "--list",
                "-n",
                "ns1",
                "--as=system:serviceaccount:ns1:sa1",
            ],
            None,
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("configmaps ")
            && l.contains("[settings]")
            && l.contains("[update patch]")),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_name_the_user_and_groups() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    let cert = c
        .sim
        .client_certificate("alice", &["devs", "auditors"])
        .unwrap();
    let alice = c.kubeconfig("alice", &c.sim.kubeconfig_with_certificate(&cert));
    let out = c
        .kubectl_as(
            &alice,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username} {.status.userInfo.groups}",
            ],
            None,
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        r#"alice ["devs","auditors","system:authenticated"]"#
    );
    // Nothing bound yet.
    let out = c
        .kubectl_as(&alice, &["get", "pods", "-n", "ns1"], None)
        .await;
    assert!(out.stderr.contains(&forbidden(r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "ns1""#)), "{}", out.stderr);
    // The bootstrap `view` role, bound to her group, lets her read but not write or see secrets.
    c.admin_ok(&[
        "create",
        "clusterrolebinding",
        "devs-view",
        "--clusterrole=view",
        "--group=devs",
    ])
    .await;
    let out = c
        .kubectl_as(&alice, &["get", "configmaps", "-A", "-o", "name"], None)
        .await;
    assert!(out.ok, "{}", out.stderr);
    let out = c
        .kubectl_as(&alice, &["get", "secrets", "-n", "ns1"], None)
        .await;
    assert!(!out.ok);
    let out = c
        .kubectl_as(&alice, &["create", "configmap", "x", "-n", "ns1"], None)
        .await;
    assert!(out.stderr.contains(r#"configmaps is forbidden: User "alice" cannot create resource "configmaps" in API group "" in the namespace "ns1""#), "{}", out.stderr);
    // `edit` in one namespace lets her write there.
    c.admin_ok(&[
        "create",
        "rolebinding",
        "alice-edit",
        "-n",
        "ns1",
        "--clusterrole=edit",
        "--user=alice",
    ])
    .await;
    let out = c
        .kubectl_as(&alice, &["create", "configmap", "x", "-n", "ns1"], None)
        .await;
    assert!(out.ok, "{}", out.stderr);
    let out = c
        .kubectl_as(&alice, &["create", "configmap", "x", "-n", "other"], None)
        .await;
    assert!(!out.ok);
    // A certificate from another CA is not trusted: the TLS handshake refuses it.
    let foreign = kube_sim::tls::Ca::new("elsewhere")
        .unwrap()
        .client("mallory", &["system:masters"])
        .unwrap();
    let mallory = c.kubeconfig("mallory", &c.sim.kubeconfig_with_certificate(&foreign));
    let out = c
        .kubectl_as(&mallory, &["get", "secrets", "-n", "ns1"], None)
        .await;
    assert!(
        !out.ok,
        "a foreign certificate must not authenticate: {}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_the_service_account_volume_admission_adds() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    c.apply(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: quiet, namespace: ns1}
automountServiceAccountToken: false
---
apiVersion: v1
kind: Pod
metadata: {name: mounted, namespace: ns1}
spec:
  serviceAccountName: sa1
  initContainers: [{name: init, image: busybox}]
  containers: [{name: c, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: unmounted, namespace: ns1}
spec:
  serviceAccountName: quiet
  containers: [{name: c, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: overridden, namespace: ns1}
spec:
  serviceAccountName: quiet
  automountServiceAccountToken: true
  containers: [{name: c, image: busybox}]
"#,
    )
    .await;
    let c = &c;
    let pod = |name: &'static str| async move {
        let out = c
            .admin_ok(&["get", "pod", name, "-n", "ns1", "-o", "json"])
            .await;
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let p = pod("mounted").await;
    let vols = p["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{p}");
    let name = vols[0]["name"].as_str().unwrap();
    assert!(
        name.starts_with("kube-api-access-") && name.len() == "kube-api-access-".len() + 5,
        "{name}"
    );
    assert_eq!(
        vols[0]["projected"],
        json!({"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]})
    );
    for list in ["initContainers", "containers"] {
        assert_eq!(
            p["spec"][list][0]["volumeMounts"],
            json!([{"name": name, "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]),
            "{list}"
        );
    }
    assert!(
        pod("unmounted").await["spec"].get("volumes").is_none(),
        "the account turns automounting off"
    );
    assert_eq!(
        pod("overridden").await["spec"]["volumes"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "the pod's setting wins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_reads_only_what_its_pods_use() {
    let c = Cluster::start().await;
    c.apply(SETUP).await;
    c.apply(
        r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Secret
metadata: {name: used, namespace: ns1}
stringData: {k: v}
---
apiVersion: v1
kind: Secret
metadata: {name: unused, namespace: ns1}
stringData: {k: v}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: ns1}
spec:
  nodeName: n1
  serviceAccountName: sa1
  containers:
  - name: c
    image: busybox
    env: [{name: K, valueFrom: {secretKeyRef: {name: used, key: k}}}]
"#,
    )
    .await;
    let cert = c
        .sim
        .client_certificate("system:node:n1", &["system:nodes"])
        .unwrap();
    let kubelet = c.kubeconfig("kubelet", &c.sim.kubeconfig_with_certificate(&cert));
    let out = c
        .kubectl_as(
            &kubelet,
            &["get", "secret", "used", "-n", "ns1", "-o", "name"],
            None,
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    let out = c
        .kubectl_as(
            &kubelet,
            &[
                "get",
                "configmap",
                "kube-root-ca.crt",
                "-n",
                "ns1",
                "-o",
                "name",
            ],
            None,
        )
        .await;
    assert!(out.ok, "the token volume's CA is the pod's: {}", out.stderr);
    let out = c
        .kubectl_as(&kubelet, &["get", "secret", "unused", "-n", "ns1"], None)
        .await;
    assert!(
        out.stderr.contains(&forbidden(r#"secrets "unused" is forbidden: User "system:node:n1" cannot get resource "secrets" in API group "" in the namespace "ns1": no relationship found between node 'n1' and this object"#)),
        "{}",
        out.stderr
    );
    let out = c
        .kubectl_as(&kubelet, &["get", "secrets", "-n", "ns1"], None)
        .await;
    assert!(
        out.stderr
            .contains("can only get individual resources of this type"),
        "{}",
        out.stderr
    );
    // Its node and the pods are its to write and read (node rules), a Deployment is not.
    let out = c
        .kubectl_as(&kubelet, &["label", "node", "n1", "zone=a"], None)
        .await;
    assert!(out.ok, "{}", out.stderr);
    let out = c
        .kubectl_as(&kubelet, &["get", "deployments", "-n", "ns1"], None)
        .await;
    assert!(!out.ok, "{}", out.stdout);
    let out = c
        .kubectl_as(&kubelet, &["get", "pods", "-A", "-o", "name"], None)
        .await;
    assert!(out.ok && out.stdout.contains("pod/app"), "{}", out.stderr);
    // Tokens only for the service accounts of its pods.
    let out = c
        .kubectl_as(
            &kubelet,
            &[
                "create",
                "token",
                "sa1",
                "-n",
                "ns1",
                "--bound-object-kind=Pod",
                "--bound-object-name=app",
            ],
            None,
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    c.admin_ok(&["create", "sa", "other", "-n", "ns1"]).await;
    let out = c
        .kubectl_as(&kubelet, &["create", "token", "other", "-n", "ns1"], None)
        .await;
    assert!(
        !out.ok
            && out
                .stderr
                .contains("no relationship found between node 'n1' and this object"),
        "{}",
        out.stderr
    );
}
