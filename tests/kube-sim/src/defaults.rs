//! What the API server itself fills in or checks for built-in kinds on every write: defaults a
//! client would see (Service cluster IPs, pod policies, replicas), Secret `stringData`, and
//! the validation of names, labels and annotations.

use crate::registry::ResourceDef;
use crate::status::Cause;
use crate::util::*;
use base64::Engine;
use serde_json::{Value, json};

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUALIFIED_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// The real server's limit on the total size of annotations.
pub const MAX_ANNOTATIONS: usize = 256 * 1024;

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

fn is_qualified_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_part(s)
}

/// Name, label and annotation checks every kind gets.
pub fn validate_meta(def: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = crate::util::name_of(obj);
    let name_v = json!(name);
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    } else if def.name_is_label() {
        if !is_label(name) {
            let msg = if name.len() > 63 {
                "must be no more than 63 characters"
            } else {
                LABEL_MSG
            };
            causes.push(Cause::invalid("metadata.name", &name_v, msg));
        }
    } else if !is_subdomain(name) {
        let msg = if name.len() > 253 {
            "must be no more than 253 characters"
        } else {
            SUBDOMAIN_MSG
        };
        causes.push(Cause::invalid("metadata.name", &name_v, msg));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            let key_ok = match k.split_once('/') {
                Some((prefix, n)) => is_subdomain(prefix) && is_qualified_part(n),
                None => is_qualified_part(k),
            };
            if !key_ok {
                causes.push(Cause::invalid("metadata.labels", &json!(k), QUALIFIED_MSG));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                _ => causes.push(Cause::invalid("metadata.labels", v, LABEL_VALUE_MSG)),
            }
        }
    }
    if let Some(ann) = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let total: usize = ann
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum();
        if total > MAX_ANNOTATIONS {
            causes.push(Cause {
                reason: "FieldValueTooLong",
                field: "metadata.annotations".into(),
                message: format!("Too long: must have at most {MAX_ANNOTATIONS} bytes"),
            });
        }
        if ann.values().any(|v| !v.is_string()) {
            causes.push(Cause::invalid(
                "metadata.annotations",
                &json!("object"),
                "annotation values must be strings",
            ));
        }
    }
    causes
}

/// A few kind-specific checks clients commonly trip over.
pub fn validate_kind(def: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !def.is_builtin() {
        return causes;
    }
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Pod") => pod_spec(obj.get("spec"), "spec", &mut causes),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            if obj.pointer("/spec/selector").is_none() {
                causes.push(Cause::required("spec.selector"));
            } else if let Some(sel) = obj.pointer("/spec/selector") {
                let s = crate::selectors::LabelSelector::from_object(sel);
                let labels = obj
                    .pointer("/spec/template/metadata/labels")
                    .and_then(Value::as_object);
                if !s.matches(labels) {
                    causes.push(Cause::invalid(
                        "spec.template.metadata.labels",
                        &obj.pointer("/spec/template/metadata/labels")
                            .cloned()
                            .unwrap_or(json!({})),
                        "`selector` does not match template `labels`",
                    ));
                }
            }
            pod_spec(
                obj.pointer("/spec/template/spec"),
                "spec.template.spec",
                &mut causes,
            );
        }
        ("batch", "Job") => pod_spec(
            obj.pointer("/spec/template/spec"),
            "spec.template.spec",
            &mut causes,
        ),
        ("batch", "CronJob") => {
            match obj.pointer("/spec/schedule").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required("spec.schedule")),
                Some(sched) => {
                    if let Err(e) = crate::cron::check(sched) {
                        causes.push(Cause::invalid("spec.schedule", &json!(sched), &e));
                    }
                    if sched.contains("TZ") {
                        causes.push(Cause::invalid(
                            "spec.schedule",
                            &json!(sched),
                            "cannot use TZ or CRON_TZ in schedule, use timeZone field instead",
                        ));
                    }
                }
            }
            pod_spec(
                obj.pointer("/spec/jobTemplate/spec/template/spec"),
                "spec.jobTemplate.spec.template.spec",
                &mut causes,
            );
        }
        ("coordination.k8s.io", "Lease") => {
            if let Some(d) = obj
                .pointer("/spec/leaseDurationSeconds")
                .and_then(Value::as_i64)
                && d <= 0
            {
                causes.push(Cause::invalid(
                    "spec.leaseDurationSeconds",
                    &json!(d),
                    "must be greater than 0",
                ));
            }
            if let Some(t) = obj
                .pointer("/spec/leaseTransitions")
                .and_then(Value::as_i64)
                && t < 0
            {
                causes.push(Cause::invalid(
                    "spec.leaseTransitions",
                    &json!(t),
                    "must be greater than or equal to 0",
                ));
            }
        }
        _ => {}
    }
    causes
}

/// Fields of built-in kinds that may not change once set.
pub fn validate_update(def: &ResourceDef, obj: &Value, old: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if !def.is_builtin() {
        return causes;
    }
    let immutable: &[&str] = match (def.group.as_str(), def.kind.as_str()) {
        ("batch", "Job") => &["selector", "template", "completionMode"],
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet") => &["selector"],
        ("apps", "StatefulSet") => &[
            "selector",
            "serviceName",
            "volumeClaimTemplates",
            "podManagementPolicy",
        ],
        _ => &[],
    };
    let spec = |o: &Value, k: &str| o.pointer(&format!("/spec/{k}")).cloned();
    for k in immutable {
        if spec(obj, k) != spec(old, k) {
            causes.push(Cause::invalid(
                format!("spec.{k}"),
                &spec(obj, k).unwrap_or(Value::Null),
                "field is immutable",
            ));
        }
    }
    causes
}

fn pod_spec(spec: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{path}.containers"))),
        Some(cs) if cs.is_empty() => causes.push(Cause::required(format!("{path}.containers"))),
        Some(cs) => {
            for (i, c) in cs.iter().enumerate() {
                if c.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push(Cause::required(format!("{path}.containers[{i}].name")));
                }
                if c.get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty()
                {
                    causes.push(Cause::required(format!("{path}.containers[{i}].image")));
                }
            }
        }
    }
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        m.entry(key).or_insert(v);
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                let image = c.get("image").and_then(Value::as_str).unwrap_or("");
                let tag_latest = !image.rsplit('/').next().unwrap_or("").contains(':')
                    || image.ends_with(":latest");
                let policy = if tag_latest && !image.contains('@') {
                    "Always"
                } else {
                    "IfNotPresent"
                };
                set_default(c, "imagePullPolicy", json!(policy));
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
}

/// Defaults applied on every create and update of a built-in kind.
pub fn apply_defaults(def: &ResourceDef, obj: &mut Value, creating: bool) {
    if !def.is_builtin() {
        return;
    }
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Pod") => {
            if let Some(spec) = obj.get_mut("spec") {
                default_pod_spec(spec);
                let sa = spec
                    .get("serviceAccountName")
                    .cloned()
                    .unwrap_or(json!("default"));
                set_default(spec, "serviceAccountName", sa.clone());
                set_default(spec, "serviceAccount", sa);
            }
        }
        ("apps", kind @ ("Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")) => {
            if let Some(spec) = obj.get_mut("spec") {
                if kind != "DaemonSet" {
                    set_default(spec, "replicas", json!(1));
                }
                set_default(spec, "revisionHistoryLimit", json!(10));
                if kind == "Deployment" {
                    set_default(spec, "progressDeadlineSeconds", json!(600));
                    // kubectl sends `strategy: {}`: the type and its parameters are filled in.
                    set_default(spec, "strategy", json!({}));
                    if let Some(st) = spec.get_mut("strategy") {
                        set_default(st, "type", json!("RollingUpdate"));
                        if st["type"] == "RollingUpdate" {
                            set_default(st, "rollingUpdate", json!({}));
                            if let Some(ru) = st.get_mut("rollingUpdate") {
                                set_default(ru, "maxUnavailable", json!("25%"));
                                set_default(ru, "maxSurge", json!("25%"));
                            }
                        }
                    }
                }
                if kind == "StatefulSet" {
                    set_default(spec, "podManagementPolicy", json!("OrderedReady"));
                    set_default(
                        spec,
                        "updateStrategy",
                        json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
                    );
                    set_default(
                        spec,
                        "persistentVolumeClaimRetentionPolicy",
                        json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
                    );
                }
                if kind == "DaemonSet" {
                    set_default(
                        spec,
                        "updateStrategy",
                        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
                    );
                }
                if let Some(ps) = spec.pointer_mut("/template/spec") {
                    default_pod_spec(ps);
                }
            }
        }
        ("batch", "Job") => {
            // A Job without labels takes its pod template's (before the generated ones).
            let template_labels = obj.pointer("/spec/template/metadata/labels").cloned();
            if creating
                && labels_of(obj).is_none_or(|l| l.is_empty())
                && let Some(l) =
                    template_labels.filter(|l| l.as_object().is_some_and(|m| !m.is_empty()))
            {
                meta_mut(obj).insert("labels".into(), l);
            }
            let (uid, name) = (uid_of(obj).to_owned(), name_of(obj).to_owned());
            if let Some(spec) = obj.get_mut("spec") {
                set_default(spec, "backoffLimit", json!(6));
                set_default(spec, "completions", json!(1));
                set_default(spec, "parallelism", json!(1));
                set_default(spec, "completionMode", json!("NonIndexed"));
                set_default(spec, "suspend", json!(false));
                let replacement = if spec.get("podFailurePolicy").is_some_and(|p| !p.is_null()) {
                    "Failed"
                } else {
                    "TerminatingOrFailed"
                };
                set_default(spec, "podReplacementPolicy", json!(replacement));
                let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
                if creating && !manual {
                    // The generated selector and the labels it selects (jobStrategy).
                    spec["selector"] =
                        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
                    let labels = as_object_mut(
                        as_object_mut(
                            as_object_mut(spec)
                                .entry("template")
                                .or_insert_with(|| json!({})),
                        )
                        .entry("metadata")
                        .or_insert_with(|| json!({})),
                    )
                    .entry("labels")
                    .or_insert_with(|| json!({}));
                    let l = as_object_mut(labels);
                    l.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
                    l.insert("batch.kubernetes.io/job-name".into(), json!(name));
                    l.insert("controller-uid".into(), json!(uid));
                    l.insert("job-name".into(), json!(name));
                }
                if let Some(ps) = spec.pointer_mut("/template/spec") {
                    default_pod_spec(ps);
                }
            }
        }
        ("batch", "CronJob") => {
            if let Some(spec) = obj.get_mut("spec") {
                set_default(spec, "concurrencyPolicy", json!("Allow"));
                set_default(spec, "suspend", json!(false));
                set_default(spec, "successfulJobsHistoryLimit", json!(3));
                set_default(spec, "failedJobsHistoryLimit", json!(1));
                if let Some(ps) = spec.pointer_mut("/jobTemplate/spec/template/spec") {
                    default_pod_spec(ps);
                }
            }
        }
        ("", "Service") => {
            if let Some(spec) = obj.get_mut("spec") {
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                let external = spec.get("type").and_then(Value::as_str) == Some("ExternalName");
                if creating && !external && spec.get("clusterIP").is_none() {
                    let r = random_u64();
                    let ip = format!("10.96.{}.{}", (r >> 8) % 256, (r % 253) + 2);
                    spec["clusterIP"] = json!(ip);
                }
                if let Some(ip) = spec.get("clusterIP").cloned() {
                    set_default(spec, "clusterIPs", json!([ip]));
                }
                if !external {
                    set_default(spec, "ipFamilies", json!(["IPv4"]));
                    set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
                    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
        }
        ("", "PersistentVolumeClaim") => {
            if let Some(spec) = obj.get_mut("spec") {
                set_default(spec, "volumeMode", json!("Filesystem"));
            }
        }
        ("", "Secret") => {
            set_default(obj, "type", json!("Opaque"));
            // stringData is write-only: it is merged into data and never stored.
            if let Some(Value::Object(sd)) =
                obj.as_object_mut().and_then(|m| m.remove("stringData"))
            {
                let data = obj
                    .as_object_mut()
                    .map(|m| m.entry("data").or_insert_with(|| json!({})));
                if let Some(Value::Object(d)) = data {
                    for (k, v) in sd {
                        let s = v.as_str().unwrap_or("").to_owned();
                        d.insert(
                            k,
                            json!(base64::engine::general_purpose::STANDARD.encode(s)),
                        );
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn names_are_checked() {
        let reg = Registry::with_builtins();
        let ns = reg.get("", "v1", "namespaces").unwrap();
        let causes = validate_meta(&ns, &json!({"metadata": {"name": "Bad_Name"}}));
        assert_eq!(causes.len(), 1);
        assert!(causes[0].message.contains("RFC 1123 label"));
        let cm = reg.get("", "v1", "configmaps").unwrap();
        assert!(
            validate_meta(
                &cm,
                &json!({"metadata": {"name": "a.b-c", "labels": {"app.kubernetes.io/name": "x"}}})
            )
            .is_empty()
        );
        assert_eq!(
            validate_meta(
                &cm,
                &json!({"metadata": {"name": "x", "labels": {"a": "b c"}}})
            )
            .len(),
            1
        );
    }

    #[test]
    fn secret_string_data_is_encoded() {
        let reg = Registry::with_builtins();
        let s = reg.get("", "v1", "secrets").unwrap();
        let mut obj = json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}});
        apply_defaults(&s, &mut obj, true);
        assert_eq!(obj["data"]["k"], "dg==");
        assert_eq!(obj["type"], "Opaque");
        assert!(obj.get("stringData").is_none());
    }
}
