//! A custom resource's structural schema applied the way the API server applies it on every
//! write: unknown fields pruned, nulls dropped, defaults filled in, then types, enums, bounds,
//! required fields and the `x-kubernetes-validations` rules this server can evaluate.

use crate::cel::{self, CelError};
use crate::status::{Cause, json_type};
use serde_json::Value;

/// Prunes and defaults `obj` in place, then validates it. `old` is the stored object on update,
/// for transition rules (`oldSelf`).
pub fn apply(schema: &Value, obj: &mut Value, old: Option<&Value>) -> Vec<Cause> {
    prune_and_default(obj, schema, true);
    let mut causes = Vec::new();
    // The root's metadata, apiVersion and kind belong to the server, not to the schema.
    if let (Some(props), Value::Object(map)) = (schema.get("properties"), &*obj) {
        let mut required_missing = Vec::new();
        if let Some(req) = schema.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) && !matches!(r, "metadata" | "apiVersion" | "kind") {
                    required_missing.push(Cause::required(r));
                }
            }
        }
        causes.extend(required_missing);
        for (k, v) in map {
            if matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                continue;
            }
            if let Some(s) = props.get(k) {
                validate(v, s, old.and_then(|o| o.get(k)), k, &mut causes);
            }
        }
    }
    rules(obj, schema, old, "", &mut causes);
    causes
}

/// The fields of `obj` the schema would prune (nulls aside), as the server names them.
pub fn unknown_fields(schema: &Value, obj: &Value) -> Vec<String> {
    let mut pruned = obj.clone();
    prune_and_default(&mut pruned, schema, true);
    let mut out = Vec::new();
    crate::builtin::unknown_fields(obj, &pruned, "", &mut out);
    out
}

fn preserves(s: &Value) -> bool {
    s.get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn nullable(s: &Value) -> bool {
    s.get("nullable").and_then(Value::as_bool).unwrap_or(false)
}

fn prune_and_default(v: &mut Value, s: &Value, root: bool) {
    if s.get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return;
    }
    match v {
        Value::Object(map) => {
            let embedded = s
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            let keep_unknown = preserves(s);
            let server_owned =
                |k: &str| (root || embedded) && matches!(k, "apiVersion" | "kind" | "metadata");
            // Nulls for fields that are not nullable are dropped before defaulting.
            map.retain(|k, val| {
                if server_owned(k) {
                    return true;
                }
                let sub = props.and_then(|p| p.get(k)).or(additional);
                match sub {
                    Some(sub) => !val.is_null() || nullable(sub),
                    None => keep_unknown,
                }
            });
            if let Some(props) = props {
                for (k, sub) in props {
                    if !map.contains_key(k)
                        && let Some(d) = sub.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                }
            }
            for (k, val) in map.iter_mut() {
                if server_owned(k) {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(k)).or(additional) {
                    prune_and_default(val, sub, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = s.get("items") {
                for it in items {
                    prune_and_default(it, sub, false);
                }
            }
        }
        _ => {}
    }
}

fn validate(v: &Value, s: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    if v.is_null() {
        if !nullable(s) {
            causes.push(Cause::type_invalid(
                path,
                v,
                s.get("type").and_then(Value::as_str).unwrap_or("object"),
            ));
        }
        return;
    }
    let int_or_string = s
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if int_or_string {
        if !(v.is_string() || v.as_i64().is_some()) {
            causes.push(Cause::type_invalid(path, v, "integer,string"));
        }
        return;
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok {
            causes.push(Cause::type_invalid(path, v, t));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        causes.push(Cause::not_supported(path, v, e));
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    if let Some(x) = v.as_f64() {
        if let Some(m) = num("maximum")
            && x > m
        {
            causes.push(Cause::invalid(
                path,
                v,
                &format!("{path} in body should be less than or equal to {m}"),
            ));
        }
        if let Some(m) = num("minimum")
            && x < m
        {
            causes.push(Cause::invalid(
                path,
                v,
                &format!("{path} in body should be greater than or equal to {m}"),
            ));
        }
    }
    if let Value::String(st) = v {
        let n = st.chars().count() as f64;
        if let Some(m) = num("maxLength")
            && n > m
        {
            causes.push(Cause::too_long(path, m as usize));
        }
        if let Some(m) = num("minLength")
            && n < m
        {
            causes.push(Cause::invalid(
                path,
                v,
                &format!("{path} in body should be at least {m} chars long"),
            ));
        }
    }
    match v {
        Value::Object(map) => {
            if let Some(req) = s.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        causes.push(Cause::required(format!("{path}.{r}")));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            let embedded = s
                .get("x-kubernetes-embedded-resource")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            for (k, val) in map {
                if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(k)).or(additional) {
                    validate(
                        val,
                        sub,
                        old.and_then(|o| o.get(k)),
                        &format!("{path}.{k}"),
                        causes,
                    );
                }
            }
        }
        Value::Array(items) => {
            if let Some(m) = num("maxItems")
                && items.len() as f64 > m
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("must have at most {m} items"),
                ));
            }
            if let Some(m) = num("minItems")
                && (items.len() as f64) < m
            {
                causes.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should have at least {m} items"),
                ));
            }
            if let Some(sub) = s.get("items") {
                for (i, it) in items.iter().enumerate() {
                    validate(it, sub, None, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
}

/// Evaluates `x-kubernetes-validations` bottom-up over the value tree.
fn rules(v: &Value, s: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    let sub_path = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(map) => {
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            for (k, val) in map {
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(sub) = props.and_then(|p| p.get(k)).or(additional) {
                    rules(val, sub, old.and_then(|o| o.get(k)), &sub_path(k), causes);
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = s.get("items") {
                for (i, it) in items.iter().enumerate() {
                    rules(it, sub, None, &format!("{path}[{i}]"), causes);
                }
            }
        }
        _ => {}
    }
    let Some(list) = s.get("x-kubernetes-validations").and_then(Value::as_array) else {
        return;
    };
    for r in list {
        let Some(src) = r.get("rule").and_then(Value::as_str) else {
            continue;
        };
        let program = match cel::compile(src) {
            Ok(p) => p,
            Err(error) => {
                tracing::debug!(rule = src, %error, "skipping a validation rule this server cannot evaluate");
                continue;
            }
        };
        if program.uses_old_self && old.is_none() {
            continue;
        }
        let field = match r.get("fieldPath").and_then(Value::as_str) {
            Some(fp) => format!("{path}{fp}"),
            None => path.to_owned(),
        };
        let message = r
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("failed rule: {src}"));
        let reason = match r.get("reason").and_then(Value::as_str) {
            Some("FieldValueForbidden") => "FieldValueForbidden",
            Some("FieldValueRequired") => "FieldValueRequired",
            Some("FieldValueDuplicate") => "FieldValueDuplicate",
            _ => "FieldValueInvalid",
        };
        let cause = |msg: String| Cause {
            reason,
            field: if field.is_empty() {
                "<nil>".into()
            } else {
                field.clone()
            },
            message: format!("Invalid value: \"{}\": {msg}", json_type(v)),
        };
        match program.eval_bool(v, old) {
            Ok(true) => {}
            Ok(false) => causes.push(cause(message)),
            Err(CelError::Runtime(e)) => causes.push(cause(e)),
            Err(CelError::Unsupported(error)) => {
                tracing::debug!(rule = src, %error, "skipping a validation rule this server cannot evaluate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["repo"],
                    "x-kubernetes-validations": [{"rule": "self.repo != ''", "message": "repo must be set"}],
                    "properties": {
                        "repo": {"type": "string"},
                        "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                        "count": {"type": "integer"},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "size": {"x-kubernetes-int-or-string": true}
                    }
                }
            }
        })
    }

    #[test]
    fn prunes_defaults_and_validates() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"},
            "spec": {"repo": "r", "junk": 1, "free": {"any": {"thing": 1}}, "size": "1Gi", "count": null}});
        let causes = apply(&schema(), &mut obj, None);
        assert!(causes.is_empty(), "{causes:?}");
        assert_eq!(obj["spec"]["mode"], "a");
        assert!(obj["spec"].get("junk").is_none());
        assert!(obj["spec"].get("count").is_none());
        assert_eq!(obj["spec"]["free"]["any"]["thing"], 1);

        let mut bad = json!({"spec": {"repo": "", "mode": "c", "count": "x"}});
        let causes = apply(&schema(), &mut bad, None);
        let fields: Vec<_> = causes
            .iter()
            .map(|c| (c.field.as_str(), c.reason))
            .collect();
        assert!(
            fields.contains(&("spec.mode", "FieldValueNotSupported")),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("spec.count", "FieldValueTypeInvalid")),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("spec", "FieldValueInvalid")),
            "{fields:?}"
        );
        let mut missing = json!({"spec": {}});
        let causes = apply(&schema(), &mut missing, None);
        assert!(
            causes
                .iter()
                .any(|c| c.field == "spec.repo" && c.reason == "FieldValueRequired")
        );
    }
}
