//! Who is asking, and may they: the aggregation layer's front-proxy authentication (the client
//! CA, allowed names and headers from `kube-system/extension-apiserver-authentication`) and
//! authorisation of every request by a SubjectAccessReview, with the short allow/deny cache of
//! the API server's delegating authorizer (10 s each).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};

use super::object::Attributes;
use crate::error::Error;

pub const AUTHENTICATION_CONFIG_MAP: &str = "extension-apiserver-authentication";
const CACHE_TTL: Duration = Duration::from_secs(10);

/// What the API server publishes for extension servers to trust its front proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FrontProxy {
    pub client_ca_pem: String,
    /// Common names the proxy's certificate may have; empty: any signed by the CA.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_headers_prefixes: Vec<String>,
}

fn json_list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key).map(|s| s.trim()) {
        None | Some("") => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v).map_err(|e| format!("{key} is not a JSON list: {e}")),
    }
}

/// The front-proxy settings from the ConfigMap's data (JSON string lists, as kube-apiserver
/// writes them).
pub fn parse_front_proxy(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
    let client_ca_pem = data
        .get("requestheader-client-ca-file")
        .filter(|s| !s.trim().is_empty())
        .cloned()
        .ok_or_else(|| {
            "it has no requestheader-client-ca-file: the API server has no front proxy (aggregation layer) configured".to_owned()
        })?;
    Ok(FrontProxy {
        client_ca_pem,
        allowed_names: json_list(data, "requestheader-allowed-names")?,
        username_headers: json_list(data, "requestheader-username-headers")?,
        group_headers: json_list(data, "requestheader-group-headers")?,
        extra_headers_prefixes: json_list(data, "requestheader-extra-headers-prefix")?,
    })
}

/// Reads the front-proxy settings (the chart binds the reader Role for this).
pub async fn load_front_proxy(client: &kube::Client) -> Result<FrontProxy, Error> {
    const ACTION: &str =
        "read the front-proxy configuration (kube-system/extension-apiserver-authentication)";
    let cm = Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .get(AUTHENTICATION_CONFIG_MAP)
        .await
        .map_err(Error::kube(ACTION))?;
    parse_front_proxy(&cm.data.unwrap_or_default()).map_err(|reason| Error::Invalid {
        action: ACTION,
        reason,
    })
}

/// The caller, as the front proxy names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The common name of a DER certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// `%XX` of an extra header's key back to bytes, lower-cased first as the API server does.
fn unescape_key(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.to_ascii_lowercase())
        .decode_utf8_lossy()
        .into_owned()
}

/// The user from the request headers, once the client certificate verified against the
/// front-proxy CA and its common name is allowed [apiserver:
/// pkg/authentication/request/headerrequest/requestheader.go]: the first non-empty username
/// header, every group header's values, the extras by prefix. `None`: no user header.
pub fn user_from_headers(cfg: &FrontProxy, headers: &hyper::HeaderMap) -> Option<User> {
    let name = cfg.username_headers.iter().find_map(|h| {
        headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    })?;
    let groups = cfg
        .group_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()).iter())
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        for prefix in &cfg.extra_headers_prefixes {
            let prefix = prefix.to_ascii_lowercase();
            if let Some(key) = k.as_str().strip_prefix(prefix.as_str())
                && let Ok(v) = v.to_str()
            {
                extra
                    .entry(unescape_key(key))
                    .or_default()
                    .push(v.to_owned());
            }
        }
    }
    Some(User {
        name,
        groups,
        extra,
    })
}

/// Whether the certificate the front proxy presented may speak for users.
pub fn allowed_proxy(cfg: &FrontProxy, peer_common_name: Option<&str>) -> bool {
    match peer_common_name {
        None => false,
        Some(cn) => cfg.allowed_names.is_empty() || cfg.allowed_names.iter().any(|n| n == cn),
    }
}

/// A SubjectAccessReview for `user` doing `attrs`.
pub fn build_review(user: &User, attrs: &Attributes) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(attrs.verb.clone()),
                group: Some(attrs.group.clone()),
                resource: Some(attrs.resource.clone()),
                namespace: (!attrs.namespace.is_empty()).then(|| attrs.namespace.clone()),
                name: (!attrs.name.is_empty()).then(|| attrs.name.clone()),
                version: Some("*".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// A decision: allowed, and the authorizer's reason.
pub type Decision = (bool, String);

/// Asks the API server, remembering answers for a few seconds.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<HashMap<(User, Attributes), (Instant, Decision)>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Self {
        Authorizer {
            client,
            cache: Mutex::default(),
        }
    }

    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<Decision, Error> {
        let key = (user.clone(), attrs.clone());
        {
            let mut cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if let Some((_, d)) = cache.get(&key) {
                return Ok(d.clone());
            }
        }
        let review = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &build_review(user, attrs))
            .await
            .map_err(Error::kube("create a SubjectAccessReview"))?;
        let status = review.status.unwrap_or_default();
        let decision = (
            status.allowed && status.denied != Some(true),
            status.reason.unwrap_or_default(),
        );
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (Instant::now(), decision.clone()));
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data() -> BTreeMap<String, String> {
        [
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn the_config_map_parses() {
        let cfg = parse_front_proxy(&data()).unwrap();
        assert_eq!(cfg.client_ca_pem, "PEM");
        assert_eq!(cfg.allowed_names, ["front-proxy-client"]);
        assert_eq!(cfg.username_headers, ["X-Remote-User"]);
        let mut d = data();
        d.remove("requestheader-client-ca-file");
        assert!(
            parse_front_proxy(&d)
                .unwrap_err()
                .contains("requestheader-client-ca-file")
        );
        d = data();
        d.insert(
            "requestheader-group-headers".into(),
            "X-Remote-Group".into(),
        );
        assert!(parse_front_proxy(&d).is_err());
    }

    #[test]
    fn the_user_comes_from_the_configured_headers() {
        let cfg = parse_front_proxy(&data()).unwrap();
        let mut h = hyper::HeaderMap::new();
        assert_eq!(user_from_headers(&cfg, &h), None);
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "a".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.append(
            "x-remote-extra-authentication.kubernetes.io%2fcredential-id",
            "JTI=1".parse().unwrap(),
        );
        h.insert("x-other-user", "mallory".parse().unwrap());
        let u = user_from_headers(&cfg, &h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, ["a", "system:authenticated"]);
        assert_eq!(
            u.extra,
            BTreeMap::from([(
                "authentication.kubernetes.io/credential-id".to_owned(),
                vec!["JTI=1".to_owned()]
            )])
        );
    }

    #[test]
    fn only_allowed_proxy_names_speak_for_users() {
        let mut cfg = parse_front_proxy(&data()).unwrap();
        assert!(allowed_proxy(&cfg, Some("front-proxy-client")));
        assert!(!allowed_proxy(&cfg, Some("someone-else")));
        assert!(!allowed_proxy(&cfg, None));
        cfg.allowed_names.clear();
        assert!(allowed_proxy(&cfg, Some("someone-else")));
    }

    #[test]
    fn a_review_carries_the_user_and_the_attributes() {
        let user = User {
            name: "alice".into(),
            groups: vec!["g".into()],
            extra: BTreeMap::new(),
        };
        let attrs = Attributes {
            verb: "get".into(),
            group: "stash.appscode.com".into(),
            resource: "repositories".into(),
            namespace: "demo".into(),
            name: String::new(),
        };
        let r = build_review(&user, &attrs);
        assert_eq!(r.spec.user.as_deref(), Some("alice"));
        let ra = r.spec.resource_attributes.unwrap();
        assert_eq!(ra.namespace.as_deref(), Some("demo"));
        assert_eq!(ra.name, None);
        assert_eq!(ra.resource.as_deref(), Some("repositories"));
    }
}
