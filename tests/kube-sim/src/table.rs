//! Server-side printing: `kubectl get` asks for `Table` objects and prints whatever columns the
//! server returns, so printer columns of CRDs and a few built-ins are computed here.

use crate::registry::{Column, ResourceDef};
use crate::util::{get_path, human_duration, now_secs, parse_rfc3339, scalar_string};
use serde_json::{Value, json};

/// Whether the Accept header asks for a Table (`as=Table;g=meta.k8s.io;v=v1`).
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// Whether the Accept header asks for PartialObjectMetadata(List).
pub fn wants_metadata(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
}

pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

fn column_defs(def: &ResourceDef) -> Vec<Value> {
    let mut cols = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"
    })];
    let columns: Vec<Column> = if def.columns.is_empty() {
        vec![Column::age()]
    } else {
        def.columns.clone()
    };
    for c in &columns {
        // Date columns are rendered as ages, so the table says "string" for them.
        let t = if c.type_ == "date" {
            "string"
        } else {
            c.type_.as_str()
        };
        cols.push(json!({
            "name": c.name, "type": t, "format": c.format,
            "description": c.description, "priority": c.priority,
        }));
    }
    cols
}

/// Evaluates the subset of JSONPath printer columns use: `.a.b`, `.a[0]`, `.a[*].b` and
/// `.conditions[?(@.type=="Ready")].status`.
pub fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut cur = vec![obj.clone()];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            rest = &r[end..];
            if key.is_empty() {
                continue;
            }
            cur = cur.iter().filter_map(|v| v.get(key).cloned()).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            let inner = &r[..end];
            rest = &r[end + 1..];
            let mut next = Vec::new();
            for v in &cur {
                let Some(arr) = v.as_array() else { continue };
                if inner == "*" {
                    next.extend(arr.iter().cloned());
                } else if let Ok(i) = inner.parse::<i64>() {
                    let idx = if i < 0 { arr.len() as i64 + i } else { i };
                    if let Some(x) = usize::try_from(idx).ok().and_then(|i| arr.get(i)) {
                        next.push(x.clone());
                    }
                } else if let Some(f) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')'))
                {
                    let (field, want) = match f.split_once("==") {
                        Some((a, b)) => (a.trim(), Some(b.trim().trim_matches(['"', '\'']))),
                        None => (f.trim(), None),
                    };
                    for it in arr {
                        let got = get_path(it, field);
                        let ok = match want {
                            Some(w) => got.map(scalar_string).as_deref() == Some(w),
                            None => got.is_some(),
                        };
                        if ok {
                            next.push(it.clone());
                        }
                    }
                }
            }
            cur = next;
        } else {
            break;
        }
    }
    cur
}

fn cell(obj: &Value, def: &ResourceDef, c: &Column) -> Value {
    if c.json_path.is_empty() {
        return builtin_cell(obj, def, &c.name);
    }
    let vals = jsonpath(obj, &c.json_path);
    let Some(first) = vals.first() else {
        return Value::Null;
    };
    match c.type_.as_str() {
        "date" => match first.as_str().and_then(parse_rfc3339) {
            Some(t) => json!(human_duration(now_secs() - t)),
            None => Value::Null,
        },
        "integer" | "number" | "boolean" => first.clone(),
        _ => {
            if vals.len() > 1 {
                json!(vals.iter().map(scalar_string).collect::<Vec<_>>().join(","))
            } else {
                match first {
                    Value::String(_) => first.clone(),
                    other => json!(other.to_string()),
                }
            }
        }
    }
}

// Columns whose value the real server computes in Go rather than reading a path.
fn builtin_cell(obj: &Value, def: &ResourceDef, name: &str) -> Value {
    let n = |p: &str| obj.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    match (def.kind.as_str(), name) {
        ("Pod", "Ready") => {
            let total = obj
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |a| {
                    a.iter()
                        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                        .count()
                });
            json!(format!("{ready}/{total}"))
        }
        ("Pod", "Restarts") => {
            let r: i64 = obj
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .map_or(0, |a| {
                    a.iter()
                        .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                        .sum()
                });
            json!(r.to_string())
        }
        ("Deployment" | "StatefulSet", "Ready") => json!(format!(
            "{}/{}",
            n("/status/readyReplicas"),
            obj.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        )),
        ("Secret" | "ConfigMap", "Data") => {
            let count = ["data", "binaryData", "stringData"]
                .iter()
                .filter_map(|k| obj.get(*k).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            json!(count)
        }
        ("Service", "External-IP") => json!("<none>"),
        ("Service", "Port(s)") => {
            let ports: Vec<String> = obj
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            format!(
                                "{}/{}",
                                p.get("port").map(scalar_string).unwrap_or_default(),
                                p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!(if ports.is_empty() {
                "<none>".to_owned()
            } else {
                ports.join(",")
            })
        }
        ("Job", "Status") => {
            let done = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter().find(|c| {
                        c.get("status").and_then(Value::as_str) == Some("True")
                            && matches!(
                                c.get("type").and_then(Value::as_str),
                                Some("Complete" | "Failed")
                            )
                    })
                })
                .and_then(|c| c.get("type").and_then(Value::as_str))
                .unwrap_or("Running");
            json!(done)
        }
        ("Job", "Completions") => json!(format!(
            "{}/{}",
            n("/status/succeeded"),
            obj.pointer("/spec/completions")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        )),
        // kubectl's printers: `formatEndpoints` (ip:port, three at most) and
        // `formatDiscoveryPorts` / `formatDiscoveryEndpoints` (`<unset>` when empty).
        ("Endpoints", "Endpoints") => {
            let mut all = Vec::new();
            for ss in obj
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let ports: Vec<i64> = ss
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.get("port").and_then(Value::as_i64))
                    .collect();
                for a in ss
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ip = a.get("ip").and_then(Value::as_str).unwrap_or("");
                    if ports.is_empty() {
                        all.push(ip.to_owned());
                    }
                    for p in &ports {
                        all.push(format!("{ip}:{p}"));
                    }
                }
            }
            json!(first_three(all, "<none>"))
        }
        ("EndpointSlice", "Ports") => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|p| {
                    p.get("port")
                        .and_then(Value::as_i64)
                        .map_or("<unset>".to_owned(), |n| n.to_string())
                })
                .collect();
            json!(if ports.is_empty() {
                "<unset>".to_owned()
            } else {
                ports.join(",")
            })
        }
        ("EndpointSlice", "Endpoints") => {
            let all: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    e.get("addresses")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                })
                .collect();
            json!(first_three(all, "<unset>"))
        }
        ("APIService", "Service") => match obj.pointer("/spec/service") {
            Some(s) => json!(format!(
                "{}/{}",
                s.get("namespace").and_then(Value::as_str).unwrap_or(""),
                s.get("name").and_then(Value::as_str).unwrap_or("")
            )),
            None => json!("Local"),
        },
        ("APIService", "Available") => {
            let st = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Available"))
                })
                .and_then(|c| c.get("status").and_then(Value::as_str))
                .unwrap_or("Unknown");
            json!(st)
        }
        _ => Value::Null,
    }
}

fn first_three(all: Vec<String>, none: &str) -> String {
    match all.len() {
        0 => none.to_owned(),
        1..=3 => all.join(","),
        n => format!("{} + {} more...", all[..3].join(","), n - 3),
    }
}

pub fn row(obj: &Value, def: &ResourceDef, include: &str) -> Value {
    let mut cells = vec![json!(crate::util::name_of(obj))];
    if def.columns.is_empty() {
        let age = obj
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .map(|t| human_duration(now_secs() - t));
        cells.push(age.map_or(Value::Null, Value::String));
    } else {
        for c in &def.columns {
            cells.push(cell(obj, def, c));
        }
    }
    let object = match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => partial_metadata(obj),
    };
    let mut r = json!({"cells": cells});
    if !object.is_null() {
        r["object"] = object;
    }
    r
}

pub fn table(
    def: &ResourceDef,
    objs: &[std::sync::Arc<Value>],
    list_meta: Value,
    include: &str,
) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": column_defs(def),
        "rows": objs.iter().map(|o| row(o, def, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_filters() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]}, "spec": {"l": [1, 2]}});
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(jsonpath(&o, ".spec.l[*]"), vec![json!(1), json!(2)]);
        assert_eq!(jsonpath(&o, ".spec.l[-1]"), vec![json!(2)]);
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
    }
}
