//! Discovery (`/api`, `/apis`, per group-version resource lists, and the aggregated
//! `apidiscovery.k8s.io/v2` form kubectl prefers) and the OpenAPI documents kubectl reads for
//! `apply` (field validation support) and `explain`.

use crate::registry::{Registry, ResourceDef, version_priority};
use serde_json::{Value, json};
use std::sync::Arc;

/// An aggregated API's group/version and, when the backend answered, its resource list.
#[derive(Debug, Clone)]
pub struct Aggregated {
    pub group: String,
    pub version: String,
    pub resources: Option<Value>,
}

pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-kube-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Which discovery document the Accept header asks for.
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    for part in accept.split(',') {
        if !part.contains("as=APIGroupDiscoveryList") || !part.contains("apidiscovery.k8s.io") {
            continue;
        }
        if part.contains("v=v2beta1") {
            return Some("v2beta1");
        }
        if part.contains("v=v2") {
            return Some("v2");
        }
    }
    None
}

pub fn api_versions(server_addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_addr}],
    })
}

fn gv(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    }
}

fn all_groups(reg: &Registry, agg: &[Aggregated]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = reg
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .collect();
    for a in agg {
        match groups.iter_mut().find(|(g, _)| *g == a.group) {
            Some((_, vs)) => {
                if !vs.contains(&a.version) {
                    vs.push(a.version.clone());
                    vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
                }
            }
            None => groups.push((a.group.clone(), vec![a.version.clone()])),
        }
    }
    groups
}

fn group_entry(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": gv(group, v), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn api_group_list(reg: &Registry, agg: &[Aggregated]) -> Value {
    let groups: Vec<Value> = all_groups(reg, agg)
        .iter()
        .map(|(g, vs)| group_entry(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(reg: &Registry, agg: &[Aggregated], group: &str) -> Option<Value> {
    let groups = all_groups(reg, agg);
    let (g, vs) = groups.iter().find(|(g, _)| g == group)?;
    let mut e = group_entry(g, vs);
    e["kind"] = json!("APIGroup");
    e["apiVersion"] = json!("v1");
    Some(e)
}

fn legacy_resources(d: &ResourceDef) -> Vec<Value> {
    let mut out = vec![json!({
        "name": d.plural,
        "singularName": d.singular,
        "namespaced": d.namespaced,
        "kind": d.kind,
        "verbs": d.verbs(),
        "shortNames": d.short_names,
        "categories": d.categories,
    })];
    if out[0]["shortNames"].as_array().is_some_and(Vec::is_empty)
        && let Some(m) = out[0].as_object_mut()
    {
        m.remove("shortNames");
    }
    if out[0]["categories"].as_array().is_some_and(Vec::is_empty)
        && let Some(m) = out[0].as_object_mut()
    {
        m.remove("categories");
    }
    if d.status {
        out.push(json!({
            "name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced,
            "kind": d.kind, "verbs": ["get", "patch", "update"],
        }));
    }
    if d.scale.is_some() {
        out.push(json!({
            "name": format!("{}/scale", d.plural), "singularName": "", "namespaced": d.namespaced,
            "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"],
        }));
    }
    if has_token(d) {
        out.push(json!({
            "name": "serviceaccounts/token", "singularName": "", "namespaced": true,
            "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"],
        }));
    }
    out
}

/// ServiceAccounts have the TokenRequest subresource.
fn has_token(d: &ResourceDef) -> bool {
    d.group.is_empty() && d.plural == "serviceaccounts" && d.crd.is_none()
}

pub fn resource_list(defs: &[Arc<ResourceDef>], group: &str, version: &str) -> Value {
    let resources: Vec<Value> = defs.iter().flat_map(|d| legacy_resources(d)).collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv(group, version),
        "resources": resources,
    })
}

fn aggregated_resource(d: &ResourceDef) -> Value {
    let mut subs = Vec::new();
    if d.status {
        subs.push(json!({
            "subresource": "status",
            "responseKind": {"group": d.group, "version": d.version, "kind": d.kind},
            "verbs": ["get", "patch", "update"],
        }));
    }
    if d.scale.is_some() {
        subs.push(json!({
            "subresource": "scale",
            "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
            "verbs": ["get", "patch", "update"],
        }));
    }
    if has_token(d) {
        subs.push(json!({
            "subresource": "token",
            "responseKind": {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"},
            "verbs": ["create"],
        }));
    }
    let mut r = json!({
        "resource": d.plural,
        "responseKind": {"group": d.group, "version": d.version, "kind": d.kind},
        "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": d.singular,
        "verbs": d.verbs(),
    });
    if !d.short_names.is_empty() {
        r["shortNames"] = json!(d.short_names);
    }
    if !d.categories.is_empty() {
        r["categories"] = json!(d.categories);
    }
    if !subs.is_empty() {
        r["subresources"] = json!(subs);
    }
    r
}

// Turns an aggregated backend's legacy APIResourceList into aggregated-discovery resources.
fn from_legacy_list(group: &str, version: &str, list: &Value) -> Vec<Value> {
    let Some(items) = list.get("resources").and_then(Value::as_array) else {
        return vec![];
    };
    let mut out: Vec<Value> = Vec::new();
    for r in items {
        let name = r.get("name").and_then(Value::as_str).unwrap_or("");
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("");
        if let Some((parent, sub)) = name.split_once('/') {
            if let Some(p) = out.iter_mut().find(|p| p["resource"] == parent) {
                let entry = json!({
                    "subresource": sub,
                    "responseKind": {"group": r.get("group").and_then(Value::as_str).unwrap_or(group), "version": r.get("version").and_then(Value::as_str).unwrap_or(version), "kind": kind},
                    "verbs": r.get("verbs").cloned().unwrap_or(json!([])),
                });
                match p.get_mut("subresources").and_then(Value::as_array_mut) {
                    Some(a) => a.push(entry),
                    None => p["subresources"] = json!([entry]),
                }
            }
            continue;
        }
        let mut e = json!({
            "resource": name,
            "responseKind": {"group": group, "version": version, "kind": kind},
            "scope": if r.get("namespaced").and_then(Value::as_bool).unwrap_or(false) { "Namespaced" } else { "Cluster" },
            "singularResource": r.get("singularName").cloned().unwrap_or(json!("")),
            "verbs": r.get("verbs").cloned().unwrap_or(json!([])),
        });
        for k in ["shortNames", "categories"] {
            if let Some(v) = r.get(k) {
                e[k] = v.clone();
            }
        }
        out.push(e);
    }
    out
}

/// `APIGroupDiscoveryList` for `/api` (legacy = true) or `/apis`.
pub fn aggregated(reg: &Registry, agg: &[Aggregated], legacy: bool, version: &str) -> Value {
    let groups: Vec<(String, Vec<String>)> = if legacy {
        vec![(String::new(), vec!["v1".to_owned()])]
    } else {
        all_groups(reg, agg)
    };
    let items: Vec<Value> = groups
        .iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| {
                    let defs = reg.in_group_version(g, v);
                    let (resources, fresh) = if defs.is_empty() {
                        match agg.iter().find(|a| a.group == *g && a.version == *v) {
                            Some(Aggregated {
                                resources: Some(l), ..
                            }) => (from_legacy_list(g, v, l), true),
                            _ => (vec![], false),
                        }
                    } else {
                        (defs.iter().map(|d| aggregated_resource(d)).collect(), true)
                    };
                    json!({
                        "version": v,
                        "resources": resources,
                        "freshness": if fresh { "Current" } else { "Stale" },
                    })
                })
                .collect();
            let meta = if g.is_empty() {
                json!({"creationTimestamp": null})
            } else {
                json!({"name": g, "creationTimestamp": null})
            };
            json!({"metadata": meta, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

/// Reverse-DNS schema name the real server uses (`io.k8s.api.apps.v1.Deployment`,
/// `com.appscode.stash.v1beta1.BackupConfiguration`).
pub fn schema_name(d: &ResourceDef) -> String {
    if d.crd.is_none() {
        let g = if d.group.is_empty() {
            "core".to_owned()
        } else {
            d.group.trim_end_matches(".k8s.io").replace('.', "")
        };
        return format!("io.k8s.api.{g}.{}.{}", d.version, d.kind);
    }
    let rev: Vec<&str> = d.group.split('.').rev().collect();
    format!("{}.{}.{}", rev.join("."), d.version, d.kind)
}

fn gvk_ext(d: &ResourceDef) -> Value {
    json!([{"group": d.group, "version": d.version, "kind": d.kind}])
}

fn operation(d: &ResourceDef, action: &str, patch: bool) -> Value {
    let mut params = vec![
        json!({"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
        json!({"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}}),
    ];
    if matches!(action, "post" | "put" | "patch") {
        params.push(json!({"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}));
    }
    if patch {
        params.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}));
    }
    let mut op = json!({
        "operationId": format!("{action}{}", d.kind),
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": d.group, "version": d.version, "kind": d.kind},
    });
    if patch {
        // Strategic merge patch is not listed even for built-ins: kubectl then computes
        // apply patches from its compiled-in types, which know every patch strategy.
        op["requestBody"] = json!({"content": {
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        }});
    }
    op
}

fn object_meta_schema() -> Value {
    json!({"type": "object", "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
        "x-kubernetes-preserve-unknown-fields": true})
}

/// The OpenAPI v3 document of one group/version.
pub fn openapi_v3_gv(reg: &Registry, group: &str, version: &str) -> Value {
    let defs = reg.in_group_version(group, version);
    let prefix = if group.is_empty() {
        "/api/v1".to_owned()
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for d in &defs {
        let coll = if d.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", d.plural)
        } else {
            format!("{prefix}/{}", d.plural)
        };
        paths.insert(
            coll.clone(),
            json!({"get": operation(d, "list", false), "post": operation(d, "post", false)}),
        );
        let item = json!({
            "get": operation(d, "get", false), "put": operation(d, "put", false),
            "patch": operation(d, "patch", true), "delete": operation(d, "delete", false),
        });
        paths.insert(format!("{coll}/{{name}}"), item.clone());
        if d.status {
            paths.insert(format!("{coll}/{{name}}/status"), item);
        }
        if let Some(s) = &d.schema {
            let mut s = (**s).clone();
            if let Some(props) = s.get_mut("properties").and_then(Value::as_object_mut) {
                props.insert("metadata".into(), object_meta_schema());
                props.entry("apiVersion").or_insert(json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
                props.entry("kind").or_insert(json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
            }
            s["x-kubernetes-group-version-kind"] = gvk_ext(d);
            schemas.insert(schema_name(d), s);
        }
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

pub fn openapi_v3_root(reg: &Registry, epoch: u64) -> Value {
    let mut paths = serde_json::Map::new();
    for (g, vs) in reg.groups() {
        for v in vs {
            let p = if g.is_empty() {
                format!("api/{v}")
            } else {
                format!("apis/{g}/{v}")
            };
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={epoch:016X}")}),
            );
        }
    }
    json!({"paths": paths})
}

pub fn openapi_v2(reg: &Registry) -> Value {
    let mut defs = serde_json::Map::new();
    for d in reg.defs.values() {
        if let Some(s) = &d.schema {
            let mut s = (**s).clone();
            s["x-kubernetes-group-version-kind"] = gvk_ext(d);
            defs.insert(schema_name(d), s);
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": {},
        "definitions": defs,
    })
}
