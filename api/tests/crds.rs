//! The generated CRDs: the committed files equal crdgen's output, and every schema is
//! structural, as the API server requires.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

#[test]
fn committed_crds_equal_the_generated_ones() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/stash/crds");
    let mut stale = Vec::new();
    let crds = stash_api::crds();
    for crd in &crds {
        let name = stash_api::crd_file_name(crd);
        let want = stash_api::crd_yaml(crd)?;
        match std::fs::read_to_string(dir.join(&name)) {
            Ok(have) if have == want => {}
            Ok(_) => stale.push(format!("{name} differs")),
            Err(e) => stale.push(format!("{name}: {e}")),
        }
    }
    let committed = std::fs::read_dir(&dir)?.filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "yaml"))
    });
    let count = committed.count();
    if count != crds.len() {
        stale.push(format!(
            "{count} files in {} for {} CRDs",
            dir.display(),
            crds.len()
        ));
    }
    assert!(
        stale.is_empty(),
        "CRDs are stale, run `make generate`: {stale:?}"
    );
    Ok(())
}

#[test]
fn there_is_one_crd_per_kind() {
    let kinds: Vec<String> = stash_api::crds()
        .iter()
        .map(|c| format!("{}/{}", c.spec.group, c.spec.names.kind))
        .collect();
    assert_eq!(kinds.len(), 12);
    let mut unique = kinds.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), kinds.len(), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k.ends_with("/Snapshot")),
        "Snapshot is not a CRD"
    );
}

/// Collects violations of the structural-schema rules of the Kubernetes API server.
fn structural_errors(schema: &Value, path: &str, errors: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        errors.push(format!("{path}: not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        if obj.contains_key(forbidden) {
            errors.push(format!("{path}: uses {forbidden}"));
        }
    }
    let escape = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = obj.get("type").and_then(Value::as_str);
    if ty.is_none() && !escape {
        errors.push(format!("{path}: has no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errors.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        if ty != Some("object") {
            errors.push(format!("{path}: properties on a non-object"));
        }
        for (k, v) in props {
            structural_errors(v, &format!("{path}.{k}"), errors);
        }
        if let Some(required) = obj.get("required").and_then(Value::as_array) {
            for r in required {
                if !r.as_str().is_some_and(|r| props.contains_key(r)) {
                    errors.push(format!("{path}: requires unknown property {r}"));
                }
            }
        }
    }
    if let Some(items) = obj.get("items") {
        structural_errors(items, &format!("{path}[]"), errors);
    } else if ty == Some("array") {
        errors.push(format!("{path}: array without items"));
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        structural_errors(extra, &format!("{path}{{}}"), errors);
    }
    if let Some(values) = obj.get("enum").and_then(Value::as_array) {
        let nullable = obj.get("nullable") == Some(&Value::Bool(true));
        for v in values {
            let fits = match (ty, v) {
                (_, Value::Null) => nullable,
                (Some("string"), Value::String(_)) => true,
                (Some("integer"), Value::Number(n)) => n.is_i64(),
                _ => false,
            };
            if !fits {
                errors.push(format!("{path}: enum value {v} does not fit type {ty:?}"));
            }
        }
    }
}

#[test]
fn every_schema_is_structural() -> Result<()> {
    let mut errors = Vec::new();
    for crd in stash_api::crds() {
        for version in &crd.spec.versions {
            let schema = version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            let Some(schema) = schema else {
                errors.push(format!("{}: no schema", crd.spec.names.kind));
                continue;
            };
            let json = serde_json::to_value(schema)?;
            structural_errors(&json, &crd.spec.names.kind, &mut errors);
            // The root may only constrain metadata by name; it must keep spec and status apart.
            let props = &json["properties"];
            assert!(
                props
                    .get("metadata")
                    .is_none_or(|m| m["properties"].is_null())
            );
            if version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
            {
                assert!(props.get("status").is_some(), "{}", crd.spec.names.kind);
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    Ok(())
}

#[test]
fn the_structural_check_rejects_a_schema_without_types() {
    let bad = serde_json::json!({"type": "object", "properties": {"a": {"description": "x"},
        "b": {"anyOf": [{"type": "string"}]}, "c": {"type": "array"}}});
    let mut errors = Vec::new();
    structural_errors(&bad, "T", &mut errors);
    assert_eq!(errors.len(), 4, "{errors:?}");
}

#[test]
fn crds_carry_stash_names_and_columns() {
    let crds = stash_api::crds();
    let find = |kind: &str| {
        crds.iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"))
    };
    let short = |kind: &str| {
        find(kind)
            .spec
            .names
            .short_names
            .clone()
            .unwrap_or_default()
    };
    assert_eq!(short("Repository"), ["repo"]);
    assert_eq!(short("BackupConfiguration"), ["bc"]);
    assert_eq!(short("RestoreSession"), ["restore"]);
    assert_eq!(short("Function"), ["fn"]);
    assert_eq!(short("Task"), ["task"]);
    assert_eq!(short("BackupBlueprint"), ["bb"]);
    for (kind, scope) in [
        ("Repository", "Namespaced"),
        ("Function", "Cluster"),
        ("Task", "Cluster"),
        ("BackupBlueprint", "Cluster"),
        ("AppBinding", "Namespaced"),
        ("BackupAssignment", "Namespaced"),
    ] {
        assert_eq!(find(kind).spec.scope, scope, "{kind}");
    }
    let columns = |kind: &str| -> Vec<String> {
        find(kind).spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.to_uppercase())
            .collect()
    };
    assert_eq!(
        columns("Repository"),
        [
            "INTEGRITY",
            "SIZE",
            "SNAPSHOT-COUNT",
            "LAST-SUCCESSFUL-BACKUP",
            "AGE"
        ]
    );
    assert_eq!(
        columns("BackupConfiguration"),
        ["TASK", "SCHEDULE", "PAUSED", "PHASE", "AGE"]
    );
    assert_eq!(
        columns("BackupSession"),
        ["INVOKER-TYPE", "INVOKER-NAME", "PHASE", "DURATION", "AGE"]
    );
    for kind in [
        "Repository",
        "BackupConfiguration",
        "BackupSession",
        "RestoreSession",
    ] {
        let v = &find(kind).spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind}"
        );
    }
    for kind in ["Function", "Task", "BackupBlueprint", "AppBinding"] {
        let v = &find(kind).spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_none(),
            "{kind}"
        );
    }
}
