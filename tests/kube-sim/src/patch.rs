//! The three PATCH flavours: RFC 6902 JSON patch, RFC 7386 merge patch, and the strategic merge
//! patch of the built-in kinds, whose lists of containers, volumes, env, ports and the like merge
//! by key instead of being replaced.

use crate::status::{ApiError, ApiResult};
use serde_json::{Map, Value};

pub fn json_patch(doc: &Value, patch: &[u8]) -> ApiResult<Value> {
    let p: json_patch::Patch = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &p).map_err(|e| {
        ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {e}"),
        )
    })?;
    Ok(out)
}

pub fn merge_patch(doc: &Value, patch: &[u8]) -> ApiResult<Value> {
    let p: Value = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut out = doc.clone();
    json_patch::merge(&mut out, &p);
    Ok(out)
}

/// The merge key of a list field of a built-in kind, if it merges by key; `None` means the list
/// is replaced (atomic). Keyed on the field name and, for `ports`, on the element shape, which
/// tells container ports from service ports.
pub fn merge_key(field: &str, sample: Option<&Value>) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "webhooks" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "conditions" => "type",
        "hostAliases" | "podIPs" | "hostIPs" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "addresses" => "type",
        "ports" => {
            if sample.is_some_and(|s| s.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Lists of scalars that merge as sets.
fn merges_as_set(field: &str) -> bool {
    matches!(field, "finalizers")
}

pub fn strategic_merge_patch(doc: &Value, patch: &[u8]) -> ApiResult<Value> {
    let p: Value = serde_json::from_slice(patch)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    let mut out = doc.clone();
    smp_value(&mut out, &p)?;
    Ok(out)
}

fn smp_value(doc: &mut Value, patch: &Value) -> ApiResult<()> {
    match (doc.as_object_mut(), patch.as_object()) {
        (Some(d), Some(p)) => smp_map(d, p),
        _ => {
            *doc = strip_directives(patch);
            Ok(())
        }
    }
}

fn smp_map(doc: &mut Map<String, Value>, patch: &Map<String, Value>) -> ApiResult<()> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *doc = match strip_directives(&Value::Object(patch.clone())) {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            return Ok(());
        }
        Some("delete") => {
            doc.clear();
            return Ok(());
        }
        _ => {}
    }
    if let Some(keep) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        doc.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, pv) in patch {
        if k == "$patch" || k == "$retainKeys" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (doc.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with("$setElementOrder/") {
            continue;
        }
        if pv.is_null() {
            doc.remove(k);
            continue;
        }
        match (doc.get_mut(k), pv) {
            (Some(Value::Object(d)), Value::Object(p)) => smp_map(d, p)?,
            (Some(Value::Array(d)), Value::Array(p)) => smp_list(k, d, p)?,
            (_, pv) => {
                let fresh = match pv {
                    Value::Array(p) => {
                        let mut list = Vec::new();
                        smp_list(k, &mut list, p)?;
                        Value::Array(list)
                    }
                    Value::Object(p) => {
                        if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                            doc.remove(k);
                            continue;
                        }
                        let mut m = Map::new();
                        smp_map(&mut m, p)?;
                        Value::Object(m)
                    }
                    other => other.clone(),
                };
                doc.insert(k.clone(), fresh);
            }
        }
    }
    // Order elements as the client listed them, as `$setElementOrder` asks.
    for (k, order) in patch {
        if let (Some(field), Some(order)) = (k.strip_prefix("$setElementOrder/"), order.as_array())
            && let Some(Value::Array(list)) = doc.get_mut(field)
        {
            let key = merge_key(field, list.first());
            let pos = |x: &Value| {
                order.iter().position(|o| match key {
                    Some(key) => o.get(key) == x.get(key),
                    None => o == x,
                })
            };
            list.sort_by_key(|x| pos(x).unwrap_or(usize::MAX));
        }
    }
    Ok(())
}

fn smp_list(field: &str, doc: &mut Vec<Value>, patch: &[Value]) -> ApiResult<()> {
    if patch
        .iter()
        .any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *doc = patch
            .iter()
            .filter(|p| p.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        return Ok(());
    }
    if merges_as_set(field) {
        for p in patch {
            if !doc.contains(p) {
                doc.push(p.clone());
            }
        }
        return Ok(());
    }
    let Some(key) = merge_key(field, patch.first().or(doc.first())) else {
        *doc = patch.iter().map(strip_directives).collect();
        return Ok(());
    };
    for p in patch {
        let Some(kv) = p.get(key) else {
            return Err(ApiError::bad_request(format!(
                "map: {p} does not contain declared merge key: {key}"
            )));
        };
        let idx = doc.iter().position(|d| d.get(key) == Some(kv));
        let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
        match (idx, delete) {
            (Some(i), true) => {
                doc.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => smp_value(&mut doc[i], p)?,
            (None, false) => {
                let mut fresh = Value::Object(Map::new());
                smp_value(&mut fresh, p)?;
                doc.push(fresh);
            }
        }
    }
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_merge_by_name() {
        let doc = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ], "finalizers": ["x"]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
            {"name": "b", "$patch": "delete"},
            {"name": "c", "image": "c:1"}
        ]}});
        let out = strategic_merge_patch(&doc, patch.to_string().as_bytes()).unwrap();
        let cs = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0]["image"], "a:2");
        assert_eq!(cs[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(cs[1]["name"], "c");
    }

    #[test]
    fn set_element_order_and_nulls() {
        let doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"ports": [{"port": 80}, {"port": 81}]}});
        let patch = json!({"metadata": {"labels": {"a": null}}, "spec": {"$setElementOrder/ports": [{"port": 81}, {"port": 80}], "ports": [{"port": 80, "name": "http"}]}});
        let out = strategic_merge_patch(&doc, patch.to_string().as_bytes()).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["spec"]["ports"][0]["port"], 81);
        assert_eq!(out["spec"]["ports"][1]["name"], "http");
    }

    #[test]
    fn json_and_merge_patches() {
        let doc = json!({"a": {"b": 1}, "l": [1, 2]});
        let out = json_patch(
            &doc,
            br#"[{"op":"replace","path":"/a/b","value":2},{"op":"add","path":"/l/-","value":3}]"#,
        )
        .unwrap();
        assert_eq!(out, json!({"a": {"b": 2}, "l": [1, 2, 3]}));
        assert_eq!(
            json_patch(&doc, br#"[{"op":"test","path":"/a/b","value":9}]"#)
                .unwrap_err()
                .code,
            422
        );
        let out = merge_patch(&doc, br#"{"a":{"b":null,"c":1},"l":[9]}"#).unwrap();
        assert_eq!(out, json!({"a": {"c": 1}, "l": [9]}));
    }
}
