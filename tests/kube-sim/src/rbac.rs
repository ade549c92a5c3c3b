//! Authorization, as kube-apiserver's RBAC authorizer does it: request attributes parsed from
//! the URL like `RequestInfoFactory`, `system:masters` always allowed, then the rules of every
//! ClusterRoleBinding and of the RoleBindings in the request's namespace; the bootstrap roles
//! and bindings a fresh cluster has; and the access reviews (`SubjectAccessReview`,
//! `SelfSubjectAccessReview`, `LocalSubjectAccessReview`, `SelfSubjectRulesReview`).

use crate::Core;
use crate::auth::{self, UserInfo};
use crate::handlers::gr;
use crate::status::{ApiError, Cause};
use crate::store::{State, key};
use crate::util::*;
use serde_json::{Value, json};
use std::collections::HashMap;

const RBAC: &str = "rbac.authorization.k8s.io";

/// What a request asks to do, as authorizers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub resource_request: bool,
    pub api_group: String,
    pub api_version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path of a non-resource request.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed, with the reason (which binding allowed it; empty for `system:masters`).
    Allow(String),
    /// Not allowed, with the reason (errors met while collecting rules; usually empty).
    Deny(String),
}

/// Parses a request like the API server's request-info factory.
pub fn attributes(
    method: &http::Method,
    path: &str,
    query: &HashMap<String, String>,
) -> Attributes {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let non_resource = || Attributes {
        verb: method.as_str().to_lowercase(),
        path: path.to_owned(),
        ..Default::default()
    };
    if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
        return non_resource();
    }
    let mut a = Attributes {
        resource_request: true,
        path: path.to_owned(),
        ..Default::default()
    };
    let mut cur = &parts[1..];
    if parts[0] == "apis" {
        if cur.len() < 3 {
            return non_resource();
        }
        a.api_group = cur[0].to_owned();
        cur = &cur[1..];
    }
    a.api_version = cur[0].to_owned();
    cur = &cur[1..];
    if cur.first() == Some(&"watch") || cur.first() == Some(&"proxy") {
        if cur.len() < 2 {
            return non_resource();
        }
        a.verb = cur[0].to_owned();
        cur = &cur[1..];
    } else {
        a.verb = match *method {
            http::Method::POST => "create",
            http::Method::GET | http::Method::HEAD => "get",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "",
        }
        .to_owned();
    }
    if cur.first() == Some(&"namespaces")
        && let Some(ns) = cur.get(1)
    {
        a.namespace = (*ns).to_owned();
        if cur.len() > 2 && !matches!(cur[2], "status" | "finalize") {
            cur = &cur[2..];
        }
    }
    if cur.len() >= 3 && a.verb != "proxy" {
        a.subresource = cur[2].to_owned();
    }
    if cur.len() >= 2 {
        a.name = cur[1].to_owned();
    }
    if let Some(r) = cur.first() {
        a.resource = (*r).to_owned();
    }
    if a.name.is_empty() && a.verb == "get" {
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        a.verb = if watch { "watch" } else { "list" }.to_owned();
        // A list or watch of one name (`fieldSelector=metadata.name=x`) is about that name.
        if let Some(fs) = query.get("fieldSelector")
            && let Some(n) = fs
                .split(',')
                .find_map(|t| t.trim().strip_prefix("metadata.name="))
                .or_else(|| {
                    fs.split(',')
                        .find_map(|t| t.trim().strip_prefix("metadata.name=="))
                })
            && !n.is_empty()
            && !n.contains('/')
        {
            a.name = n.to_owned();
        }
    }
    if a.name.is_empty() && a.verb == "delete" {
        a.verb = "deletecollection".into();
    }
    a
}

fn strs(v: &Value, k: &str) -> Vec<String> {
    string_list(v.get(k))
}

/// `RuleAllows` of the RBAC authorizer.
fn rule_allows(a: &Attributes, rule: &Value) -> bool {
    let verbs = strs(rule, "verbs");
    if !verbs.iter().any(|v| v == "*" || *v == a.verb) {
        return false;
    }
    if !a.resource_request {
        return strs(rule, "nonResourceURLs").iter().any(|u| {
            u == "*"
                || *u == a.path
                || (u.ends_with('*') && a.path.starts_with(u.trim_end_matches('*')))
        });
    }
    let combined = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let groups_ok = strs(rule, "apiGroups")
        .iter()
        .any(|g| g == "*" || *g == a.api_group);
    let resources_ok = strs(rule, "resources").iter().any(|r| {
        r == "*"
            || *r == combined
            || (!a.subresource.is_empty()
                && r.len() == a.subresource.len() + 2
                && r.starts_with("*/")
                && r.ends_with(&a.subresource))
    });
    let names = strs(rule, "resourceNames");
    let names_ok = names.is_empty() || names.contains(&a.name);
    groups_ok && resources_ok && names_ok
}

/// `appliesToUser`: whether a binding subject is this user.
fn applies_to(user: &UserInfo, subject: &Value, binding_ns: &str) -> bool {
    let name = subject.get("name").and_then(Value::as_str).unwrap_or("");
    match subject.get("kind").and_then(Value::as_str).unwrap_or("") {
        "User" => user.name == name,
        "Group" => user.in_group(name),
        "ServiceAccount" => {
            let ns = subject
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            !ns.is_empty() && user.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn describe_subject(subject: &Value, binding_ns: &str) -> String {
    let kind = subject.get("kind").and_then(Value::as_str).unwrap_or("");
    let name = subject.get("name").and_then(Value::as_str).unwrap_or("");
    if kind == "ServiceAccount" {
        let ns = subject
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or(binding_ns);
        return format!("{kind} {:?}", format!("{name}/{ns}"));
    }
    format!("{kind} {name:?}")
}

/// The rules of a role; a ClusterRole with an `aggregationRule` has the rules of the
/// ClusterRoles its selectors match (what the aggregation controller writes into it).
fn role_rules(st: &State, role: &Value, depth: usize) -> Vec<Value> {
    let mut rules: Vec<Value> = role
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let selectors = role
        .pointer("/aggregationRule/clusterRoleSelectors")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if selectors.is_empty() || depth > 4 {
        return rules;
    }
    rules.clear();
    let sels: Vec<_> = selectors
        .iter()
        .map(crate::selectors::LabelSelector::from_object)
        .collect();
    if let Some(t) = st.tables.get(&gr(RBAC, "clusterroles")) {
        for other in t.objects.values() {
            if name_of(other) == name_of(role) {
                continue;
            }
            if sels
                .iter()
                .any(|s| !s.is_empty() && s.matches(labels_of(other)))
            {
                for r in role_rules(st, other, depth + 1) {
                    if !rules.contains(&r) {
                        rules.push(r);
                    }
                }
            }
        }
    }
    rules
}

/// Visits every rule that applies to `user` in `ns` (cluster bindings first), with the binding
/// that grants it; stops when `visit` returns false. Returns the errors met (missing roles).
fn visit_rules(
    st: &State,
    user: &UserInfo,
    ns: &str,
    visit: &mut dyn FnMut(&str, &Value) -> bool,
) -> Vec<String> {
    let mut errors = Vec::new();
    let cluster_role = |name: &str| st.get(&gr(RBAC, "clusterroles"), &key("", name));
    if let Some(t) = st.tables.get(&gr(RBAC, "clusterrolebindings")) {
        for b in t.objects.values() {
            let role_name = b
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            for s in b
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !applies_to(user, s, "") {
                    continue;
                }
                let Some(role) = cluster_role(role_name) else {
                    errors.push(format!(
                        "clusterrole.rbac.authorization.k8s.io {role_name:?} not found"
                    ));
                    break;
                };
                let source = format!(
                    "ClusterRoleBinding {:?} of ClusterRole {role_name:?} to {}",
                    name_of(b),
                    describe_subject(s, "")
                );
                for r in role_rules(st, &role, 0) {
                    if !visit(&source, &r) {
                        return errors;
                    }
                }
                break;
            }
        }
    }
    if ns.is_empty() {
        return errors;
    }
    if let Some(t) = st.tables.get(&gr(RBAC, "rolebindings")) {
        let prefix = format!("{ns}/");
        for (k, b) in &t.objects {
            if !k.starts_with(&prefix) {
                continue;
            }
            let role_kind = b
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or("");
            let role_name = b
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            for s in b
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !applies_to(user, s, ns) {
                    continue;
                }
                let role = match role_kind {
                    "ClusterRole" => cluster_role(role_name),
                    _ => st.get(&gr(RBAC, "roles"), &key(ns, role_name)),
                };
                let Some(role) = role else {
                    let what = if role_kind == "ClusterRole" {
                        "clusterrole"
                    } else {
                        "role"
                    };
                    errors.push(format!(
                        "{what}.rbac.authorization.k8s.io {role_name:?} not found"
                    ));
                    break;
                };
                let source = format!(
                    "RoleBinding {:?} of {role_kind} {role_name:?} to {}",
                    format!("{}/{ns}", name_of(b)),
                    describe_subject(s, ns)
                );
                for r in role_rules(st, &role, 0) {
                    if !visit(&source, &r) {
                        return errors;
                    }
                }
                break;
            }
        }
    }
    errors
}

/// The authorizer chain, as `--authorization-mode=Node,RBAC` with the privileged group:
/// `system:masters` first, then the Node authorizer, then RBAC.
pub fn authorize(core: &Core, user: &UserInfo, a: &Attributes) -> Decision {
    if user.in_group(auth::MASTERS) {
        return Decision::Allow(String::new());
    }
    let st = core.lock();
    let node_reason = match authorize_node(&st, user, a) {
        Some(Decision::Allow(r)) => return Decision::Allow(r),
        Some(Decision::Deny(r)) => r,
        None => String::new(),
    };
    match authorize_in(&st, user, a) {
        Decision::Deny(r) if !node_reason.is_empty() => {
            // The union of authorizers joins the reasons of those that had one.
            let joined = [node_reason, r]
                .into_iter()
                .filter(|x| !x.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            Decision::Deny(joined)
        }
        d => d,
    }
}

/// The rules the Node authorizer grants every kubelet (bootstrap policy's node rules).
fn node_rules() -> Vec<Value> {
    vec![
        rule("authentication.k8s.io", "tokenreviews", "create"),
        rule(
            "authorization.k8s.io",
            "localsubjectaccessreviews subjectaccessreviews",
            "create",
        ),
        rule("core", "services", RO),
        rule("core", "nodes", "create get list watch patch update"),
        rule("core", "nodes/status", "patch update"),
        rule("core", "events", "create patch update"),
        rule("core", "pods", "get list watch create delete"),
        rule("core", "pods/status", "patch update"),
        rule("core", "pods/eviction", "create"),
        rule("core", "endpoints", "get"),
        rule(
            "certificates.k8s.io",
            "certificatesigningrequests",
            "create get list watch",
        ),
        rule(
            "coordination.k8s.io",
            "leases",
            "create delete get patch update",
        ),
        rule("storage.k8s.io", "volumeattachments", "get"),
        rule("core", "persistentvolumeclaims/status", "get patch update"),
        rule("storage.k8s.io", "csidrivers", RO),
        rule(
            "storage.k8s.io",
            "csinodes",
            "create delete get patch update",
        ),
        rule("node.k8s.io", "runtimeclasses", RO),
    ]
}

/// Whether a pod's spec refers to `resource` `name` (secrets, configmaps, claims).
fn pod_refers_to(pod: &Value, resource: &str, name: &str) -> bool {
    let spec = &pod["spec"];
    let mut names: Vec<&str> = Vec::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        match resource {
            "secrets" => names.push(v["secret"]["secretName"].as_str().unwrap_or("")),
            "configmaps" => names.push(v["configMap"]["name"].as_str().unwrap_or("")),
            "persistentvolumeclaims" => {
                names.push(
                    v["persistentVolumeClaim"]["claimName"]
                        .as_str()
                        .unwrap_or(""),
                );
            }
            _ => {}
        }
        for src in v["projected"]["sources"].as_array().into_iter().flatten() {
            match resource {
                "secrets" => names.push(src["secret"]["name"].as_str().unwrap_or("")),
                "configmaps" => names.push(src["configMap"]["name"].as_str().unwrap_or("")),
                _ => {}
            }
        }
    }
    if resource == "secrets" {
        for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
            names.push(s["name"].as_str().unwrap_or(""));
        }
    }
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            let (ref_key, from_key) = match resource {
                "secrets" => ("secretKeyRef", "secretRef"),
                "configmaps" => ("configMapKeyRef", "configMapRef"),
                _ => continue,
            };
            for e in c["env"].as_array().into_iter().flatten() {
                names.push(e["valueFrom"][ref_key]["name"].as_str().unwrap_or(""));
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                names.push(e[from_key]["name"].as_str().unwrap_or(""));
            }
        }
    }
    names.contains(&name)
}

/// The Node authorizer: a kubelet (`system:node:<name>` in `system:nodes`) may read the
/// secrets, configmaps, claims and volumes of the pods bound to its node, request tokens for
/// their service accounts, and do what the node rules allow. `None`: not a node.
fn authorize_node(st: &State, user: &UserInfo, a: &Attributes) -> Option<Decision> {
    let node = user.name.strip_prefix("system:node:")?;
    if !user.in_group("system:nodes") || node.is_empty() {
        return None;
    }
    let no_relation = || {
        Decision::Deny(format!(
            "no relationship found between node '{node}' and this object"
        ))
    };
    let on_node = |ns: &str| -> Vec<std::sync::Arc<Value>> {
        st.tables
            .get(&gr("", "pods"))
            .map(|t| {
                t.objects
                    .values()
                    .filter(|p| namespace_of(p) == ns && p["spec"]["nodeName"] == node)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let graph = a.resource_request
        && a.api_group.is_empty()
        && (matches!(
            a.resource.as_str(),
            "secrets" | "configmaps" | "persistentvolumeclaims" | "persistentvolumes"
        ) && a.subresource.is_empty()
            || (a.resource == "serviceaccounts" && a.subresource == "token"));
    if !graph {
        let allowed = node_rules().iter().any(|r| rule_allows(a, r));
        return Some(if allowed {
            Decision::Allow(String::new())
        } else {
            Decision::Deny(String::new())
        });
    }
    if a.resource == "serviceaccounts" {
        if a.verb != "create" {
            return Some(no_relation());
        }
        let uses = on_node(&a.namespace).iter().any(|p| {
            p["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                == a.name
        });
        return Some(if uses {
            Decision::Allow(String::new())
        } else {
            no_relation()
        });
    }
    let reading =
        a.verb == "get" || (matches!(a.verb.as_str(), "list" | "watch") && !a.name.is_empty());
    if !reading || a.name.is_empty() {
        return Some(Decision::Deny(
            "can only get individual resources of this type".into(),
        ));
    }
    let related = if a.resource == "persistentvolumes" {
        st.tables
            .get(&gr("", "persistentvolumeclaims"))
            .is_some_and(|t| {
                t.objects.values().any(|c| {
                    c["spec"]["volumeName"] == a.name.as_str()
                        && on_node(namespace_of(c))
                            .iter()
                            .any(|p| pod_refers_to(p, "persistentvolumeclaims", name_of(c)))
                })
            })
    } else {
        on_node(&a.namespace)
            .iter()
            .any(|p| pod_refers_to(p, &a.resource, &a.name))
    };
    Some(if related {
        Decision::Allow(String::new())
    } else {
        no_relation()
    })
}

fn authorize_in(st: &State, user: &UserInfo, a: &Attributes) -> Decision {
    let mut allowed = None;
    let errors = visit_rules(st, user, &a.namespace, &mut |source, rule| {
        if rule_allows(a, rule) {
            allowed = Some(format!("RBAC: allowed by {source}"));
            return false;
        }
        true
    });
    match allowed {
        Some(r) => Decision::Allow(r),
        None if errors.is_empty() => Decision::Deny(String::new()),
        None if errors.len() == 1 => Decision::Deny(format!("RBAC: {}", errors[0])),
        None => Decision::Deny(format!("RBAC: [{}]", errors.join(", "))),
    }
}

/// The 403 the API server answers a refused request with.
pub fn forbidden(user: &UserInfo, a: &Attributes, reason: &str) -> ApiError {
    let what = if !a.resource_request {
        format!("User {:?} cannot {} path {:?}", user.name, a.verb, a.path)
    } else {
        let res = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        let scope = if a.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {:?}", a.namespace)
        };
        format!(
            "User {:?} cannot {} resource {res:?} in API group {:?} {scope}",
            user.name, a.verb, a.api_group
        )
    };
    let escaped = what
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let err = if reason.is_empty() {
        escaped
    } else {
        format!("{escaped}: {reason}")
    };
    let (message, details) = if !a.resource_request || a.resource.is_empty() {
        (format!("forbidden: {err}"), json!({}))
    } else {
        let q = crate::status::qualified(&a.api_group, &a.resource);
        let message = if a.name.is_empty() {
            format!("{q} is forbidden: {err}")
        } else {
            format!("{q} {:?} is forbidden: {err}", a.name)
        };
        let mut d = json!({"kind": a.resource});
        if !a.name.is_empty() {
            d["name"] = json!(a.name);
        }
        if !a.api_group.is_empty() {
            d["group"] = json!(a.api_group);
        }
        (message, d)
    };
    let mut e = ApiError::forbidden(message);
    e.details = Some(details);
    e
}

fn review_attributes(spec: &Value, ns_override: Option<&str>) -> Result<Attributes, Cause> {
    let ra = spec.get("resourceAttributes").filter(|v| !v.is_null());
    let nra = spec.get("nonResourceAttributes").filter(|v| !v.is_null());
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    match (ra, nra) {
        (Some(r), None) => Ok(Attributes {
            verb: s(r, "verb"),
            resource_request: true,
            api_group: s(r, "group"),
            api_version: s(r, "version"),
            resource: s(r, "resource"),
            subresource: s(r, "subresource"),
            namespace: ns_override.map_or_else(|| s(r, "namespace"), str::to_owned),
            name: s(r, "name"),
            path: String::new(),
        }),
        (None, Some(n)) => Ok(Attributes {
            verb: s(n, "verb"),
            path: s(n, "path"),
            ..Default::default()
        }),
        (r, _) => Err(Cause::invalid(
            if r.is_some() {
                "spec.nonResourceAttributes"
            } else {
                "spec.resourceAttributes"
            },
            &json!(
                spec.get(if r.is_some() {
                    "nonResourceAttributes"
                } else {
                    "resourceAttributes"
                })
                .cloned()
                .unwrap_or(Value::Null)
            ),
            if r.is_some() {
                "cannot be specified in combination with resourceAttributes"
            } else {
                "exactly one of nonResourceAttributes or resourceAttributes must be specified"
            },
        )),
    }
}

fn review_status(core: &Core, user: &UserInfo, a: &Attributes) -> Value {
    match authorize(core, user, a) {
        Decision::Allow(reason) if reason.is_empty() => json!({"allowed": true}),
        Decision::Allow(reason) => json!({"allowed": true, "reason": reason}),
        Decision::Deny(reason) if reason.is_empty() => json!({"allowed": false}),
        Decision::Deny(reason) => json!({"allowed": false, "reason": reason}),
    }
}

fn invalid_review(kind: &str, cause: Cause) -> ApiError {
    ApiError::invalid("authorization.k8s.io", kind, "", vec![cause])
}

/// Answers a create of one of the review kinds (they are never stored), or `None` when
/// `plural` is not one.
pub fn review(
    core: &Core,
    caller: &UserInfo,
    group: &str,
    plural: &str,
    ns: &str,
    mut body: Value,
) -> Option<Result<Value, ApiError>> {
    let spec = body.get("spec").cloned().unwrap_or(json!({}));
    let result = match (group, plural) {
        ("authorization.k8s.io", "subjectaccessreviews") => {
            let user = UserInfo {
                name: spec
                    .get("user")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                uid: spec
                    .get("uid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                groups: strs(&spec, "groups"),
                extra: serde_json::from_value(spec.get("extra").cloned().unwrap_or(json!({})))
                    .unwrap_or_default(),
            };
            if user.name.is_empty() && user.groups.is_empty() {
                return Some(Err(invalid_review(
                    "SubjectAccessReview",
                    Cause::invalid(
                        "spec.user",
                        &json!(""),
                        "at least one of user or group must be specified",
                    ),
                )));
            }
            match review_attributes(&spec, None) {
                Ok(a) => Ok(review_status(core, &user, &a)),
                Err(c) => Err(invalid_review("SubjectAccessReview", c)),
            }
        }
        ("authorization.k8s.io", "localsubjectaccessreviews") => {
            let user = UserInfo {
                name: spec
                    .get("user")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                uid: String::new(),
                groups: strs(&spec, "groups"),
                extra: Default::default(),
            };
            let want = spec
                .pointer("/resourceAttributes/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !want.is_empty() && want != ns {
                return Some(Err(invalid_review(
                    "LocalSubjectAccessReview",
                    Cause::invalid(
                        "spec.resourceAttributes.namespace",
                        &json!(want),
                        "must match metadata.namespace",
                    ),
                )));
            }
            match review_attributes(&spec, Some(ns)) {
                Ok(a) => Ok(review_status(core, &user, &a)),
                Err(c) => Err(invalid_review("LocalSubjectAccessReview", c)),
            }
        }
        ("authorization.k8s.io", "selfsubjectaccessreviews") => {
            match review_attributes(&spec, None) {
                Ok(a) => Ok(review_status(core, caller, &a)),
                Err(c) => Err(invalid_review("SelfSubjectAccessReview", c)),
            }
        }
        ("authorization.k8s.io", "selfsubjectrulesreviews") => {
            let ns = spec.get("namespace").and_then(Value::as_str).unwrap_or("");
            Ok(rules_review(core, caller, ns))
        }
        ("authentication.k8s.io", "selfsubjectreviews") => {
            Ok(json!({"userInfo": caller.to_json()}))
        }
        ("authentication.k8s.io", "tokenreviews") => {
            let reviewed = auth::token_review(core, body.clone());
            Ok(reviewed.get("status").cloned().unwrap_or(json!({})))
        }
        _ => return None,
    };
    Some(result.map(|status| {
        let m = meta_mut(&mut body);
        m.insert("creationTimestamp".into(), Value::Null);
        body["status"] = status;
        body
    }))
}

/// `SelfSubjectRulesReview`: every rule that applies to the caller in `ns`.
fn rules_review(core: &Core, user: &UserInfo, ns: &str) -> Value {
    let st = core.lock();
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    let errors = visit_rules(&st, user, ns, &mut |_, rule| {
        if rule
            .get("nonResourceURLs")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            non_resource_rules
                .push(json!({"verbs": rule["verbs"], "nonResourceURLs": rule["nonResourceURLs"]}));
        } else {
            let mut r = json!({"verbs": rule["verbs"], "apiGroups": rule.get("apiGroups").cloned().unwrap_or(json!([])),
                "resources": rule.get("resources").cloned().unwrap_or(json!([]))});
            if let Some(n) = rule
                .get("resourceNames")
                .filter(|n| n.as_array().is_some_and(|a| !a.is_empty()))
            {
                r["resourceNames"] = n.clone();
            }
            resource_rules.push(r);
        }
        true
    });
    let mut status = json!({"resourceRules": resource_rules, "nonResourceRules": non_resource_rules, "incomplete": false});
    if !errors.is_empty() {
        status["evaluationError"] = json!(errors.join(", "));
    }
    status
}

fn rule(groups: &str, resources: &str, verbs: &str) -> Value {
    fn list(s: &str) -> Vec<&str> {
        s.split_whitespace()
            .map(|x| if x == "core" { "" } else { x })
            .collect()
    }
    json!({"apiGroups": list(groups), "resources": list(resources), "verbs": list(verbs)})
}

fn named(groups: &str, resources: &str, verbs: &str, names: &str) -> Value {
    let mut r = rule(groups, resources, verbs);
    r["resourceNames"] = json!(names.split_whitespace().collect::<Vec<_>>());
    r
}

fn urls(paths: &str, verbs: &str) -> Value {
    json!({"nonResourceURLs": paths.split_whitespace().collect::<Vec<_>>(),
        "verbs": verbs.split_whitespace().collect::<Vec<_>>()})
}

const RW: &str = "create delete deletecollection patch update";
const RO: &str = "get list watch";
const ALL: &str = "create delete deletecollection get list patch update watch";

/// (name, rules, the aggregate-to label it carries, the label its aggregation selects)
type BootstrapRole = (
    &'static str,
    Vec<Value>,
    Option<&'static str>,
    Option<&'static str>,
);

/// The bootstrap ClusterRoles charts and components refer to, with the rules a fresh cluster
/// gives them (kube-apiserver's bootstrap policy, as the aggregation controller fills it in).
fn bootstrap_cluster_roles() -> Vec<BootstrapRole> {
    // (name, rules, aggregate-to label it carries, aggregation selector label)
    vec![
        (
            "cluster-admin",
            vec![rule("*", "*", "*"), urls("*", "*")],
            None,
            None,
        ),
        (
            "admin",
            vec![],
            None,
            Some("rbac.authorization.k8s.io/aggregate-to-admin"),
        ),
        (
            "edit",
            vec![],
            Some("rbac.authorization.k8s.io/aggregate-to-admin"),
            Some("rbac.authorization.k8s.io/aggregate-to-edit"),
        ),
        (
            "view",
            vec![],
            Some("rbac.authorization.k8s.io/aggregate-to-edit"),
            Some("rbac.authorization.k8s.io/aggregate-to-view"),
        ),
        (
            "system:aggregate-to-admin",
            vec![
                rule(
                    "authorization.k8s.io",
                    "localsubjectaccessreviews",
                    "create",
                ),
                rule(RBAC, "rolebindings roles", ALL),
            ],
            Some("rbac.authorization.k8s.io/aggregate-to-admin"),
            None,
        ),
        (
            "system:aggregate-to-edit",
            vec![
                rule(
                    "core",
                    "pods/attach pods/exec pods/portforward pods/proxy secrets services/proxy",
                    RO,
                ),
                rule("core", "serviceaccounts", "impersonate"),
                rule(
                    "core",
                    "pods pods/attach pods/exec pods/portforward pods/proxy",
                    RW,
                ),
                rule("core", "pods/eviction", "create"),
                rule(
                    "core",
                    "configmaps events persistentvolumeclaims replicationcontrollers replicationcontrollers/scale secrets serviceaccounts services services/proxy",
                    RW,
                ),
                rule("core", "serviceaccounts/token", "create"),
                rule(
                    "apps",
                    "daemonsets deployments deployments/rollback deployments/scale replicasets replicasets/scale statefulsets statefulsets/scale",
                    RW,
                ),
                rule("autoscaling", "horizontalpodautoscalers", RW),
                rule("batch", "cronjobs jobs", RW),
                rule(
                    "extensions",
                    "daemonsets deployments deployments/rollback deployments/scale ingresses networkpolicies replicasets replicasets/scale replicationcontrollers/scale",
                    RW,
                ),
                rule("policy", "poddisruptionbudgets", RW),
                rule("networking.k8s.io", "ingresses networkpolicies", RW),
                rule("coordination.k8s.io", "leases", ALL),
            ],
            Some("rbac.authorization.k8s.io/aggregate-to-edit"),
            None,
        ),
        (
            "system:aggregate-to-view",
            vec![
                rule(
                    "core",
                    "configmaps endpoints persistentvolumeclaims persistentvolumeclaims/status pods replicationcontrollers replicationcontrollers/scale serviceaccounts services services/status",
                    RO,
                ),
                rule(
                    "core",
                    "bindings events limitranges namespaces/status pods/log pods/status replicationcontrollers/status resourcequotas resourcequotas/status",
                    RO,
                ),
                rule("core", "namespaces", RO),
                rule("discovery.k8s.io", "endpointslices", RO),
                rule(
                    "apps",
                    "controllerrevisions daemonsets daemonsets/status deployments deployments/scale deployments/status replicasets replicasets/scale replicasets/status statefulsets statefulsets/scale statefulsets/status",
                    RO,
                ),
                rule(
                    "autoscaling",
                    "horizontalpodautoscalers horizontalpodautoscalers/status",
                    RO,
                ),
                rule("batch", "cronjobs cronjobs/status jobs jobs/status", RO),
                rule(
                    "extensions",
                    "daemonsets daemonsets/status deployments deployments/scale deployments/status ingresses ingresses/status networkpolicies replicasets replicasets/scale replicasets/status replicationcontrollers/scale",
                    RO,
                ),
                rule(
                    "policy",
                    "poddisruptionbudgets poddisruptionbudgets/status",
                    RO,
                ),
                rule(
                    "networking.k8s.io",
                    "ingresses ingresses/status networkpolicies",
                    RO,
                ),
            ],
            Some("rbac.authorization.k8s.io/aggregate-to-view"),
            None,
        ),
        (
            "system:auth-delegator",
            vec![
                rule("authentication.k8s.io", "tokenreviews", "create"),
                rule("authorization.k8s.io", "subjectaccessreviews", "create"),
            ],
            None,
            None,
        ),
        (
            "system:basic-user",
            vec![
                rule(
                    "authorization.k8s.io",
                    "selfsubjectaccessreviews selfsubjectrulesreviews",
                    "create",
                ),
                rule("authentication.k8s.io", "selfsubjectreviews", "create"),
            ],
            None,
            None,
        ),
        (
            "system:discovery",
            vec![urls(
                "/api /api/* /apis /apis/* /healthz /livez /openapi /openapi/* /readyz /version /version/",
                "get",
            )],
            None,
            None,
        ),
        (
            "system:public-info-viewer",
            vec![urls("/healthz /livez /readyz /version /version/", "get")],
            None,
            None,
        ),
        (
            "system:monitoring",
            vec![urls(
                "/healthz /healthz/* /livez /livez/* /metrics /metrics/slis /readyz /readyz/*",
                "get",
            )],
            None,
            None,
        ),
        (
            "system:service-account-issuer-discovery",
            vec![urls(
                "/.well-known/openid-configuration /openid/v1/jwks",
                "get",
            )],
            None,
            None,
        ),
    ]
}

fn bootstrap_meta(name: &str, ns: Option<&str>) -> Value {
    let mut m = json!({"name": name, "uid": new_uid(), "creationTimestamp": now_rfc3339(),
        "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
        "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn subject(kind: &str, name: &str) -> Value {
    json!({"kind": kind, "apiGroup": RBAC, "name": name})
}

/// Stores the bootstrap roles and bindings of a fresh cluster.
pub fn seed(st: &mut State) {
    let roles = bootstrap_cluster_roles();
    for (name, rules, label, selector) in &roles {
        let mut obj = json!({"apiVersion": format!("{RBAC}/v1"), "kind": "ClusterRole",
            "metadata": bootstrap_meta(name, None), "rules": rules});
        if let Some(l) = label {
            obj["metadata"]["labels"][*l] = json!("true");
        }
        if let Some(s) = selector {
            obj["aggregationRule"] =
                json!({"clusterRoleSelectors": [{"matchLabels": {*s: "true"}}]});
        }
        st.put(&gr(RBAC, "clusterroles"), obj);
    }
    // What the aggregation controller then writes into the aggregated roles.
    for name in ["view", "edit", "admin"] {
        if let Some(role) = st.get(&gr(RBAC, "clusterroles"), &key("", name)) {
            let mut obj = (*role).clone();
            obj["rules"] = json!(role_rules(st, &role, 0));
            st.put(&gr(RBAC, "clusterroles"), obj);
        }
    }
    let bindings = [
        ("cluster-admin", vec![subject("Group", auth::MASTERS)]),
        (
            "system:basic-user",
            vec![subject("Group", auth::AUTHENTICATED)],
        ),
        (
            "system:discovery",
            vec![subject("Group", auth::AUTHENTICATED)],
        ),
        (
            "system:public-info-viewer",
            vec![
                subject("Group", auth::AUTHENTICATED),
                subject("Group", auth::UNAUTHENTICATED),
            ],
        ),
        (
            "system:monitoring",
            vec![subject("Group", "system:monitoring")],
        ),
        (
            "system:service-account-issuer-discovery",
            vec![subject("Group", "system:serviceaccounts")],
        ),
    ];
    for (name, subjects) in bindings {
        let obj = json!({"apiVersion": format!("{RBAC}/v1"), "kind": "ClusterRoleBinding",
            "metadata": bootstrap_meta(name, None),
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": name},
            "subjects": subjects});
        st.put(&gr(RBAC, "clusterrolebindings"), obj);
    }
    let reader = "extension-apiserver-authentication-reader";
    st.put(
        &gr(RBAC, "roles"),
        json!({"apiVersion": format!("{RBAC}/v1"), "kind": "Role",
        "metadata": bootstrap_meta(reader, Some("kube-system")),
        "rules": [named("core", "configmaps", RO, "extension-apiserver-authentication")]}),
    );
    st.put(&gr(RBAC, "rolebindings"), json!({"apiVersion": format!("{RBAC}/v1"), "kind": "RoleBinding",
        "metadata": bootstrap_meta(&format!("system::{reader}"), Some("kube-system")),
        "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": reader},
        "subjects": [subject("User", "system:kube-controller-manager"), subject("User", "system:kube-scheduler")]}));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: http::Method, path: &str, q: &[(&str, &str)]) -> Attributes {
        let q = q
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        attributes(&method, path, &q)
    }

    #[test]
    fn request_info_matches_the_api_server() {
        let a = attrs(http::Method::GET, "/api/v1/namespaces/ns1/pods", &[]);
        assert_eq!(
            (a.verb.as_str(), a.namespace.as_str(), a.resource.as_str()),
            ("list", "ns1", "pods")
        );
        let a = attrs(
            http::Method::GET,
            "/api/v1/namespaces/ns1/pods",
            &[("watch", "true")],
        );
        assert_eq!(a.verb, "watch");
        let a = attrs(
            http::Method::GET,
            "/api/v1/watch/namespaces/ns1/pods/p",
            &[],
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("watch", "p"));
        let a = attrs(
            http::Method::POST,
            "/api/v1/namespaces/ns1/serviceaccounts/sa/token",
            &[],
        );
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.subresource.as_str()),
            ("create", "serviceaccounts", "token")
        );
        let a = attrs(http::Method::GET, "/api/v1/namespaces/ns1", &[]);
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.namespace.as_str()),
            ("namespaces", "ns1", "ns1")
        );
        let a = attrs(
            http::Method::DELETE,
            "/apis/apps/v1/namespaces/x/deployments",
            &[],
        );
        assert_eq!(
            (a.verb.as_str(), a.api_group.as_str()),
            ("deletecollection", "apps")
        );
        let a = attrs(http::Method::GET, "/apis/apps/v1", &[]);
        assert!(!a.resource_request);
        let a = attrs(
            http::Method::GET,
            "/api/v1/namespaces/x/configmaps",
            &[("fieldSelector", "metadata.name=c")],
        );
        assert_eq!(a.name, "c");
    }

    #[test]
    fn rules_match_like_rbac() {
        let a = attrs(
            http::Method::GET,
            "/apis/apps/v1/namespaces/x/deployments/d/scale",
            &[],
        );
        assert!(rule_allows(&a, &rule("apps", "deployments/scale", "get")));
        assert!(rule_allows(&a, &rule("*", "*/scale", "*")));
        assert!(!rule_allows(&a, &rule("apps", "deployments", "get")));
        assert!(rule_allows(
            &a,
            &named("apps", "deployments/scale", "get", "d")
        ));
        let list = attrs(
            http::Method::GET,
            "/apis/apps/v1/namespaces/x/deployments",
            &[],
        );
        assert!(!rule_allows(
            &list,
            &named("apps", "deployments", "list", "d")
        ));
        let np = attrs(http::Method::GET, "/healthz/etcd", &[]);
        assert!(rule_allows(&np, &urls("/healthz/*", "get")));
        assert!(!rule_allows(&np, &urls("/healthz", "get")));
    }
}
