//! Every Stash object in `deploy/examples/` must survive a trip through the typed structs:
//! parse, serialise, and compare with what the user wrote. A field the types do not know
//! would be silently dropped by serde, so this is what catches a type that drifts from Stash.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use stash_api::{
    AppBinding, BackupAssignment, BackupBatch, BackupBlueprint, BackupConfiguration, BackupSession,
    Function, Repository, RestoreAssignment, RestoreBatch, RestoreSession, Snapshot, Task,
};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn roundtrip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Value> {
    let typed: T = serde_json::from_value(doc.clone()).context("does not parse")?;
    Ok(serde_json::to_value(&typed)?)
}

/// Round-trips one object if it is one of ours; returns whether it was.
fn check(doc: &Value) -> Result<bool> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let back = match (api_version, kind) {
        ("stash.appscode.com/v1alpha1", "Repository") => roundtrip::<Repository>(doc)?,
        ("stash.appscode.com/v1beta1", "BackupConfiguration") => {
            roundtrip::<BackupConfiguration>(doc)?
        }
        ("stash.appscode.com/v1beta1", "BackupSession") => roundtrip::<BackupSession>(doc)?,
        ("stash.appscode.com/v1beta1", "RestoreSession") => roundtrip::<RestoreSession>(doc)?,
        ("stash.appscode.com/v1beta1", "Function") => roundtrip::<Function>(doc)?,
        ("stash.appscode.com/v1beta1", "Task") => roundtrip::<Task>(doc)?,
        ("stash.appscode.com/v1beta1", "BackupBlueprint") => roundtrip::<BackupBlueprint>(doc)?,
        ("stash.appscode.com/v1beta1", "BackupBatch") => roundtrip::<BackupBatch>(doc)?,
        ("stash.appscode.com/v1beta1", "RestoreBatch") => roundtrip::<RestoreBatch>(doc)?,
        ("stash.appscode.com/v1beta1", "BackupAssignment") => roundtrip::<BackupAssignment>(doc)?,
        ("stash.appscode.com/v1beta1", "RestoreAssignment") => roundtrip::<RestoreAssignment>(doc)?,
        ("appcatalog.appscode.com/v1alpha1", "AppBinding") => roundtrip::<AppBinding>(doc)?,
        ("repositories.stash.appscode.com/v1alpha1", "Snapshot") => roundtrip::<Snapshot>(doc)?,
        (v, k) if v.contains("appscode.com") => bail!("unknown Stash kind {v}/{k}"),
        _ => return Ok(false),
    };
    if &back != doc {
        bail!(
            "changed by the round trip:\n  wrote: {doc}\n   read: {back}\n  differences: {}",
            differences(doc, &back, "").join(", ")
        );
    }
    Ok(true)
}

/// The JSON paths where two values differ, for a message a person can act on.
fn differences(a: &Value, b: &Value, path: &str) -> Vec<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = format!("{path}.{k}");
                    match (x.get(k), y.get(k)) {
                        (Some(l), Some(r)) => differences(l, r, &p),
                        (Some(_), None) => vec![format!("{p} lost")],
                        (None, Some(_)) => vec![format!("{p} added")],
                        (None, None) => vec![],
                    }
                })
                .collect()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .flat_map(|(i, (l, r))| differences(l, r, &format!("{path}[{i}]")))
            .collect(),
        _ if a == b => vec![],
        _ => vec![format!("{path}: {a} became {b}")],
    }
}

fn load_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(de)
            .with_context(|| format!("{} is not valid YAML", path.display()))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

#[test]
fn every_example_round_trips_through_the_typed_structs() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    assert!(
        files.len() >= 12,
        "expected at least twelve examples, found {}",
        files.len()
    );

    let mut failures = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        for doc in load_documents(file)? {
            let what = format!(
                "{} {}/{}",
                file.display(),
                doc["kind"],
                doc["metadata"]["name"]
            );
            match check(&doc) {
                Ok(true) => {
                    kinds.insert(doc["kind"].as_str().unwrap_or_default().to_owned());
                }
                Ok(false) => {}
                Err(e) => failures.push(format!("{what}: {e:#}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for kind in [
        "Repository",
        "BackupConfiguration",
        "BackupSession",
        "RestoreSession",
        "Function",
        "Task",
        "BackupBlueprint",
        "BackupBatch",
        "RestoreBatch",
        "AppBinding",
    ] {
        assert!(kinds.contains(kind), "no example shows a {kind}");
    }
    Ok(())
}

#[test]
fn an_unknown_field_is_caught_by_the_round_trip() -> Result<()> {
    // The check above is only worth something if it notices a field the types drop.
    let doc: Value = serde_yaml::from_str(
        "apiVersion: stash.appscode.com/v1beta1\nkind: BackupSession\nmetadata: {name: x}\n\
         spec: {invoker: {kind: BackupConfiguration, name: x}, retryLeft: 1, bogus: true}\n",
    )?;
    let err = check(&doc).expect_err("a dropped field must fail the round trip");
    assert!(format!("{err}").contains(".spec.bogus lost"), "{err}");
    Ok(())
}
