//! One store for Events, served as `core/v1` and `events.k8s.io/v1` as the real server does:
//! objects are stored in the core form and converted field by field (`involvedObject` ↔
//! `regarding`, `message` ↔ `note`, `reportingComponent` ↔ `reportingController`, `source`,
//! `firstTimestamp`, `lastTimestamp`, `count` ↔ their `deprecated*` names).

use crate::registry::ResourceDef;
use crate::status::Cause;
use serde_json::{Map, Value, json};

pub const EVENTS_V1: &str = "events.k8s.io/v1";

/// (core name, events.k8s.io name) of the fields whose names differ.
const RENAMED: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// Whether `def` is the events.k8s.io view of the core Event store.
pub fn is_events_v1(def: &ResourceDef) -> bool {
    def.crd.is_none() && def.group == "events.k8s.io" && def.plural == "events"
}

fn rename(obj: &Value, to_v1: bool, api_version: &str) -> Value {
    let Some(m) = obj.as_object() else {
        return obj.clone();
    };
    let mut out = Map::new();
    for (k, v) in m {
        let renamed = RENAMED.iter().find_map(|(core, v1)| {
            if to_v1 && k == core {
                Some(*v1)
            } else if !to_v1 && k == v1 {
                Some(*core)
            } else {
                None
            }
        });
        out.insert(renamed.unwrap_or(k).to_owned(), v.clone());
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    if to_v1 {
        // The core form's empty values are absent in the new one.
        if out
            .get("deprecatedSource")
            .is_some_and(|s| s.as_object().is_none_or(Map::is_empty))
        {
            out.remove("deprecatedSource");
        }
        if out.get("deprecatedCount").and_then(Value::as_i64) == Some(0) {
            out.remove("deprecatedCount");
        }
        out.entry("eventTime").or_insert(Value::Null);
    }
    Value::Object(out)
}

/// The stored (core) form of an object written through `def`.
pub fn to_storage(def: &ResourceDef, obj: Value) -> Value {
    if is_events_v1(def) {
        rename(&obj, false, "v1")
    } else {
        obj
    }
}

/// A stored Event as `api_version` presents it; `None` when it needs no conversion.
pub fn present(obj: &Value, api_version: &str) -> Option<Value> {
    if obj.get("kind").and_then(Value::as_str) != Some("Event") {
        return None;
    }
    let stored = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    match (stored, api_version) {
        ("v1", EVENTS_V1) => Some(rename(obj, true, EVENTS_V1)),
        (EVENTS_V1, "v1") => Some(rename(obj, false, "v1")),
        _ => None,
    }
}

/// The strict checks of an Event created through events.k8s.io/v1.
pub fn validate_create(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
    if obj.get("eventTime").is_none_or(Value::is_null) {
        causes.push(Cause::required("eventTime"));
    } else {
        for k in [
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            if s(k).is_empty() {
                causes.push(Cause::required(k));
            }
        }
    }
    if !matches!(s("type"), "Normal" | "Warning") {
        causes.push(Cause::invalid(
            "type",
            &json!(""),
            &format!("has invalid value: {}", s("type")),
        ));
    }
    for k in [
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedSource",
    ] {
        if obj.get(k).is_some_and(|v| !v.is_null() && v != &json!({})) {
            causes.push(Cause::invalid(k, &json!(""), "needs to be unset"));
        }
    }
    if obj
        .get("deprecatedCount")
        .and_then(Value::as_i64)
        .is_some_and(|c| c != 0)
    {
        causes.push(Cause::invalid(
            "deprecatedCount",
            &json!(""),
            "needs to be unset",
        ));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_convert_both_ways() {
        let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"},
            "involvedObject": {"kind": "Pod", "name": "p"}, "message": "hi", "reason": "R",
            "reportingComponent": "ctl", "count": 2, "type": "Normal"});
        let v1 = present(&core, EVENTS_V1).unwrap();
        assert_eq!(v1["regarding"]["name"], "p");
        assert_eq!(v1["note"], "hi");
        assert_eq!(v1["reportingController"], "ctl");
        assert_eq!(v1["deprecatedCount"], 2);
        assert!(v1["eventTime"].is_null());
        let back = present(&v1, "v1").unwrap();
        assert_eq!(back["involvedObject"], core["involvedObject"]);
        assert_eq!(back["message"], "hi");
    }
}
