//! What the API server and its built-in controllers do after writes: serving custom resources
//! once their CRD is stored (and establishing it), and the background loop that runs garbage
//! collection through ownerReferences, namespace deletion and CRD instance cleanup.

use crate::Core;
use crate::registry::{Column, Gr, ResourceDef, ScaleDef, StatusOnCreate};
use crate::status::Cause;
use crate::store::{State, key, key_of};
use crate::util::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const CRD_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

fn is(def: &ResourceDef, group: &str, plural: &str) -> bool {
    def.crd.is_none() && def.group == group && def.plural == plural
}

/// Server-set fields on create that a controller would add right away.
pub fn on_create(def: &ResourceDef, obj: &mut Value) {
    if is(def, "", "namespaces") {
        obj["spec"] = json!({"finalizers": ["kubernetes"]});
        let name = name_of(obj).to_owned();
        let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
        as_object_mut(labels).insert("kubernetes.io/metadata.name".into(), json!(name));
    }
    if is(def, "apiextensions.k8s.io", "customresourcedefinitions") {
        let m = meta_mut(obj);
        let fins = m.entry("finalizers").or_insert_with(|| json!([]));
        if let Some(a) = fins.as_array_mut()
            && !a.iter().any(|f| f == CRD_FINALIZER)
        {
            a.push(json!(CRD_FINALIZER));
        }
    }
}

pub fn validate_crd(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let group = spec.get("group").and_then(Value::as_str).unwrap_or("");
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("");
    if group.is_empty() {
        causes.push(Cause::required("spec.group"));
    } else if !group.contains('.') {
        causes.push(Cause::invalid(
            "spec.group",
            &json!(group),
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        causes.push(Cause::required("spec.names.plural"));
    }
    if spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        causes.push(Cause::required("spec.names.kind"));
    }
    let name = name_of(obj);
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        causes.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    match spec.get("scope").and_then(Value::as_str) {
        Some("Namespaced" | "Cluster") => {}
        other => causes.push(Cause::not_supported(
            "spec.scope",
            &json!(other),
            &[json!("Cluster"), json!("Namespaced")],
        )),
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        causes.push(Cause::required("spec.versions"));
    }
    let storage = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .count();
    if !versions.is_empty() && storage != 1 {
        causes.push(Cause::invalid(
            "spec.versions",
            &json!(versions),
            "must have exactly one version marked as storage version",
        ));
    }
    causes
}

/// The resource definitions a CRD serves.
fn crd_defs(crd: &Value) -> Vec<ResourceDef> {
    let spec = crd.get("spec").cloned().unwrap_or(json!({}));
    let s = |p: &str| {
        spec.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let strings = |p: &str| -> Vec<String> { string_list(spec.pointer(p)) };
    let kind = s("/names/kind");
    let singular = match s("/names/singular") {
        x if x.is_empty() => kind.to_lowercase(),
        x => x,
    };
    let mut out = Vec::new();
    for v in spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        let columns: Vec<Column> = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| {
                        let g = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                        Column {
                            name: g("name"),
                            type_: g("type"),
                            format: g("format"),
                            description: g("description"),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                            json_path: g("jsonPath"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Without printer columns a CRD prints Name and Age, like the real server.
        let columns = if columns.is_empty() {
            vec![Column::age()]
        } else {
            columns
        };
        let scale = v.pointer("/subresources/scale").map(|sc| ScaleDef {
            spec_replicas: sc
                .get("specReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".spec.replicas")
                .to_owned(),
            status_replicas: sc
                .get("statusReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".status.replicas")
                .to_owned(),
            label_selector: sc
                .get("labelSelectorPath")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
        let field_labels = v
            .get("selectableFields")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.get("jsonPath").and_then(Value::as_str))
                    .map(|p| p.trim_start_matches('.').to_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.push(ResourceDef {
            group: s("/group"),
            version: v
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            plural: s("/names/plural"),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced: s("/scope") != "Cluster",
            short_names: strings("/names/shortNames"),
            categories: strings("/names/categories"),
            status: v.pointer("/subresources/status").is_some(),
            scale,
            columns,
            schema: v.pointer("/schema/openAPIV3Schema").cloned().map(Arc::new),
            crd: Some(name_of(crd).to_owned()),
            field_labels,
            status_on_create: StatusOnCreate::Drop,
            storage_version: v.get("storage").and_then(Value::as_bool) == Some(true),
            aggregated: false,
            create_only: false,
        });
    }
    out
}

fn condition(t: &str, reason: &str, message: &str) -> Value {
    json!({"type": t, "status": "True", "lastTransitionTime": now_rfc3339(), "reason": reason, "message": message})
}

/// Hooks run under the store lock right after a write of `def`.
pub fn after_write(core: &Core, st: &mut State, def: &ResourceDef, stored: &Arc<Value>) {
    if def.crd.is_none() {
        crate::auth::publish_root_ca(core, st, &def.group, &def.plural, stored);
    }
    if is(def, "apiextensions.k8s.io", "customresourcedefinitions") {
        let name = name_of(stored).to_owned();
        let gr = def.gr();
        let present = st.get(&gr, &key("", &name)).is_some();
        st.registry.remove_crd(&name);
        if present {
            for d in crd_defs(stored) {
                st.registry.insert(d);
            }
            let established = stored
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            let accepted = stored.pointer("/status/acceptedNames")
                == stored.pointer("/spec/names").map(with_list_kind).as_ref();
            if !is_deleting(stored) && (!established || !accepted) {
                // The CRD controllers accept the names and establish the resource at once.
                let mut obj = (**stored).clone();
                let storage: Vec<Value> = obj
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .map(|vs| {
                        vs.iter()
                            .filter(|v| v["storage"] == true)
                            .map(|v| v["name"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                obj["status"] = json!({
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                        condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                    "acceptedNames": obj.pointer("/spec/names").map(with_list_kind).unwrap_or(json!({})),
                    "storedVersions": storage,
                });
                st.put(&gr, obj);
            }
        }
        core.bump_epoch();
    } else if is(def, "apiregistration.k8s.io", "apiservices") {
        // Local APIServices are always available [kube-aggregator: pkg/controllers/status/local];
        // the others are the availability controller's (`available.rs`).
        let gr = def.gr();
        let name = name_of(stored).to_owned();
        let has = stored
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Available"));
        let local = stored.pointer("/spec/service").is_none_or(Value::is_null);
        if local && !has && !is_deleting(stored) && st.get(&gr, &key("", &name)).is_some() {
            let mut obj = (**stored).clone();
            obj["status"] = json!({"conditions": [condition("Available", "Local", "Local APIServices are always available")]});
            st.put(&gr, obj);
        }
        core.available.notify_one();
        core.bump_epoch();
    } else if def.crd.is_none()
        && ((def.group.is_empty() && def.plural == "services")
            || (def.group == "discovery.k8s.io" && def.plural == "endpointslices"))
    {
        core.available.notify_one();
    }
}

fn with_list_kind(names: &Value) -> Value {
    let mut n = names.clone();
    if n.get("listKind").is_none()
        && let Some(k) = n.get("kind").and_then(Value::as_str)
    {
        n["listKind"] = json!(format!("{k}List"));
    }
    if n.get("singular").is_none()
        && let Some(k) = n.get("kind").and_then(Value::as_str)
    {
        n["singular"] = json!(k.to_lowercase());
    }
    n
}

pub async fn run(core: Arc<Core>) {
    let mut shutdown = core.shutdown.clone();
    loop {
        let full = tokio::select! {
            _ = core.gc.notified() => core.gc_full.swap(false, std::sync::atomic::Ordering::AcqRel),
            _ = tokio::time::sleep(Duration::from_secs(2)) => true,
            _ = shutdown.changed() => return,
        };
        let created = std::mem::take(
            &mut *core
                .gc_created
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // A whole pass covers the new objects too; a deletion it makes may cascade.
        if full || check_created(&core, &created) {
            for _ in 0..64 {
                if !pass(&core) {
                    break;
                }
            }
        }
    }
}

/// The collector's view of objects just created with owners: each whose owners all do not
/// exist is deleted, as a whole pass would. Returns whether it deleted anything.
fn check_created(core: &Core, created: &[(Gr, String)]) -> bool {
    if created.is_empty() {
        return false;
    }
    let st = core.lock();
    let actions: Vec<Action> = created
        .iter()
        .filter(|(gr, k)| {
            st.get(gr, k).is_some_and(|obj| {
                !is_deleting(&obj)
                    && obj
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            !refs.is_empty()
                                && !refs.iter().any(|r| {
                                    st.exists_uid(
                                        r.get("uid").and_then(Value::as_str).unwrap_or(""),
                                    )
                                })
                        })
            })
        })
        .map(|(gr, k)| Action::Delete(gr.clone(), k.clone()))
        .collect();
    drop(st);
    apply_actions(core, actions)
}

enum Action {
    Delete(Gr, String),
    RemoveFinalizer(Gr, String, &'static str),
    RemoveNamespaceFinalizer(String),
    StripOwner(Gr, String, String),
}

/// One round of the garbage collector and the namespace and CRD cleanup controllers.
/// Returns whether it changed anything.
fn pass(core: &Core) -> bool {
    let st = core.lock();
    // A cheap first scan; the indexes below are built only when something needs them, so
    // the steady state with thousands of objects costs one walk.
    let mut deleting_owner = false;
    let mut ns_deleting = false;
    let mut any_deleting = false;
    let mut actions = Vec::new();
    for (gr, table) in &st.tables {
        for (k, obj) in &table.objects {
            let deleting = is_deleting(obj);
            if deleting {
                any_deleting = true;
                let fins = finalizers_of(obj);
                deleting_owner |= fins
                    .iter()
                    .any(|f| f == "orphan" || f == "foregroundDeletion");
                ns_deleting |= gr.group.is_empty() && gr.resource == "namespaces";
            }
            if let Some(refs) = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                && !refs.is_empty()
                && !deleting
                && !refs
                    .iter()
                    .any(|r| st.exists_uid(r.get("uid").and_then(Value::as_str).unwrap_or("")))
            {
                actions.push(Action::Delete(gr.clone(), k.clone()));
            }
        }
    }
    if !any_deleting {
        drop(st);
        return apply_actions(core, actions);
    }
    let mut dependents: HashMap<String, Vec<(Gr, String, bool)>> = HashMap::new();
    let mut by_ns: HashMap<String, Vec<(Gr, String, bool)>> = HashMap::new();
    for (gr, table) in &st.tables {
        for (k, obj) in &table.objects {
            let deleting = is_deleting(obj);
            if deleting_owner
                && let Some(refs) = obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
            {
                for r in refs {
                    let uid = r.get("uid").and_then(Value::as_str).unwrap_or("");
                    dependents.entry(uid.to_owned()).or_default().push((
                        gr.clone(),
                        k.clone(),
                        deleting,
                    ));
                }
            }
            let ns = namespace_of(obj);
            if ns_deleting && !ns.is_empty() {
                by_ns
                    .entry(ns.to_owned())
                    .or_default()
                    .push((gr.clone(), k.clone(), deleting));
            }
        }
    }
    let crd_gr = Gr {
        group: "apiextensions.k8s.io".into(),
        resource: "customresourcedefinitions".into(),
    };
    let ns_gr = Gr {
        group: String::new(),
        resource: "namespaces".into(),
    };
    for (gr, table) in &st.tables {
        for (k, obj) in &table.objects {
            if !is_deleting(obj) {
                continue;
            }
            let fins = finalizers_of(obj);
            let deps = dependents.get(uid_of(obj)).cloned().unwrap_or_default();
            if fins.iter().any(|f| f == "orphan") {
                for (dg, dk, _) in &deps {
                    actions.push(Action::StripOwner(
                        dg.clone(),
                        dk.clone(),
                        uid_of(obj).to_owned(),
                    ));
                }
                actions.push(Action::RemoveFinalizer(gr.clone(), k.clone(), "orphan"));
            }
            if fins.iter().any(|f| f == "foregroundDeletion") {
                if deps.is_empty() {
                    actions.push(Action::RemoveFinalizer(
                        gr.clone(),
                        k.clone(),
                        "foregroundDeletion",
                    ));
                } else {
                    for (dg, dk, deleting) in &deps {
                        if !deleting {
                            actions.push(Action::Delete(dg.clone(), dk.clone()));
                        }
                    }
                }
            }
            if *gr == ns_gr {
                let name = name_of(obj).to_owned();
                let content = by_ns.get(&name).cloned().unwrap_or_default();
                if content.is_empty() {
                    if obj
                        .pointer("/spec/finalizers")
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                    {
                        actions.push(Action::RemoveNamespaceFinalizer(name));
                    }
                } else {
                    for (cg, ck, deleting) in content {
                        if !deleting {
                            actions.push(Action::Delete(cg, ck));
                        }
                    }
                }
            }
            if *gr == crd_gr && fins.iter().any(|f| f == CRD_FINALIZER) {
                let group = obj
                    .pointer("/spec/group")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let plural = obj
                    .pointer("/spec/names/plural")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let cr_gr = Gr {
                    group: group.into(),
                    resource: plural.into(),
                };
                let items: Vec<(String, bool)> = st
                    .tables
                    .get(&cr_gr)
                    .map(|t| {
                        t.objects
                            .iter()
                            .map(|(k, o)| (k.clone(), is_deleting(o)))
                            .collect()
                    })
                    .unwrap_or_default();
                if items.is_empty() {
                    actions.push(Action::RemoveFinalizer(
                        gr.clone(),
                        k.clone(),
                        CRD_FINALIZER,
                    ));
                } else {
                    for (ik, deleting) in items {
                        if !deleting {
                            actions.push(Action::Delete(cr_gr.clone(), ik));
                        }
                    }
                }
            }
        }
    }
    drop(st);
    apply_actions(core, actions)
}

fn apply_actions(core: &Core, actions: Vec<Action>) -> bool {
    let ns_gr = Gr {
        group: String::new(),
        resource: "namespaces".into(),
    };
    let mut st = core.lock();
    let progress = !actions.is_empty();
    for a in actions {
        match a {
            Action::Delete(gr, k) => delete_internal(core, &mut st, &gr, &k),
            Action::RemoveFinalizer(gr, k, f) => {
                if let Some(obj) = st.get(&gr, &k) {
                    let mut o = (*obj).clone();
                    let fins: Vec<String> =
                        finalizers_of(&o).into_iter().filter(|x| x != f).collect();
                    meta_mut(&mut o).insert("finalizers".into(), json!(fins));
                    if fins.is_empty() {
                        meta_mut(&mut o).remove("finalizers");
                    }
                    put_and_hook(core, &mut st, &gr, o);
                }
            }
            Action::RemoveNamespaceFinalizer(name) => {
                if let Some(obj) = st.get(&ns_gr, &key("", &name)) {
                    let mut o = (*obj).clone();
                    o["spec"]["finalizers"] = json!([]);
                    put_and_hook(core, &mut st, &ns_gr, o);
                }
            }
            Action::StripOwner(gr, k, uid) => {
                if let Some(obj) = st.get(&gr, &k) {
                    let mut o = (*obj).clone();
                    if let Some(refs) = o
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                        if refs.is_empty() {
                            meta_mut(&mut o).remove("ownerReferences");
                        }
                    }
                    st.put(&gr, o);
                }
            }
        }
    }
    progress
}

fn put_and_hook(core: &Core, st: &mut State, gr: &Gr, obj: Value) {
    let (stored, _) = st.put(gr, obj);
    if let Some(def) = st.registry.storage_def(gr) {
        after_write(core, st, &def, &stored);
    }
}

/// Deletes as the garbage collector does: objects with finalizers get a deletionTimestamp and
/// wait; the rest go at once.
fn delete_internal(core: &Core, st: &mut State, gr: &Gr, k: &str) {
    let Some(obj) = st.get(gr, k) else { return };
    if is_deleting(&obj) {
        return;
    }
    let is_ns = gr.group.is_empty() && gr.resource == "namespaces";
    if finalizers_of(&obj).is_empty() && !is_ns {
        let gone = st.remove_with(gr, &key_of(&obj), None);
        if let Some(def) = st.registry.storage_def(gr) {
            after_write(core, st, &def, &gone);
        }
        return;
    }
    let mut o = (*obj).clone();
    let m = meta_mut(&mut o);
    m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
    m.insert("deletionGracePeriodSeconds".into(), json!(0));
    if is_ns {
        o["status"] = json!({"phase": "Terminating"});
    }
    put_and_hook(core, st, gr, o);
}
