//! Field ownership: `metadata.managedFields` kept up to date on every write, and server-side
//! apply (merge the applied configuration, detect conflicts with other managers, remove fields
//! a manager stopped applying).

use crate::patch::merge_key;
use crate::status::ApiError;
use crate::util::now_rfc3339;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

/// How a list merges, from the built-in merge keys or the CRD schema's list-type markers.
#[derive(Debug, Clone)]
enum ListType {
    Atomic,
    Set,
    Map(Vec<String>),
}

/// Which list types apply while walking an object: built-in conventions, or a CRD schema.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub builtin: bool,
    pub schema: Option<&'a Value>,
}

impl<'a> Shape<'a> {
    fn child(&self, key: &str) -> Shape<'a> {
        Shape {
            builtin: self.builtin,
            schema: self.schema.and_then(|s| {
                s.get("properties")
                    .and_then(|p| p.get(key))
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
            }),
        }
    }
    fn items(&self) -> Shape<'a> {
        Shape {
            builtin: self.builtin,
            schema: self.schema.and_then(|s| s.get("items")),
        }
    }
    fn list_type(&self, field: &str, sample: Option<&Value>) -> ListType {
        if field == "finalizers" {
            return ListType::Set;
        }
        if self.builtin {
            return match merge_key(field, sample) {
                Some(k) => ListType::Map(vec![k.to_owned()]),
                None => ListType::Atomic,
            };
        }
        if field == "ownerReferences" {
            return ListType::Map(vec!["uid".into()]);
        }
        match self
            .schema
            .and_then(|s| s.get("x-kubernetes-list-type"))
            .and_then(Value::as_str)
        {
            Some("set") => ListType::Set,
            Some("map") => ListType::Map(
                self.schema
                    .and_then(|s| s.get("x-kubernetes-list-map-keys"))
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            _ => ListType::Atomic,
        }
    }
}

fn item_key(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        if let Some(v) = item.get(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    format!("k:{}", Value::Object(m))
}

/// The fields a configuration sets, as managedFields records them. `part` chooses the whole
/// object without status, or only status.
pub fn field_set(obj: &Value, shape: Shape, status_only: bool, skip_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let Value::Object(map) = obj else {
        return out;
    };
    for (k, v) in map {
        let take = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => !skip_status,
            "metadata" => !status_only,
            _ => !status_only,
        };
        if !take {
            continue;
        }
        let path = vec![format!("f:{k}")];
        if k == "metadata" {
            if let Value::Object(m) = v {
                for (mk, mv) in m {
                    if matches!(
                        mk.as_str(),
                        "labels" | "annotations" | "finalizers" | "ownerReferences"
                    ) {
                        let mut p = path.clone();
                        p.push(format!("f:{mk}"));
                        walk(mv, mk, shape.child(k).child(mk), p, &mut out);
                    }
                }
            }
            continue;
        }
        walk(v, k, shape.child(k), path, &mut out);
    }
    out
}

fn walk(v: &Value, field: &str, shape: Shape, path: Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, child) in m {
                let mut p = path.clone();
                p.push(format!("f:{k}"));
                walk(child, k, shape.child(k), p, out);
            }
        }
        Value::Array(items) => match shape.list_type(field, items.first()) {
            ListType::Atomic => {
                out.insert(path);
            }
            ListType::Set => {
                for it in items {
                    let mut p = path.clone();
                    p.push(format!("v:{it}"));
                    out.insert(p);
                }
            }
            ListType::Map(keys) => {
                for it in items {
                    let mut p = path.clone();
                    p.push(item_key(it, &keys));
                    out.insert(p.clone());
                    if let Value::Object(m) = it {
                        for (k, child) in m {
                            let mut cp = p.clone();
                            cp.push(format!("f:{k}"));
                            walk(child, k, shape.items().child(k), cp, out);
                        }
                    }
                }
            }
        },
        _ => {
            out.insert(path);
        }
    }
}

/// The value a path points to.
fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path {
        cur = step(cur, seg)?;
    }
    Some(cur)
}

fn step<'a>(cur: &'a Value, seg: &str) -> Option<&'a Value> {
    if let Some(f) = seg.strip_prefix("f:") {
        return cur.get(f);
    }
    let arr = cur.as_array()?;
    if let Some(k) = seg.strip_prefix("k:") {
        let keys: Map<String, Value> = serde_json::from_str(k).ok()?;
        return arr
            .iter()
            .find(|it| keys.iter().all(|(kk, kv)| it.get(kk) == Some(kv)));
    }
    if let Some(j) = seg.strip_prefix("v:") {
        let want: Value = serde_json::from_str(j).ok()?;
        return arr.iter().find(|it| **it == want);
    }
    None
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for seg in parents {
        cur = match locate_mut(cur, seg) {
            Some(c) => c,
            None => return,
        };
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(arr) = cur.as_array_mut() {
        let target = step(&Value::Array(arr.clone()), last).cloned();
        if let Some(t) = target {
            arr.retain(|x| *x != t);
        }
    }
}

fn locate_mut<'a>(cur: &'a mut Value, seg: &str) -> Option<&'a mut Value> {
    if let Some(f) = seg.strip_prefix("f:") {
        return cur.get_mut(f);
    }
    let target = step(cur, seg)?.clone();
    cur.as_array_mut()?.iter_mut().find(|x| **x == target)
}

pub fn to_fields_v1(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Node {
        owned: bool,
        children: BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for p in set {
        let mut n = &mut root;
        for seg in p {
            n = n.children.entry(seg.clone()).or_default();
        }
        n.owned = true;
    }
    fn render(n: &Node) -> Value {
        let mut m = Map::new();
        if n.owned && !n.children.is_empty() {
            m.insert(".".into(), json!({}));
        }
        for (k, c) in &n.children {
            m.insert(k.clone(), render(c));
        }
        Value::Object(m)
    }
    render(&root)
}

pub fn from_fields_v1(v: &Value) -> FieldSet {
    fn go(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, c) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            path.push(k.clone());
            go(c, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

fn path_string(p: &Path) -> String {
    let mut s = String::new();
    for seg in p {
        if let Some(f) = seg.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = seg.strip_prefix("k:") {
            let inner: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = inner.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = seg.strip_prefix("v:") {
            s.push_str(&format!("[{v}]"));
        }
    }
    s
}

#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: String,
    time: String,
    set: FieldSet,
}

fn entries(obj: Option<&Value>) -> Vec<Entry> {
    let Some(list) = obj
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
    else {
        return vec![];
    };
    list.iter()
        .map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            Entry {
                manager: s("manager"),
                operation: s("operation"),
                api_version: s("apiVersion"),
                subresource: s("subresource"),
                time: s("time"),
                set: from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            }
        })
        .collect()
}

fn write_entries(obj: &mut Value, list: Vec<Entry>) {
    let arr: Vec<Value> = list
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.set),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    let meta = crate::util::meta_mut(obj);
    if arr.is_empty() {
        meta.remove("managedFields");
    } else {
        meta.insert("managedFields".into(), Value::Array(arr));
    }
}

/// Records a non-apply write (create, update, patch) by `manager`: it takes over every field it
/// changed, and fields that no longer exist leave every manager's set.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: &str,
    shape: Shape,
    has_status: bool,
) {
    let status_only = subresource == "status";
    let skip_status = has_status && !status_only;
    let new_set = field_set(new, shape, status_only, skip_status);
    let changed: FieldSet = new_set
        .iter()
        .filter(|p| {
            old.is_none_or(|o| {
                let nv = lookup(new, p);
                let ov = lookup(o, p);
                ov != nv || (p.last().is_some_and(|s| s.starts_with("k:")) && ov.is_none())
            })
        })
        .cloned()
        .collect();
    let all_now = field_set(new, shape, false, false);
    let mut list = entries(old);
    for e in &mut list {
        e.set
            .retain(|p| all_now.contains(p) || has_descendant(&all_now, p));
        if !(e.manager == manager && e.operation == "Update" && e.subresource == subresource) {
            e.set.retain(|p| !changed.contains(p));
        }
    }
    if !changed.is_empty() {
        match list.iter_mut().find(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        }) {
            Some(e) => {
                e.set.extend(changed);
                e.time = now_rfc3339();
                e.api_version = api_version.to_owned();
            }
            None => list.push(Entry {
                manager: manager.to_owned(),
                operation: "Update".into(),
                api_version: api_version.to_owned(),
                subresource: subresource.to_owned(),
                time: now_rfc3339(),
                set: changed,
            }),
        }
    }
    write_entries(new, list);
}

fn has_descendant(set: &FieldSet, p: &Path) -> bool {
    set.range(p.clone()..)
        .next()
        .is_some_and(|q| q.len() > p.len() && q.starts_with(p))
}

/// Server-side apply of `applied` by `manager` over `live` (absent on create). Returns the
/// merged object with managedFields updated, or a 409 listing the conflicts.
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    subresource: &str,
    shape: Shape,
    has_status: bool,
) -> Result<Value, ApiError> {
    let status_only = subresource == "status";
    let skip_status = has_status && !status_only;
    let api_version = applied
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let applied_set = field_set(applied, shape, status_only, skip_status);
    let mut list = entries(live);
    let base = live.cloned().unwrap_or_else(|| json!({}));

    let mut conflicts: Vec<(String, Path)> = Vec::new();
    for e in &list {
        if e.manager == manager && e.operation == "Apply" {
            continue;
        }
        for p in e.set.intersection(&applied_set) {
            if lookup(&base, p) != lookup(applied, p)
                && !p.last().is_some_and(|s| s.starts_with("k:"))
            {
                conflicts.push((e.manager.clone(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(m, p)| {
                json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": path_string(p)})
            })
            .collect();
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(m, p)| format!("conflict with \"{m}\": {}", path_string(p)))
            .collect();
        let n = conflicts.len();
        let mut err = ApiError::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {n} conflict{}: {}",
                if n == 1 { "" } else { "s" },
                lines.join("\n")
            ),
        );
        err.details = Some(json!({"causes": causes}));
        return Err(err);
    }
    if force {
        for e in &mut list {
            if !(e.manager == manager && e.operation == "Apply") {
                e.set.retain(|p| !conflicts.iter().any(|(_, c)| c == p));
            }
        }
    }

    let mut merged = base.clone();
    merge_into(
        &mut merged,
        applied,
        "",
        shape,
        true,
        status_only,
        skip_status,
    );

    // Fields this manager applied before but not now go away unless someone else holds them.
    let previous: FieldSet = list
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply" && e.subresource == subresource)
        .map(|e| e.set.clone())
        .unwrap_or_default();
    let others: FieldSet = list
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply"))
        .flat_map(|e| e.set.iter().cloned())
        .collect();
    let mut dropped: Vec<&Path> = previous
        .iter()
        .filter(|p| {
            !applied_set.contains(*p) && !others.contains(*p) && !has_descendant(&applied_set, p)
        })
        .collect();
    // Deepest first, so removing a list item does not shift a later removal.
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        remove_path(&mut merged, p);
    }

    list.retain(|e| {
        !(e.manager == manager && e.operation == "Apply" && e.subresource == subresource)
    });
    list.push(Entry {
        manager: manager.to_owned(),
        operation: "Apply".into(),
        api_version,
        subresource: subresource.to_owned(),
        time: now_rfc3339(),
        set: applied_set,
    });
    write_entries(&mut merged, list);
    Ok(merged)
}

fn merge_into(
    dst: &mut Value,
    src: &Value,
    field: &str,
    shape: Shape,
    root: bool,
    status_only: bool,
    skip_status: bool,
) {
    match (dst.as_object_mut(), src) {
        (Some(d), Value::Object(s)) => {
            for (k, sv) in s {
                if root {
                    if k == "status" && skip_status {
                        continue;
                    }
                    if status_only && k != "status" {
                        continue;
                    }
                    if k == "metadata" {
                        // Only the user-settable parts of metadata merge; identity stays.
                        let dm = d.entry("metadata").or_insert_with(|| json!({}));
                        if let Value::Object(sm) = sv {
                            for (mk, mv) in sm {
                                if matches!(
                                    mk.as_str(),
                                    "managedFields"
                                        | "resourceVersion"
                                        | "uid"
                                        | "creationTimestamp"
                                        | "generation"
                                        | "deletionTimestamp"
                                ) {
                                    continue;
                                }
                                let target = crate::util::as_object_mut(dm)
                                    .entry(mk.clone())
                                    .or_insert(Value::Null);
                                if target.is_null() {
                                    *target = mv.clone();
                                } else {
                                    merge_into(
                                        target,
                                        mv,
                                        mk,
                                        shape.child("metadata").child(mk),
                                        false,
                                        false,
                                        false,
                                    );
                                }
                            }
                        }
                        continue;
                    }
                }
                match d.get_mut(k) {
                    Some(dv) if !dv.is_null() => {
                        merge_into(dv, sv, k, shape.child(k), false, false, false)
                    }
                    _ => {
                        d.insert(k.clone(), sv.clone());
                    }
                }
            }
        }
        _ => match (dst.as_array_mut(), src) {
            (Some(d), Value::Array(s)) => match shape.list_type(field, s.first().or(d.first())) {
                ListType::Atomic => *dst = src.clone(),
                ListType::Set => {
                    for it in s {
                        if !d.contains(it) {
                            d.push(it.clone());
                        }
                    }
                }
                ListType::Map(keys) => {
                    for it in s {
                        let k = item_key(it, &keys);
                        match d.iter_mut().find(|x| item_key(x, &keys) == k) {
                            Some(x) => merge_into(x, it, "", shape.items(), false, false, false),
                            None => d.push(it.clone()),
                        }
                    }
                }
            },
            _ => *dst = src.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Shape = Shape {
        builtin: true,
        schema: None,
    };

    #[test]
    fn apply_merges_and_detects_conflicts() {
        let a1 = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"a": "1"}},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        let live = server_side_apply(None, &a1, "alice", false, "", B, true).unwrap();
        assert_eq!(live["spec"]["replicas"], 1);
        let mf = &live["metadata"]["managedFields"][0];
        assert_eq!(mf["manager"], "alice");
        assert!(
            mf["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]
                ["."]
                .is_object()
        );

        // Bob changes replicas through an update: he now owns it.
        let mut bob = live.clone();
        bob["spec"]["replicas"] = json!(3);
        record_update(Some(&live), &mut bob, "bob", "apps/v1", "", B, true);
        // Alice re-applies replicas=1: conflict with bob.
        let err = server_side_apply(Some(&bob), &a1, "alice", false, "", B, true).unwrap_err();
        assert_eq!(err.code, 409);
        assert!(err.message.contains("bob"), "{}", err.message);
        // Forced, she takes it back.
        let forced = server_side_apply(Some(&bob), &a1, "alice", true, "", B, true).unwrap();
        assert_eq!(forced["spec"]["replicas"], 1);

        // Dropping the label from the applied config removes it.
        let mut a2 = a1.clone();
        a2["metadata"]["labels"] = json!({});
        a2["metadata"].as_object_mut().unwrap().remove("labels");
        let after = server_side_apply(Some(&forced), &a2, "alice", false, "", B, true).unwrap();
        assert!(
            after["metadata"]
                .get("labels")
                .is_none_or(|l| l.get("a").is_none()),
            "{after}"
        );
    }

    #[test]
    fn fields_v1_round_trips() {
        let obj = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["f"]}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let set = field_set(&obj, B, false, false);
        let tree = to_fields_v1(&set);
        assert_eq!(from_fields_v1(&tree), set);
        assert!(tree["f:metadata"]["f:finalizers"]["v:\"f\""].is_object());
    }
}
