//! Pure builders of what the Snapshot API answers: Stash's Snapshot object and name, the
//! Table `kubectl get` prints, lists, watch events, discovery and OpenAPI documents, and the
//! `Status` errors a real API server returns. No I/O here: every function is tested below.

use std::collections::BTreeMap;

use serde_json::{Value, json};

pub const GROUP: &str = "repositories.stash.appscode.com";
pub const VERSION: &str = "v1alpha1";
pub const RESOURCE: &str = "snapshots";
pub const KIND: &str = "Snapshot";
/// The APIService that registers the group with the aggregator.
pub const API_SERVICE: &str = "v1alpha1.repositories.stash.appscode.com";
/// The Repositories whose access a Snapshot's follows.
pub const REPOSITORY_GROUP: &str = "stash.appscode.com";
pub const REPOSITORY_RESOURCE: &str = "repositories";

/// Label keys Stash puts on every Snapshot (STASH-API.md §3.11).
pub const LABEL_REPOSITORY: &str = "repository";
pub const LABEL_HOSTNAME: &str = "hostname";

/// One snapshot as the index holds it: the restic snapshot and the Repository it is in.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedSnapshot {
    pub namespace: String,
    pub repository: String,
    pub repository_labels: BTreeMap<String, String>,
    pub snapshot: restic_wrapper::Snapshot,
    /// The index's resourceVersion when this snapshot appeared (or went).
    pub resource_version: u64,
    /// What requests read of it, computed once: `kubectl get snapshots -A` pages through the
    /// whole index 500 at a time, and each page sorted and rendered every snapshot anew.
    pub rendered: Rendered,
}

/// A snapshot's sort key and default Table row, filled in on first use. Not part of the
/// snapshot's identity (equal whatever they hold), and not copied by a clone, whose
/// resourceVersion may be about to change.
#[derive(Default)]
pub struct Rendered {
    key: std::sync::OnceLock<String>,
    row: std::sync::OnceLock<Vec<u8>>,
}

impl Clone for Rendered {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Rendered {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered").finish_non_exhaustive()
    }
}

impl IndexedSnapshot {
    pub fn name(&self) -> String {
        snapshot_name(&self.repository, &self.snapshot.id)
    }

    /// The labels selectors match: the Repository's, then `repository` and `hostname`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut l = self.repository_labels.clone();
        l.insert(LABEL_REPOSITORY.into(), self.repository.clone());
        l.insert(LABEL_HOSTNAME.into(), self.snapshot.hostname.clone());
        l
    }

    /// `namespace/name`: the order of lists and the position a continue token names.
    pub fn key(&self) -> &str {
        self.rendered
            .key
            .get_or_init(|| format!("{}/{}", self.namespace, self.name()))
    }

    /// The JSON of its Table row with the object's metadata (what `kubectl get` asks for).
    fn metadata_row(&self) -> &[u8] {
        self.rendered.row.get_or_init(|| {
            build_row(self, IncludeObject::Metadata)
                .to_string()
                .into_bytes()
        })
    }
}

/// Stash's name: `<repository>-<first 8 hex of the snapshot id>` (the api crate's rule).
pub use stash_api::snapshot::{parse_snapshot_name as parse_name, snapshot_name};

/// restic's RFC 3339 time with nanoseconds → metav1.Time (seconds, UTC).
pub fn kube_time(restic_time: &str) -> Option<String> {
    let t: jiff::Timestamp = restic_time.parse().ok()?;
    Some(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// A Snapshot's metadata: all a Table row carries of it by default.
fn build_metadata(s: &IndexedSnapshot) -> Value {
    json!({
        "name": s.name(),
        "namespace": s.namespace,
        "uid": s.snapshot.id,
        "resourceVersion": s.resource_version.to_string(),
        "creationTimestamp": kube_time(&s.snapshot.time),
        "labels": s.labels(),
    })
}

/// The Snapshot object (STASH-API.md §3.11).
pub fn build_snapshot(s: &IndexedSnapshot) -> Value {
    let snap = &s.snapshot;
    let mut status = json!({
        "tree": snap.tree,
        "paths": snap.paths,
        "hostname": snap.hostname,
        "username": snap.username,
        "repository": s.repository,
    });
    if let Some(uid) = snap.uid {
        status["uid"] = uid.into();
    }
    if let Some(gid) = snap.gid {
        status["gid"] = gid.into();
    }
    if let Some(tags) = &snap.tags {
        status["tags"] = json!(tags);
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": build_metadata(s),
        "status": status,
    })
}

/// A list of Snapshots at the index's `resource_version`.
pub fn build_list(
    items: &[&IndexedSnapshot],
    resource_version: u64,
    cont: Option<String>,
) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(c) = cont {
        metadata["continue"] = c.into();
    }
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "SnapshotList",
        "metadata": metadata,
        "items": items.iter().map(|s| build_snapshot(s)).collect::<Vec<_>>(),
    })
}

/// What a Table row carries besides its cells (`?includeObject=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    /// The default is `Metadata`, as the API server's.
    pub fn parse(v: Option<&str>) -> Self {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// `1536` → `1.5 KiB`, as restic prints sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The bytes a snapshot holds, from restic's summary (restic ≥ 0.17), if it has one.
pub fn snapshot_size(s: &restic_wrapper::Snapshot) -> Option<u64> {
    s.summary
        .as_ref()
        .and_then(|v| v.get("total_bytes_processed"))
        .and_then(Value::as_u64)
}

fn column(name: &str, type_: &str, format: &str, description: &str, priority: u32) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

/// `kubectl get snapshots`' columns: Name, ID, Repository, Hostname, Created At; and with
/// `-o wide` (priority 1) the paths and the size.
pub fn table_columns() -> Value {
    json!([
        column(
            "Name",
            "string",
            "name",
            "The snapshot's name: <repository>-<short id>.",
            0
        ),
        column("ID", "string", "", "The restic snapshot's short id.", 0),
        column(
            "Repository",
            "string",
            "",
            "The Repository the snapshot is in.",
            0
        ),
        column(
            "Hostname",
            "string",
            "",
            "The host the snapshot was taken for.",
            0
        ),
        column(
            "Created At",
            "string",
            "date-time",
            "When the snapshot was taken.",
            0
        ),
        column("Paths", "string", "", "The paths the snapshot holds.", 1),
        column("Size", "string", "", "The bytes of the files backed up.", 1),
    ])
}

/// One Table row of a Snapshot.
pub fn build_row(s: &IndexedSnapshot, include: IncludeObject) -> Value {
    let snap = &s.snapshot;
    let short: String = snap.id.chars().take(8).collect();
    let mut row = json!({
        "cells": [
            s.name(),
            short,
            s.repository,
            snap.hostname,
            kube_time(&snap.time).unwrap_or_default(),
            snap.paths.join(","),
            snapshot_size(snap).map(human_bytes).unwrap_or_else(|| "<unknown>".into()),
        ],
    });
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": build_metadata(s),
            });
        }
        IncludeObject::Object => row["object"] = build_snapshot(s),
    }
    row
}

/// The Table of `items` (a list, or one object, or one watch event's object).
pub fn build_table(
    items: &[&IndexedSnapshot],
    resource_version: u64,
    cont: Option<String>,
    include: IncludeObject,
) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(c) = cont {
        metadata["continue"] = c.into();
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": table_columns(),
        "rows": items.iter().map(|s| build_row(s, include)).collect::<Vec<_>>(),
    })
}

/// The Table of `items` as a response body, the same JSON as [`build_table`]'s: the rows
/// with object metadata (the default) are each rendered once per snapshot and copied.
pub fn table_body(
    items: &[&IndexedSnapshot],
    resource_version: u64,
    cont: Option<String>,
    include: IncludeObject,
) -> Vec<u8> {
    let mut head = build_table(&[], resource_version, cont, include);
    if let Some(map) = head.as_object_mut() {
        map.remove("rows");
    }
    let head = head.to_string();
    // The object without its closing brace, then the rows.
    let mut out = head.strip_suffix('}').unwrap_or(&head).as_bytes().to_vec();
    out.extend_from_slice(b",\"rows\":[");
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match include {
            IncludeObject::Metadata => out.extend_from_slice(s.metadata_row()),
            other => out.extend_from_slice(build_row(s, other).to_string().as_bytes()),
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// A watch event line (`{"type": …, "object": …}`), newline-terminated.
pub fn watch_event(type_: &str, object: Value) -> Vec<u8> {
    let mut line = json!({"type": type_, "object": object})
        .to_string()
        .into_bytes();
    line.push(b'\n');
    line
}

/// A BOOKMARK event's object: only the kind and the resourceVersion, and, for the end of
/// the initial events of `sendInitialEvents=true`, the annotation client-go waits for.
pub fn bookmark(resource_version: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"apiVersion": format!("{GROUP}/{VERSION}"), "kind": KIND, "metadata": metadata})
}

/// A `Status` failure as the API server writes it.
pub fn status_failure(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

/// `snapshots.repositories.stash.appscode.com "<name>" not found` (apimachinery `NewNotFound`).
pub fn not_found(name: &str) -> Value {
    status_failure(
        404,
        "NotFound",
        &format!("{RESOURCE}.{GROUP} \"{name}\" not found"),
        Some(json!({"name": name, "group": GROUP, "kind": RESOURCE})),
    )
}

/// What an authorisation decision was about (a SubjectAccessReview's resourceAttributes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

/// The API server's Forbidden for `user` on `attrs` [apiserver: responsewriters/errors.go
/// `forbiddenMessage`; apimachinery `NewForbidden`]; a non-empty authorizer reason is appended.
pub fn forbidden(user: &str, attrs: &Attributes, reason: &str) -> Value {
    let qualified = if attrs.group.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}.{}", attrs.resource, attrs.group)
    };
    let named = if attrs.name.is_empty() {
        qualified.clone()
    } else {
        format!("{qualified} \"{}\"", attrs.name)
    };
    let scope = if attrs.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", attrs.namespace)
    };
    let mut message = format!(
        "{named} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        attrs.verb, attrs.resource, attrs.group
    );
    if !reason.is_empty() {
        message.push_str(": ");
        message.push_str(reason);
    }
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let mut details = json!({"group": attrs.group, "kind": attrs.resource});
    if !attrs.name.is_empty() {
        details["name"] = attrs.name.clone().into();
    }
    status_failure(403, "Forbidden", &message, Some(details))
}

/// The generic API server's answer to a request without credentials it accepts.
pub fn unauthorized() -> Value {
    status_failure(401, "Unauthorized", "Unauthorized", None)
}

pub fn bad_request(message: &str) -> Value {
    status_failure(400, "BadRequest", message, None)
}

/// `/apis/<group>`.
pub fn api_group() -> Value {
    let gv = json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [gv], "preferredVersion": gv})
}

/// `/apis`: this server's one group.
pub fn api_group_list() -> Value {
    let mut g = api_group();
    if let Some(o) = g.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [g]})
}

/// `/apis/<group>/<version>`: the one resource, with the verbs served.
pub fn api_resource_list() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [{
            "name": RESOURCE,
            "singularName": "snapshot",
            "namespaced": true,
            "kind": KIND,
            "verbs": ["delete", "get", "list", "watch"],
            "categories": ["storage", "appscode", "all"],
        }],
    })
}

fn definition_name() -> String {
    // OpenAPI names reverse the group, as the API server's do.
    let reversed: Vec<&str> = GROUP.split('.').rev().collect();
    format!("{}.{VERSION}.{KIND}", reversed.join("."))
}

/// The Snapshot schema, shared by OpenAPI v2 and v3 (with the `$ref` prefix of each).
fn snapshot_schema() -> Value {
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "description": "A restic snapshot in a Repository, served from the operator's index.",
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "description": "Standard object metadata; uid is the full snapshot id."},
            "status": {
                "type": "object",
                "properties": {
                    "tree": {"type": "string"},
                    "paths": strings,
                    "hostname": {"type": "string"},
                    "username": {"type": "string"},
                    "uid": {"type": "integer", "format": "int32"},
                    "gid": {"type": "integer", "format": "int32"},
                    "tags": strings,
                    "repository": {"type": "string"},
                },
            },
        },
        "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": KIND}],
    })
}

fn list_schema(item_ref: &str) -> Value {
    json!({
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "items": {"type": "array", "items": {"$ref": item_ref}},
        },
        "x-kubernetes-group-version-kind": [{"group": GROUP, "version": VERSION, "kind": "SnapshotList"}],
    })
}

fn openapi_paths(ref_prefix: &str, v3: bool) -> Value {
    let def = definition_name();
    let ok = |schema: &str| {
        let r = json!({"$ref": format!("{ref_prefix}{schema}")});
        if v3 {
            json!({"description": "OK", "content": {"application/json": {"schema": r}}})
        } else {
            json!({"description": "OK", "schema": r})
        }
    };
    let op = |id: &str, action: &str, schema: &str| {
        json!({
            "operationId": id,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": {"group": GROUP, "version": VERSION, "kind": KIND},
            "responses": {"200": ok(schema)},
        })
    };
    let list_def = format!("{def}List");
    let base = format!("/apis/{GROUP}/{VERSION}");
    json!({
        format!("{base}/{RESOURCE}"): {
            "get": op("listSnapshotForAllNamespaces", "list", &list_def),
        },
        format!("{base}/namespaces/{{namespace}}/{RESOURCE}"): {
            "get": op("listNamespacedSnapshot", "list", &list_def),
        },
        format!("{base}/namespaces/{{namespace}}/{RESOURCE}/{{name}}"): {
            "get": op("readNamespacedSnapshot", "get", &def),
            "delete": op("deleteNamespacedSnapshot", "delete", &def),
        },
    })
}

/// `/openapi/v2`.
pub fn openapi_v2() -> Value {
    let def = definition_name();
    let prefix = "#/definitions/";
    json!({
        "swagger": "2.0",
        "info": {"title": "Stash Snapshot API", "version": VERSION},
        "paths": openapi_paths(prefix, false),
        "definitions": {
            def.clone(): snapshot_schema(),
            format!("{def}List"): list_schema(&format!("{prefix}{def}")),
        },
    })
}

/// `/openapi/v3`: the index of group/versions.
pub fn openapi_v3_index() -> Value {
    json!({"paths": {format!("apis/{GROUP}/{VERSION}"): {"serverRelativeURL": format!("/openapi/v3/apis/{GROUP}/{VERSION}")}}})
}

/// `/openapi/v3/apis/<group>/<version>`.
pub fn openapi_v3() -> Value {
    let def = definition_name();
    let prefix = "#/components/schemas/";
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Stash Snapshot API", "version": VERSION},
        "paths": openapi_paths(prefix, true),
        "components": {"schemas": {
            def.clone(): snapshot_schema(),
            format!("{def}List"): list_schema(&format!("{prefix}{def}")),
        }},
    })
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn snap(repo: &str, id: &str, host: &str) -> IndexedSnapshot {
        let snapshot: restic_wrapper::Snapshot = serde_json::from_value(json!({
            "time": "2025-03-04T05:06:07.123456789Z", "tree": "t1", "paths": ["/data", "/logs"],
            "hostname": host, "username": "root", "uid": 0, "gid": 0, "tags": ["a"],
            "id": id, "short_id": &id[..8],
            "summary": {"total_bytes_processed": 1536},
        }))
        .unwrap();
        IndexedSnapshot {
            namespace: "demo".into(),
            repository: repo.into(),
            repository_labels: [("team".to_owned(), "x".to_owned())].into(),
            snapshot,
            resource_version: 7,
            rendered: Rendered::default(),
        }
    }

    const ID: &str = "0123abcd99999999999999999999999999999999999999999999999999999999";

    #[test]
    fn the_table_body_is_the_table() {
        let a = snap("repo", ID, "host-0");
        let b = snap("other", &"f".repeat(64), "host-1");
        for include in [
            IncludeObject::None,
            IncludeObject::Metadata,
            IncludeObject::Object,
        ] {
            for cont in [None, Some("token".to_owned())] {
                for items in [vec![], vec![&a], vec![&a, &b]] {
                    let want = build_table(&items, 9, cont.clone(), include);
                    // Twice: the second from what the first rendered.
                    for _ in 0..2 {
                        let body = table_body(&items, 9, cont.clone(), include);
                        let got: Value = serde_json::from_slice(&body).unwrap();
                        assert_eq!(got, want);
                    }
                }
            }
        }
        // A clone renders its own row: its resourceVersion may differ.
        let mut c = a.clone();
        c.resource_version = 10;
        let body = table_body(&[&c], 10, None, IncludeObject::Metadata);
        let got: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            got["rows"][0]["object"]["metadata"]["resourceVersion"],
            "10"
        );
    }

    #[test]
    fn the_object_has_stashs_fields() {
        let v = build_snapshot(&snap("r", ID, "host-1"));
        assert_eq!(v["apiVersion"], "repositories.stash.appscode.com/v1alpha1");
        assert_eq!(v["kind"], "Snapshot");
        assert_eq!(v["metadata"]["name"], "r-0123abcd");
        assert_eq!(v["metadata"]["namespace"], "demo");
        assert_eq!(v["metadata"]["uid"], ID);
        assert_eq!(v["metadata"]["resourceVersion"], "7");
        assert_eq!(v["metadata"]["creationTimestamp"], "2025-03-04T05:06:07Z");
        assert_eq!(
            v["metadata"]["labels"],
            json!({"repository": "r", "hostname": "host-1", "team": "x"})
        );
        assert_eq!(
            v["status"],
            json!({"tree": "t1", "paths": ["/data", "/logs"], "hostname": "host-1",
                   "username": "root", "uid": 0, "gid": 0, "tags": ["a"], "repository": "r"})
        );
    }

    #[test]
    fn a_row_has_the_columns_in_order() {
        let s = snap("r", ID, "host-1");
        let row = build_row(&s, IncludeObject::Metadata);
        assert_eq!(
            row["cells"],
            json!([
                "r-0123abcd",
                "0123abcd",
                "r",
                "host-1",
                "2025-03-04T05:06:07Z",
                "/data,/logs",
                "1.5 KiB"
            ])
        );
        assert_eq!(row["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(row["object"]["metadata"]["name"], "r-0123abcd");
        assert!(build_row(&s, IncludeObject::None).get("object").is_none());
        assert_eq!(
            build_row(&s, IncludeObject::Object)["object"]["kind"],
            "Snapshot"
        );
        let cols = table_columns();
        let names: Vec<&str> = cols
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "ID",
                "Repository",
                "Hostname",
                "Created At",
                "Paths",
                "Size"
            ]
        );
        let wide: Vec<u64> = cols
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["priority"].as_u64().unwrap())
            .collect();
        assert_eq!(wide, [0, 0, 0, 0, 0, 1, 1]);
    }

    #[test]
    fn sizes_read_like_restics() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn forbidden_reads_like_the_api_servers() {
        let attrs = Attributes {
            verb: "list".into(),
            group: GROUP.into(),
            resource: RESOURCE.into(),
            namespace: "demo".into(),
            name: String::new(),
        };
        let v = forbidden("system:serviceaccount:demo:nobody", &attrs, "");
        assert_eq!(v["code"], 403);
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(
            v["message"],
            r#"snapshots.repositories.stash.appscode.com is forbidden: User "system:serviceaccount:demo:nobody" cannot list resource "snapshots" in API group "repositories.stash.appscode.com" in the namespace "demo""#
        );
        assert_eq!(v["details"], json!({"group": GROUP, "kind": "snapshots"}));
        let named = Attributes {
            verb: "get".into(),
            name: "r-0123abcd".into(),
            namespace: String::new(),
            ..attrs
        };
        let v = forbidden("u", &named, "no <rule>");
        assert_eq!(
            v["message"],
            r#"snapshots.repositories.stash.appscode.com "r-0123abcd" is forbidden: User "u" cannot get resource "snapshots" in API group "repositories.stash.appscode.com" at the cluster scope: no &lt;rule&gt;"#
        );
        assert_eq!(v["details"]["name"], "r-0123abcd");
    }

    #[test]
    fn not_found_names_the_snapshot() {
        let v = not_found("r-0123abcd");
        assert_eq!(v["code"], 404);
        assert_eq!(
            v["message"],
            r#"snapshots.repositories.stash.appscode.com "r-0123abcd" not found"#
        );
    }

    #[test]
    fn discovery_lists_the_resource_with_its_categories() {
        let rl = api_resource_list();
        assert_eq!(
            rl["groupVersion"],
            "repositories.stash.appscode.com/v1alpha1"
        );
        assert_eq!(
            rl["resources"][0]["categories"],
            json!(["storage", "appscode", "all"])
        );
        assert_eq!(rl["resources"][0]["namespaced"], true);
        assert_eq!(api_group()["preferredVersion"]["version"], "v1alpha1");
        assert_eq!(api_group_list()["groups"][0]["name"], GROUP);
    }

    #[test]
    fn openapi_documents_define_the_snapshot() {
        let v2 = openapi_v2();
        let def = "com.appscode.stash.repositories.v1alpha1.Snapshot";
        assert_eq!(
            v2["definitions"][def]["x-kubernetes-group-version-kind"][0]["kind"],
            "Snapshot"
        );
        let v3 = openapi_v3();
        assert!(v3["components"]["schemas"][def].is_object());
        let path = "/apis/repositories.stash.appscode.com/v1alpha1/namespaces/{namespace}/snapshots/{name}";
        assert_eq!(v3["paths"][path]["delete"]["x-kubernetes-action"], "delete");
    }

    #[test]
    fn bookmarks_mark_the_end_of_initial_events() {
        assert_eq!(
            bookmark(9, true)["metadata"],
            json!({"resourceVersion": "9", "annotations": {"k8s.io/initial-events-end": "true"}})
        );
        let line = watch_event("ADDED", json!({"a": 1}));
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
