//! Authentication, as kube-apiserver's authenticator chain does it: client certificates (CN =
//! user, O = groups), the admin token, ServiceAccount tokens issued through the TokenRequest API
//! (JWTs bound to an audience, a lifetime and optionally a Pod, Secret or Node), anonymous
//! requests, and impersonation. Also the objects the cluster publishes about its trust roots:
//! `kube-root-ca.crt` in every namespace and `kube-system/extension-apiserver-authentication`.

use crate::Core;
use crate::handlers::gr;
use crate::status::{ApiError, ApiResult, Cause};
use crate::store::{State, key};
use crate::tls::{Ca, ClientCert, TlsError, TlsIdentity};
use crate::util::*;
use base64::Engine;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

/// The bearer token of the admin kubeconfig; it authenticates as [`ADMIN_USER`].
pub const ADMIN_TOKEN: &str = "kube-sim";
/// The admin identity: a member of `system:masters`, which no authorizer can refuse.
pub const ADMIN_USER: &str = "kube-sim-admin";
pub const MASTERS: &str = "system:masters";
pub const AUTHENTICATED: &str = "system:authenticated";
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
pub const ANONYMOUS: &str = "system:anonymous";
/// Who a credential-less request on the plain-HTTP listener is.
pub const UNSECURED: &str = "system:unsecured";
/// The service-account issuer and the API server's audience, as kubeadm configures them.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The common name the front-proxy client certificate carries (`requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";
const ROOT_CA_DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";
/// A token bound to a pod stays valid this long after the pod started deleting.
const DELETED_POD_GRACE_SECS: i64 = 60;

/// Who is making a request, as authenticators and authorizers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub fn new(name: &str, groups: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            uid: String::new(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            extra: BTreeMap::new(),
        }
    }

    pub fn admin() -> Self {
        Self::new(ADMIN_USER, &[MASTERS, AUTHENTICATED])
    }

    pub fn anonymous() -> Self {
        Self::new(ANONYMOUS, &[UNAUTHENTICATED])
    }

    pub fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }

    /// The `userInfo` of admission reviews and review statuses.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"username": self.name, "groups": self.groups});
        if !self.uid.is_empty() {
            v["uid"] = json!(self.uid);
        }
        if !self.extra.is_empty() {
            v["extra"] = json!(self.extra);
        }
        v
    }

    /// Every authenticated user is also in `system:authenticated` (the group adder).
    fn with_authenticated(mut self) -> Self {
        if !self.in_group(AUTHENTICATED) && !self.in_group(UNAUTHENTICATED) {
            self.groups.push(AUTHENTICATED.into());
        }
        self
    }
}

/// `system:serviceaccount:<ns>:<name>` → (ns, name).
pub fn split_service_account(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

pub fn service_account_groups(ns: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
    ]
}

/// The cluster's trust material: the CA that signs the serving and client certificates, the
/// front-proxy CA and client certificate, and the key that signs ServiceAccount tokens.
#[derive(Debug)]
pub struct Authority {
    pub ca: Ca,
    pub serving: TlsIdentity,
    pub front_proxy_ca: Ca,
    pub front_proxy_client: ClientCert,
    /// What the API server presents to kubelets (kubeadm's `apiserver-kubelet-client`).
    pub kubelet_client: ClientCert,
    signing_key: ring::hmac::Key,
    key_id: String,
    /// Seconds added to the wall clock when issuing and checking tokens (a test hook).
    clock_offset: AtomicI64,
}

impl Authority {
    /// Fresh CAs and keys; the serving certificate is valid for `names`.
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let ca = Ca::new("kubernetes")?;
        let serving = ca.serving(names)?;
        let front_proxy_ca = Ca::new("front-proxy-ca")?;
        let front_proxy_client = front_proxy_ca.client(FRONT_PROXY_CLIENT, &[])?;
        let kubelet_client = ca.client("kube-apiserver-kubelet-client", &[MASTERS])?;
        let rng = ring::rand::SystemRandom::new();
        let signing_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| TlsError::GenerateSigningKey)?;
        let key_id =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_u64().to_be_bytes());
        Ok(Self {
            ca,
            serving,
            front_proxy_ca,
            front_proxy_client,
            kubelet_client,
            signing_key,
            key_id,
            clock_offset: AtomicI64::new(0),
        })
    }

    pub fn now(&self) -> i64 {
        now_secs() + self.clock_offset.load(Ordering::Relaxed)
    }

    pub fn advance_clock(&self, secs: i64) {
        self.clock_offset.fetch_add(secs, Ordering::Relaxed);
    }

    fn sign(&self, claims: &Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let header = json!({"alg": "HS256", "kid": self.key_id});
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let tag = ring::hmac::sign(&self.signing_key, signing_input.as_bytes());
        format!("{signing_input}.{}", b64(tag.as_ref()))
    }

    /// The claims of a token this server signed, or `None` for anything else.
    fn verify(&self, token: &str) -> Option<Value> {
        let mut parts = token.split('.');
        let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        ring::hmac::verify(&self.signing_key, format!("{h}.{c}").as_bytes(), &sig).ok()?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(c)
            .ok()?;
        serde_json::from_slice(&raw).ok()
    }
}

/// The answer to a request whose credentials do not authenticate.
pub fn unauthorized() -> ApiError {
    ApiError::new(401, "Unauthorized", "Unauthorized")
}

/// Authenticates a request as the real chain does: a verified client certificate first, then a
/// bearer token; no credentials at all make the request anonymous, bad ones are refused. On a
/// plain-HTTP listener (`secure` false) a request without credentials is `system:unsecured`,
/// as on the API server's old insecure port (kubectl sends no token over plain HTTP).
pub fn authenticate(
    core: &Core,
    headers: &http::HeaderMap,
    cert: Option<&(String, Vec<String>)>,
    secure: bool,
) -> ApiResult<UserInfo> {
    if let Some((cn, orgs)) = cert
        && !cn.is_empty()
    {
        let groups: Vec<&str> = orgs.iter().map(String::as_str).collect();
        return Ok(UserInfo::new(cn, &groups).with_authenticated());
    }
    let Some(auth) = headers.get(http::header::AUTHORIZATION) else {
        if !secure {
            return Ok(UserInfo::new(UNSECURED, &[MASTERS, AUTHENTICATED]));
        }
        return Ok(UserInfo::anonymous());
    };
    let auth = auth.to_str().map_err(|_| unauthorized())?;
    let token = match auth.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        // Basic auth and other schemes have no authenticator here.
        _ => return Err(unauthorized()),
    };
    if token.is_empty() {
        return Ok(UserInfo::anonymous());
    }
    if token == ADMIN_TOKEN {
        return Ok(UserInfo::admin());
    }
    let st = core.lock();
    match service_account_user(&core.auth, &st, token) {
        Ok(u) => Ok(u.with_authenticated()),
        Err(why) => {
            tracing::debug!(%why, "refused a bearer token");
            Err(unauthorized())
        }
    }
}

/// Checks a ServiceAccount token as the service-account authenticator does: signature,
/// issuer, audience, lifetime, then that the account and any bound object still exist with
/// the UIDs the token names.
fn service_account_user(auth: &Authority, st: &State, token: &str) -> Result<UserInfo, String> {
    let claims = auth
        .verify(token)
        .ok_or("the token was not signed by this server")?;
    if claims["iss"] != ISSUER {
        return Err("unknown issuer".into());
    }
    let aud_ok = claims["aud"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == ISSUER));
    if !aud_ok {
        return Err("token audiences do not include the API server".into());
    }
    let now = auth.now();
    let exp = claims["exp"].as_i64().unwrap_or(0);
    let nbf = claims["nbf"].as_i64().unwrap_or(0);
    if now >= exp {
        return Err("service account token has expired".into());
    }
    if now < nbf {
        return Err("service account token is not valid yet".into());
    }
    let k8s = &claims["kubernetes.io"];
    let ns = k8s["namespace"].as_str().unwrap_or("");
    let sa_name = k8s["serviceaccount"]["name"].as_str().unwrap_or("");
    let sa_uid = k8s["serviceaccount"]["uid"].as_str().unwrap_or("");
    let sa = st
        .get(&gr("", "serviceaccounts"), &key(ns, sa_name))
        .ok_or("the service account no longer exists")?;
    if uid_of(&sa) != sa_uid {
        return Err(format!(
            "service account UID ({}) does not match claim ({sa_uid})",
            uid_of(&sa)
        ));
    }
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (kind, resource, namespaced) in [
        ("pod", "pods", true),
        ("secret", "secrets", true),
        ("node", "nodes", false),
    ] {
        let r = &k8s[kind];
        let Some(name) = r["name"].as_str() else {
            continue;
        };
        let k = key(if namespaced { ns } else { "" }, name);
        let obj = st
            .get(&gr("", resource), &k)
            .ok_or("service account token has been invalidated")?;
        if uid_of(&obj) != r["uid"].as_str().unwrap_or("") {
            return Err(format!("{kind} UID does not match the claim"));
        }
        if kind == "pod" {
            let deleted_at = obj
                .pointer("/metadata/deletionTimestamp")
                .and_then(Value::as_str)
                .and_then(parse_rfc3339);
            if deleted_at.is_some_and(|t| t + DELETED_POD_GRACE_SECS < now) {
                return Err("service account token has been invalidated".into());
            }
        }
        if kind != "secret" {
            extra.insert(
                format!("authentication.kubernetes.io/{kind}-name"),
                vec![name.to_owned()],
            );
            extra.insert(
                format!("authentication.kubernetes.io/{kind}-uid"),
                vec![uid_of(&obj).to_owned()],
            );
        }
    }
    if let Some(jti) = claims["jti"].as_str() {
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            vec![format!("JTI={jti}")],
        );
    }
    Ok(UserInfo {
        name: format!("system:serviceaccount:{ns}:{sa_name}"),
        uid: sa_uid.to_owned(),
        groups: service_account_groups(ns),
        extra,
    })
}

/// `POST .../serviceaccounts/<name>/token`: issues a token for the account (TokenRequest).
pub fn token_request(core: &Core, ns: &str, name: &str, mut req: Value) -> ApiResult<Value> {
    let kind = req.get("kind").and_then(Value::as_str).unwrap_or("");
    if !kind.is_empty() && kind != "TokenRequest" {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind (TokenRequest)"
        )));
    }
    let spec = req.get("spec").cloned().unwrap_or(json!({}));
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => 3600,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("spec.expirationSeconds must be an integer"))?,
    };
    let mut causes = Vec::new();
    if expiration < 600 {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > 1 << 32 {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(
            "authentication.k8s.io",
            "TokenRequest",
            name_of(&req),
            causes,
        ));
    }
    let mut audiences = string_list(spec.get("audiences"));
    if audiences.is_empty() {
        audiences.push(ISSUER.to_owned());
    }
    let st = core.lock();
    let sa = st
        .get(&gr("", "serviceaccounts"), &key(ns, name))
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let mut k8s = json!({
        "namespace": ns,
        "serviceaccount": {"name": name, "uid": uid_of(&sa)},
    });
    if let Some(r) = spec.get("boundObjectRef").filter(|r| !r.is_null()) {
        let rkind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        let rav = r.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let rname = r.get("name").and_then(Value::as_str).unwrap_or("");
        let (group, version) = rav.rsplit_once('/').unwrap_or(("", rav));
        let (resource, namespaced) = match (group, rkind) {
            ("", "Pod") => ("pods", true),
            ("", "Secret") => ("secrets", true),
            ("", "Node") => ("nodes", false),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of type {group}/{version}, Kind={rkind}"
                )));
            }
        };
        let obj = st
            .get(
                &gr("", resource),
                &key(if namespaced { ns } else { "" }, rname),
            )
            .ok_or_else(|| ApiError::not_found("", resource, rname))?;
        if resource == "pods" {
            let pod_sa = obj
                .pointer("/spec/serviceAccountName")
                .and_then(Value::as_str)
                .unwrap_or("");
            if pod_sa != name {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token for serviceaccount {name:?} to pod running with serviceaccount {pod_sa:?}"
                )));
            }
        }
        let want_uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
        if !want_uid.is_empty() && want_uid != uid_of(&obj) {
            return Err(ApiError::conflict(
                "",
                rkind,
                rname,
                &format!(
                    "the UID in the bound object reference ({want_uid}) does not match the UID in record ({}). The object might have been deleted and then recreated",
                    uid_of(&obj)
                ),
            ));
        }
        let field = rkind.to_lowercase();
        k8s[&field] = json!({"name": rname, "uid": uid_of(&obj)});
        // A pod-bound token also names the pod's node, when it is scheduled.
        if resource == "pods"
            && let Some(node) = obj.pointer("/spec/nodeName").and_then(Value::as_str)
            && let Some(n) = st.get(&gr("", "nodes"), &key("", node))
        {
            k8s["node"] = json!({"name": node, "uid": uid_of(&n)});
        }
    }
    drop(st);
    let now = core.auth.now();
    let exp = now + expiration;
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "iss": ISSUER,
        "jti": new_uid(),
        "kubernetes.io": k8s,
        "nbf": now,
        "sub": format!("system:serviceaccount:{ns}:{name}"),
    });
    let token = core.auth.sign(&claims);
    let mut spec_out = spec;
    spec_out["audiences"] = json!(audiences);
    spec_out["expirationSeconds"] = json!(expiration);
    if spec_out.get("boundObjectRef").is_none() {
        spec_out["boundObjectRef"] = Value::Null;
    }
    req["apiVersion"] = json!("authentication.k8s.io/v1");
    req["kind"] = json!("TokenRequest");
    let m = meta_mut(&mut req);
    m.insert("name".into(), json!(name));
    m.insert("namespace".into(), json!(ns));
    m.insert("creationTimestamp".into(), json!(format_rfc3339(now)));
    req["spec"] = spec_out;
    req["status"] = json!({"token": token, "expirationTimestamp": format_rfc3339(exp)});
    Ok(req)
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: what an extension API server (or any
/// delegating component) asks to learn who a bearer token belongs to.
pub fn token_review(core: &Core, mut review: Value) -> Value {
    let token = review
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let wanted = string_list(review.pointer("/spec/audiences"));
    let result = if token == ADMIN_TOKEN {
        Ok(UserInfo::admin())
    } else {
        let st = core.lock();
        service_account_user(&core.auth, &st, &token).map(UserInfo::with_authenticated)
    };
    let audiences = if wanted.is_empty() {
        vec![ISSUER.to_owned()]
    } else {
        wanted.clone()
    };
    review["status"] = match result {
        Ok(u) if wanted.is_empty() || wanted.iter().any(|a| a == ISSUER) => {
            json!({"authenticated": true, "user": u.to_json(), "audiences": [ISSUER]})
        }
        Ok(_) => json!({"authenticated": false, "audiences": audiences,
            "error": "token audiences do not match the requested audiences"}),
        Err(why) => json!({"authenticated": false, "error": why}),
    };
    review
}

/// Applies `Impersonate-*` headers: the caller must be allowed to `impersonate` each requested
/// user, service account, group, uid and extra, and then acts as that identity.
pub fn impersonate(
    core: &Core,
    caller: &UserInfo,
    headers: &http::HeaderMap,
) -> ApiResult<Option<UserInfo>> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    };
    let users = values("impersonate-user");
    let groups = values("impersonate-group");
    let uids = values("impersonate-uid");
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        if let Some(suffix) = k.as_str().strip_prefix("impersonate-extra-")
            && let Ok(v) = v.to_str()
        {
            extra
                .entry(percent_unescape(suffix).to_lowercase())
                .or_default()
                .push(v.to_owned());
        }
    }
    if users.is_empty() && groups.is_empty() && uids.is_empty() && extra.is_empty() {
        return Ok(None);
    }
    let Some(user) = users.first() else {
        return Err(ApiError::internal(
            "requested [Impersonate-Group] without impersonating a user",
        ));
    };
    let check = |attrs: crate::rbac::Attributes| -> ApiResult<()> {
        match crate::rbac::authorize(core, caller, &attrs) {
            crate::rbac::Decision::Allow(_) => Ok(()),
            crate::rbac::Decision::Deny(reason) => {
                Err(crate::rbac::forbidden(caller, &attrs, &reason))
            }
        }
    };
    let imp = |resource: &str, group: &str, ns: &str, name: &str| crate::rbac::Attributes {
        verb: "impersonate".into(),
        resource_request: true,
        api_group: group.into(),
        api_version: String::new(),
        resource: resource.into(),
        subresource: String::new(),
        namespace: ns.into(),
        name: name.into(),
        path: String::new(),
    };
    let mut out_groups = Vec::new();
    match split_service_account(user) {
        Some((ns, name)) => {
            check(imp("serviceaccounts", "", ns, name))?;
            if groups.is_empty() {
                out_groups = service_account_groups(ns);
            }
        }
        None => check(imp("users", "", "", user))?,
    }
    for g in &groups {
        check(imp("groups", "", "", g))?;
        out_groups.push(g.clone());
    }
    for u in &uids {
        check(imp("uids", "authentication.k8s.io", "", u))?;
    }
    for (k, vs) in &extra {
        for v in vs {
            let mut a = imp("userextras", "authentication.k8s.io", "", v);
            a.subresource = k.clone();
            check(a)?;
        }
    }
    if user != ANONYMOUS
        && !out_groups
            .iter()
            .any(|g| g == AUTHENTICATED || g == UNAUTHENTICATED)
    {
        out_groups.push(AUTHENTICATED.into());
    }
    Ok(Some(UserInfo {
        name: user.clone(),
        uid: uids.first().cloned().unwrap_or_default(),
        groups: out_groups,
        extra,
    }))
}

fn percent_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the ServiceAccount admission plugin mounts the API credentials in every container.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The ServiceAccount admission plugin on a Pod create: unless automounting is off (the pod's
/// `automountServiceAccountToken` beats its account's), every container without a mount at
/// [`TOKEN_MOUNT_PATH`] gets one of a projected `kube-api-access-<random>` volume holding a
/// bound token, the cluster CA and the namespace.
pub fn admit_service_account(core: &Core, ns: &str, pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec") else {
        return;
    };
    let sa_name = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_owned();
    let automount = match spec
        .get("automountServiceAccountToken")
        .and_then(Value::as_bool)
    {
        Some(a) => a,
        None => core
            .lock()
            .get(&gr("", "serviceaccounts"), &key(ns, &sa_name))
            .and_then(|sa| {
                sa.get("automountServiceAccountToken")
                    .and_then(Value::as_bool)
            })
            .unwrap_or(true),
    };
    if !automount {
        return;
    }
    let existing = spec
        .get("volumes")
        .and_then(Value::as_array)
        .and_then(|vs| {
            vs.iter()
                .filter_map(|v| v.get("name").and_then(Value::as_str))
                .find(|n| n.starts_with("kube-api-access-"))
                .map(str::to_owned)
        });
    let volume_name = existing
        .clone()
        .unwrap_or_else(|| format!("kube-api-access-{}", name_suffix()));
    let mut needs_volume = false;
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in cs {
            let mounts = as_object_mut(c)
                .entry("volumeMounts")
                .or_insert_with(|| json!([]));
            let Some(ms) = mounts.as_array_mut() else {
                continue;
            };
            if ms.iter().any(|m| m["mountPath"] == TOKEN_MOUNT_PATH) {
                continue;
            }
            ms.push(json!({"name": volume_name, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH}));
            needs_volume = true;
        }
    }
    if existing.is_none() && needs_volume {
        let volumes = as_object_mut(spec)
            .entry("volumes")
            .or_insert_with(|| json!([]));
        if let Some(vs) = volumes.as_array_mut() {
            vs.push(json!({"name": volume_name, "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ]}}));
        }
    }
}

/// What kube-controller-manager's root-CA publisher keeps in every namespace.
fn root_ca_configmap(core: &Core, ns: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": ns, "uid": new_uid(),
            "creationTimestamp": now_rfc3339(),
            "annotations": {"kubernetes.io/description": ROOT_CA_DESCRIPTION}},
        "data": {"ca.crt": core.auth.ca.pem},
    })
}

/// Keeps `kube-root-ca.crt` in every live namespace, recreating or restoring it when a write
/// removed or changed it (run under the store lock after each write).
pub fn publish_root_ca(core: &Core, st: &mut State, group: &str, plural: &str, stored: &Value) {
    if !group.is_empty() {
        return;
    }
    let ns = match plural {
        "namespaces" => name_of(stored).to_owned(),
        "configmaps" if name_of(stored) == ROOT_CA_CONFIGMAP => namespace_of(stored).to_owned(),
        _ => return,
    };
    let Some(namespace) = st.get(&gr("", "namespaces"), &key("", &ns)) else {
        return;
    };
    if is_deleting(&namespace) {
        return;
    }
    let cms = gr("", "configmaps");
    let current = st.get(&cms, &key(&ns, ROOT_CA_CONFIGMAP));
    match current {
        Some(c) if c.pointer("/data/ca.crt").and_then(Value::as_str) == Some(&core.auth.ca.pem) => {
        }
        Some(c) => {
            let mut fixed = (*c).clone();
            fixed["data"] = json!({"ca.crt": core.auth.ca.pem});
            st.put(&cms, fixed);
        }
        None => {
            st.put(&cms, root_ca_configmap(core, &ns));
        }
    }
}

/// `kube-system/extension-apiserver-authentication`, as kube-apiserver publishes it for
/// extension API servers: the client CA, and which front-proxy certificates and headers to
/// trust.
pub fn publish_extension_authentication(core: &Core, st: &mut State) {
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system",
            "uid": new_uid(), "creationTimestamp": now_rfc3339()},
        "data": {
            "client-ca-file": core.auth.ca.pem,
            "requestheader-client-ca-file": core.auth.front_proxy_ca.pem,
            "requestheader-allowed-names": json!([FRONT_PROXY_CLIENT]).to_string(),
            "requestheader-extra-headers-prefix": json!(["X-Remote-Extra-"]).to_string(),
            "requestheader-group-headers": json!(["X-Remote-Group"]).to_string(),
            "requestheader-username-headers": json!(["X-Remote-User"]).to_string(),
        },
    });
    st.put(&gr("", "configmaps"), cm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_names_split() {
        assert_eq!(
            split_service_account("system:serviceaccount:ns:sa"),
            Some(("ns", "sa"))
        );
        assert_eq!(split_service_account("system:serviceaccount:ns"), None);
        assert_eq!(split_service_account("alice"), None);
    }

    #[test]
    fn tokens_verify_only_when_untouched() {
        let a = Authority::generate(&["127.0.0.1"]).unwrap();
        let t = a.sign(&json!({"sub": "x"}));
        assert_eq!(a.verify(&t).unwrap()["sub"], "x");
        let mut forged = t.clone();
        forged.insert(t.find('.').unwrap() + 2, 'A');
        assert!(a.verify(&forged).is_none());
        assert!(a.verify("a.b").is_none());
    }
}
