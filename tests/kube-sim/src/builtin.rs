//! Decoding of built-in kinds as the API server does it: the body is read into the kind's
//! typed form (k8s-openapi's types, generated from the same OpenAPI schema), so a value of the
//! wrong type is refused and fields the schema does not know are pruned — with a `Warning`
//! per unknown field, or a 400 under `fieldValidation=Strict`.

use serde_json::{Value, json};

/// Round-trips `obj` through its typed form: `None` for kinds without one here.
fn roundtrip(group: &str, version: &str, kind: &str, obj: &Value) -> Option<Result<Value, String>> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, batch::v1 as batch,
        coordination::v1 as coord, core::v1 as core, discovery::v1 as discovery,
        events::v1 as events, policy::v1 as policy, rbac::v1 as rbac, scheduling::v1 as sched,
        storage::v1 as storage,
    };
    fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
        let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(&typed).map_err(|e| e.to_string())
    }
    if version != "v1" {
        return None;
    }
    Some(match (group, kind) {
        ("", "Namespace") => rt::<core::Namespace>(obj),
        ("", "Node") => rt::<core::Node>(obj),
        ("", "Pod") => rt::<core::Pod>(obj),
        ("", "Secret") => rt::<core::Secret>(obj),
        ("", "ConfigMap") => rt::<core::ConfigMap>(obj),
        ("", "ServiceAccount") => rt::<core::ServiceAccount>(obj),
        ("", "Service") => rt::<core::Service>(obj),
        ("", "Endpoints") => rt::<core::Endpoints>(obj),
        ("discovery.k8s.io", "EndpointSlice") => rt::<discovery::EndpointSlice>(obj),
        ("", "PersistentVolume") => rt::<core::PersistentVolume>(obj),
        ("", "PersistentVolumeClaim") => rt::<core::PersistentVolumeClaim>(obj),
        ("", "Event") => rt::<core::Event>(obj),
        ("", "ReplicationController") => rt::<core::ReplicationController>(obj),
        ("apps", "Deployment") => rt::<apps::Deployment>(obj),
        ("apps", "StatefulSet") => rt::<apps::StatefulSet>(obj),
        ("apps", "DaemonSet") => rt::<apps::DaemonSet>(obj),
        ("apps", "ReplicaSet") => rt::<apps::ReplicaSet>(obj),
        ("apps", "ControllerRevision") => rt::<apps::ControllerRevision>(obj),
        ("batch", "Job") => rt::<batch::Job>(obj),
        ("batch", "CronJob") => rt::<batch::CronJob>(obj),
        ("events.k8s.io", "Event") => rt::<events::Event>(obj),
        ("coordination.k8s.io", "Lease") => rt::<coord::Lease>(obj),
        ("rbac.authorization.k8s.io", "Role") => rt::<rbac::Role>(obj),
        ("rbac.authorization.k8s.io", "RoleBinding") => rt::<rbac::RoleBinding>(obj),
        ("rbac.authorization.k8s.io", "ClusterRole") => rt::<rbac::ClusterRole>(obj),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => rt::<rbac::ClusterRoleBinding>(obj),
        ("admissionregistration.k8s.io", "MutatingWebhookConfiguration") => {
            rt::<adm::MutatingWebhookConfiguration>(obj)
        }
        ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration") => {
            rt::<adm::ValidatingWebhookConfiguration>(obj)
        }
        ("policy", "PodDisruptionBudget") => rt::<policy::PodDisruptionBudget>(obj),
        ("storage.k8s.io", "StorageClass") => rt::<storage::StorageClass>(obj),
        ("scheduling.k8s.io", "PriorityClass") => rt::<sched::PriorityClass>(obj),
        _ => return None,
    })
}

/// Paths (as the server prints them: `spec.template.spec.containers[0].foo`) of the fields of
/// `orig` that the typed form dropped. Nulls are not fields.
pub(crate) fn unknown_fields(orig: &Value, pruned: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, pruned) {
        (Value::Object(o), Value::Object(p)) => {
            for (k, v) in o {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match p.get(k) {
                    Some(pv) => unknown_fields(v, pv, &child, out),
                    None if v.is_null() => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Array(o), Value::Array(p)) => {
            for (i, (v, pv)) in o.iter().zip(p).enumerate() {
                unknown_fields(v, pv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Removes what the typed form wrote that the object did not have (the `apiVersion` and `kind`
/// k8s-openapi writes for embedded objects such as a StatefulSet's claim templates).
fn strip_added(orig: &Value, pruned: &mut Value) {
    match (orig, pruned) {
        (Value::Object(o), Value::Object(p)) => {
            p.retain(|k, _| o.contains_key(k));
            for (k, v) in p.iter_mut() {
                if let Some(ov) = o.get(k) {
                    strip_added(ov, v);
                }
            }
        }
        (Value::Array(o), Value::Array(p)) => {
            for (ov, v) in o.iter().zip(p.iter_mut()) {
                strip_added(ov, v);
            }
        }
        _ => {}
    }
}

/// What decoding a built-in object found.
pub enum Decoded {
    /// The pruned object and the unknown fields it lost.
    Ok(Value, Vec<String>),
    /// Not a kind with a typed form here: keep the object as it is.
    Untyped,
}

/// Decodes `obj` as the API server decodes a built-in kind. `validation` is the request's
/// `fieldValidation` (`Strict`, `Warn` — the default — or `Ignore`).
pub fn decode(
    group: &str,
    version: &str,
    kind: &str,
    obj: &Value,
    validation: &str,
) -> Result<Decoded, crate::status::ApiError> {
    let cannot = |why: &str| {
        crate::status::ApiError::bad_request(format!(
            "{kind} in version {version:?} cannot be handled as a {kind}: {why}"
        ))
    };
    let Some(result) = roundtrip(group, version, kind, obj) else {
        return Ok(Decoded::Untyped);
    };
    let mut pruned = match result {
        Ok(v) => v,
        // A missing required field is the validation's to report (422 with the field path),
        // as the real server's decoder accepts it.
        Err(e) if e.starts_with("missing field") => return Ok(Decoded::Untyped),
        Err(e) => return Err(cannot(&format!("json: {e}"))),
    };
    strip_added(obj, &mut pruned);
    let mut unknown = Vec::new();
    unknown_fields(obj, &pruned, "", &mut unknown);
    let unknown = check_unknown(kind, version, unknown, validation)?;
    Ok(Decoded::Ok(pruned, unknown))
}

/// What `fieldValidation` makes of unknown fields: a 400 under `Strict`, nothing to report
/// under `Ignore`, the fields to warn about otherwise.
pub fn check_unknown(
    kind: &str,
    version: &str,
    unknown: Vec<String>,
    validation: &str,
) -> Result<Vec<String>, crate::status::ApiError> {
    match validation {
        "Strict" if !unknown.is_empty() => {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field {f:?}"))
                .collect();
            Err(crate::status::ApiError::bad_request(format!(
                "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                list.join(", ")
            )))
        }
        "Ignore" => Ok(Vec::new()),
        _ => Ok(unknown),
    }
}

/// The `Warning` header value for one unknown field.
pub fn warning(field: &str) -> String {
    format!("299 - {}", json!(format!("unknown field {field:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_fail_and_unknown_fields_are_pruned() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": 2, "bogus": 1, "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "i", "colour": "red"}]}}}});
        let Ok(Decoded::Ok(pruned, unknown)) = decode("apps", "v1", "Deployment", &d, "Warn")
        else {
            panic!("a Deployment decodes");
        };
        assert_eq!(
            unknown,
            ["spec.bogus", "spec.template.spec.containers[0].colour"]
        );
        assert!(pruned["spec"].get("bogus").is_none());
        assert_eq!(pruned["spec"]["replicas"], 2);
        let strict = decode("apps", "v1", "Deployment", &d, "Strict")
            .err()
            .unwrap();
        assert_eq!(strict.code, 400);
        assert!(
            strict
                .message
                .contains(r#"strict decoding error: unknown field "spec.bogus""#),
            "{}",
            strict.message
        );
        let mut bad = d.clone();
        bad["spec"]["replicas"] = json!("two");
        let e = decode("apps", "v1", "Deployment", &bad, "Ignore")
            .err()
            .unwrap();
        assert!(e.message.starts_with(r#"Deployment in version "v1" cannot be handled as a Deployment: json: invalid type: string "two""#), "{}", e.message);
    }
}
