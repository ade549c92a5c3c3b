//! Just enough of the Kubernetes protobuf encoding to accept the writes typed Go clients send
//! as protobuf (Helm's release Secrets, `kubectl create namespace|configmap|secret`): the
//! `k8s\0` envelope and the messages of Namespace, Secret, ConfigMap, ServiceAccount, RBAC
//! roles and bindings, TokenRequest, the access and token reviews, and the Deployment, Job,
//! CronJob, Pod, Service and Scale fields `kubectl create deployment|job|cronjob|service`,
//! `kubectl run|expose|scale` send.
//! Answers are always JSON, which those clients also accept.

use base64::Engine;
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("failed to decode protobuf: {0}")]
    Decode(&'static str),
    #[error("protobuf bodies of kind {0:?} are not supported; send JSON")]
    UnsupportedKind(String),
}

#[derive(Clone, Copy)]
enum F {
    /// Plain (non-pointer) Go fields are always encoded; their zero value means unset, as
    /// JSON's `omitempty` would have left them out.
    Str,
    Int,
    Bool,
    /// Pointer fields are encoded only when set, so a zero is a real value.
    OptInt,
    OptBool,
    Time,
    Msg(&'static [(u64, &'static str, F)]),
    MapStr,
    MapBytes,
    /// `map<string, Quantity>`: the Quantity message's string.
    MapQuantity,
    /// `IntOrString`: `{type, intVal, strVal}` → the integer or the string.
    IntOrString,
    RepStr,
    RepMsg(&'static [(u64, &'static str, F)]),
}

const OWNER_REF: &[(u64, &str, F)] = &[
    (1, "kind", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
    (5, "apiVersion", F::Str),
    (6, "controller", F::OptBool),
    (7, "blockOwnerDeletion", F::OptBool),
];
const OBJECT_META: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "generateName", F::Str),
    (3, "namespace", F::Str),
    (5, "uid", F::Str),
    (6, "resourceVersion", F::Str),
    (7, "generation", F::Int),
    (8, "creationTimestamp", F::Time),
    (11, "labels", F::MapStr),
    (12, "annotations", F::MapStr),
    (13, "ownerReferences", F::RepMsg(OWNER_REF)),
    (14, "finalizers", F::RepStr),
];
const LOCAL_REF: &[(u64, &str, F)] = &[(1, "name", F::Str)];
const SECRET: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapBytes),
    (3, "type", F::Str),
    (4, "stringData", F::MapStr),
    (5, "immutable", F::OptBool),
];
const CONFIG_MAP: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "data", F::MapStr),
    (3, "binaryData", F::MapBytes),
    (4, "immutable", F::OptBool),
];
const NAMESPACE_SPEC: &[(u64, &str, F)] = &[(1, "finalizers", F::RepStr)];
const NAMESPACE: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(NAMESPACE_SPEC)),
];
const SERVICE_ACCOUNT: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (3, "imagePullSecrets", F::RepMsg(LOCAL_REF)),
    (4, "automountServiceAccountToken", F::OptBool),
];
const PRECONDITIONS: &[(u64, &str, F)] = &[(1, "uid", F::Str), (2, "resourceVersion", F::Str)];
const DELETE_OPTIONS: &[(u64, &str, F)] = &[
    (1, "gracePeriodSeconds", F::OptInt),
    (2, "preconditions", F::Msg(PRECONDITIONS)),
    (3, "orphanDependents", F::OptBool),
    (4, "propagationPolicy", F::Str),
    (5, "dryRun", F::RepStr),
];
const BOUND_OBJECT_REF: &[(u64, &str, F)] = &[
    (1, "kind", F::Str),
    (2, "apiVersion", F::Str),
    (3, "name", F::Str),
    (4, "uid", F::Str),
];
const TOKEN_REQUEST_SPEC: &[(u64, &str, F)] = &[
    (1, "audiences", F::RepStr),
    (3, "boundObjectRef", F::Msg(BOUND_OBJECT_REF)),
    (4, "expirationSeconds", F::OptInt),
];
const TOKEN_REQUEST: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(TOKEN_REQUEST_SPEC)),
];
const TOKEN_REVIEW_SPEC: &[(u64, &str, F)] = &[(1, "token", F::Str), (2, "audiences", F::RepStr)];
const TOKEN_REVIEW: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(TOKEN_REVIEW_SPEC)),
];
const RESOURCE_ATTRIBUTES: &[(u64, &str, F)] = &[
    (1, "namespace", F::Str),
    (2, "verb", F::Str),
    (3, "group", F::Str),
    (4, "version", F::Str),
    (5, "resource", F::Str),
    (6, "subresource", F::Str),
    (7, "name", F::Str),
];
const NON_RESOURCE_ATTRIBUTES: &[(u64, &str, F)] = &[(1, "path", F::Str), (2, "verb", F::Str)];
const SUBJECT_ACCESS_REVIEW_SPEC: &[(u64, &str, F)] = &[
    (1, "resourceAttributes", F::Msg(RESOURCE_ATTRIBUTES)),
    (2, "nonResourceAttributes", F::Msg(NON_RESOURCE_ATTRIBUTES)),
    (3, "user", F::Str),
    (4, "groups", F::RepStr),
    (6, "uid", F::Str),
];
const SUBJECT_ACCESS_REVIEW: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(SUBJECT_ACCESS_REVIEW_SPEC)),
];
const SELF_SUBJECT_RULES_REVIEW: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(&[(1, "namespace", F::Str)])),
];
const POLICY_RULE: &[(u64, &str, F)] = &[
    (1, "verbs", F::RepStr),
    (2, "apiGroups", F::RepStr),
    (3, "resources", F::RepStr),
    (4, "resourceNames", F::RepStr),
    (5, "nonResourceURLs", F::RepStr),
];
const LABEL_SELECTOR_REQ: &[(u64, &str, F)] = &[
    (1, "key", F::Str),
    (2, "operator", F::Str),
    (3, "values", F::RepStr),
];
const LABEL_SELECTOR: &[(u64, &str, F)] = &[
    (1, "matchLabels", F::MapStr),
    (2, "matchExpressions", F::RepMsg(LABEL_SELECTOR_REQ)),
];
const ROLE: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "rules", F::RepMsg(POLICY_RULE)),
    (
        3,
        "aggregationRule",
        F::Msg(&[(1, "clusterRoleSelectors", F::RepMsg(LABEL_SELECTOR))]),
    ),
];
const SUBJECT: &[(u64, &str, F)] = &[
    (1, "kind", F::Str),
    (2, "apiGroup", F::Str),
    (3, "name", F::Str),
    (4, "namespace", F::Str),
];
const ROLE_REF: &[(u64, &str, F)] = &[
    (1, "apiGroup", F::Str),
    (2, "kind", F::Str),
    (3, "name", F::Str),
];
const ROLE_BINDING: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "subjects", F::RepMsg(SUBJECT)),
    (3, "roleRef", F::Msg(ROLE_REF)),
];
const KEY_REF: &[(u64, &str, F)] = &[
    (1, "name", F::Msg(LOCAL_REF)),
    (2, "key", F::Str),
    (3, "optional", F::Bool),
];
const ENV_SOURCE: &[(u64, &str, F)] = &[
    (
        1,
        "fieldRef",
        F::Msg(&[(1, "apiVersion", F::Str), (2, "fieldPath", F::Str)]),
    ),
    (
        2,
        "resourceFieldRef",
        F::Msg(&[(1, "containerName", F::Str), (2, "resource", F::Str)]),
    ),
    (3, "configMapKeyRef", F::Msg(KEY_REF)),
    (4, "secretKeyRef", F::Msg(KEY_REF)),
];
const ENV_VAR: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "value", F::Str),
    (3, "valueFrom", F::Msg(ENV_SOURCE)),
];
const CONTAINER_PORT: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "hostPort", F::Int),
    (3, "containerPort", F::Int),
    (4, "protocol", F::Str),
    (5, "hostIP", F::Str),
];
const RESOURCES: &[(u64, &str, F)] = &[
    (1, "limits", F::MapQuantity),
    (2, "requests", F::MapQuantity),
];
const VOLUME_MOUNT: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "readOnly", F::Bool),
    (3, "mountPath", F::Str),
    (4, "subPath", F::Str),
];
const CONTAINER: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "image", F::Str),
    (3, "command", F::RepStr),
    (4, "args", F::RepStr),
    (5, "workingDir", F::Str),
    (6, "ports", F::RepMsg(CONTAINER_PORT)),
    (7, "env", F::RepMsg(ENV_VAR)),
    (8, "resources", F::Msg(RESOURCES)),
    (9, "volumeMounts", F::RepMsg(VOLUME_MOUNT)),
    (13, "terminationMessagePath", F::Str),
    (14, "imagePullPolicy", F::Str),
    (16, "stdin", F::Bool),
    (17, "stdinOnce", F::Bool),
    (18, "tty", F::Bool),
    (20, "terminationMessagePolicy", F::Str),
];
const POD_SPEC: &[(u64, &str, F)] = &[
    (2, "containers", F::RepMsg(CONTAINER)),
    (3, "restartPolicy", F::Str),
    (4, "terminationGracePeriodSeconds", F::OptInt),
    (5, "activeDeadlineSeconds", F::OptInt),
    (6, "dnsPolicy", F::Str),
    (7, "nodeSelector", F::MapStr),
    (8, "serviceAccountName", F::Str),
    (9, "serviceAccount", F::Str),
    (10, "nodeName", F::Str),
    (11, "hostNetwork", F::Bool),
    (15, "imagePullSecrets", F::RepMsg(LOCAL_REF)),
    (16, "hostname", F::Str),
    (17, "subdomain", F::Str),
    (19, "schedulerName", F::Str),
    (20, "initContainers", F::RepMsg(CONTAINER)),
    (21, "automountServiceAccountToken", F::OptBool),
    (24, "priorityClassName", F::Str),
];
const POD_TEMPLATE: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(POD_SPEC)),
];
const DEPLOYMENT_SPEC: &[(u64, &str, F)] = &[
    (1, "replicas", F::OptInt),
    (2, "selector", F::Msg(LABEL_SELECTOR)),
    (3, "template", F::Msg(POD_TEMPLATE)),
    (
        4,
        "strategy",
        F::Msg(&[
            (1, "type", F::Str),
            (
                2,
                "rollingUpdate",
                F::Msg(&[
                    (1, "maxUnavailable", F::IntOrString),
                    (2, "maxSurge", F::IntOrString),
                ]),
            ),
        ]),
    ),
    (5, "minReadySeconds", F::Int),
    (6, "revisionHistoryLimit", F::OptInt),
    (7, "paused", F::Bool),
    (9, "progressDeadlineSeconds", F::OptInt),
];
const DEPLOYMENT: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(DEPLOYMENT_SPEC)),
];
const JOB_SPEC: &[(u64, &str, F)] = &[
    (1, "parallelism", F::OptInt),
    (2, "completions", F::OptInt),
    (3, "activeDeadlineSeconds", F::OptInt),
    (4, "selector", F::Msg(LABEL_SELECTOR)),
    (5, "manualSelector", F::OptBool),
    (6, "template", F::Msg(POD_TEMPLATE)),
    (7, "backoffLimit", F::OptInt),
    (8, "ttlSecondsAfterFinished", F::OptInt),
    (9, "completionMode", F::Str),
    (10, "suspend", F::OptBool),
    (14, "podReplacementPolicy", F::Str),
];
const JOB: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(JOB_SPEC)),
];
const CRON_JOB_SPEC: &[(u64, &str, F)] = &[
    (1, "schedule", F::Str),
    (2, "startingDeadlineSeconds", F::OptInt),
    (3, "concurrencyPolicy", F::Str),
    (4, "suspend", F::OptBool),
    (
        5,
        "jobTemplate",
        F::Msg(&[
            (1, "metadata", F::Msg(OBJECT_META)),
            (2, "spec", F::Msg(JOB_SPEC)),
        ]),
    ),
    (6, "successfulJobsHistoryLimit", F::OptInt),
    (7, "failedJobsHistoryLimit", F::OptInt),
    (8, "timeZone", F::Str),
];
const CRON_JOB: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(CRON_JOB_SPEC)),
];
const SCALE: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(&[(1, "replicas", F::Int)])),
];
const SERVICE_PORT: &[(u64, &str, F)] = &[
    (1, "name", F::Str),
    (2, "protocol", F::Str),
    (3, "port", F::Int),
    (4, "targetPort", F::IntOrString),
    (5, "nodePort", F::Int),
    (6, "appProtocol", F::Str),
];
const SERVICE_SPEC: &[(u64, &str, F)] = &[
    (1, "ports", F::RepMsg(SERVICE_PORT)),
    (2, "selector", F::MapStr),
    (3, "clusterIP", F::Str),
    (4, "type", F::Str),
    (5, "externalIPs", F::RepStr),
    (7, "sessionAffinity", F::Str),
    (10, "externalName", F::Str),
    (13, "publishNotReadyAddresses", F::Bool),
    (18, "clusterIPs", F::RepStr),
];
const SERVICE: &[(u64, &str, F)] = &[
    (1, "metadata", F::Msg(OBJECT_META)),
    (2, "spec", F::Msg(SERVICE_SPEC)),
];
const METADATA_ONLY: &[(u64, &str, F)] = &[(1, "metadata", F::Msg(OBJECT_META))];
const TYPE_META: &[(u64, &str, F)] = &[(1, "apiVersion", F::Str), (2, "kind", F::Str)];

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .b
                .get(self.pos)
                .ok_or(ProtoError::Decode("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Decode("varint too long"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = self.varint()? as usize;
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(ProtoError::Decode("truncated field"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    /// Next (field, wire type, raw value); fixed-width values come back as their bytes.
    fn next(&mut self) -> Result<Option<(u64, u64, Field<'a>)>, ProtoError> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wt) = (key >> 3, key & 7);
        let v = match wt {
            0 => Field::Varint(self.varint()?),
            2 => Field::Bytes(self.bytes()?),
            1 | 5 => {
                let n = if wt == 1 { 8 } else { 4 };
                let end = self.pos + n;
                if end > self.b.len() {
                    return Err(ProtoError::Decode("truncated fixed field"));
                }
                self.pos = end;
                Field::Varint(0)
            }
            _ => return Err(ProtoError::Decode("unsupported wire type")),
        };
        Ok(Some((field, wt, v)))
    }
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn string(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ProtoError> {
    let mut r = Reader { b, pos: 0 };
    let (mut k, mut v) = (String::new(), json!(""));
    while let Some((f, _, val)) = r.next()? {
        if let Field::Bytes(x) = val {
            match f {
                1 => k = String::from_utf8_lossy(x).into_owned(),
                2 if bytes_value => v = json!(base64::engine::general_purpose::STANDARD.encode(x)),
                2 => v = string(x),
                _ => {}
            }
        }
    }
    Ok((k, v))
}

fn message(b: &[u8], schema: &[(u64, &str, F)]) -> Result<Value, ProtoError> {
    let mut r = Reader { b, pos: 0 };
    let mut out = Map::new();
    while let Some((field, _, val)) = r.next()? {
        let Some((_, name, kind)) = schema.iter().find(|(f, _, _)| *f == field) else {
            continue;
        };
        let name = (*name).to_owned();
        match (kind, val) {
            (F::Str, Field::Bytes(x)) => {
                if !x.is_empty() {
                    out.insert(name, string(x));
                }
            }
            (F::Int, Field::Varint(v)) => {
                if v != 0 {
                    out.insert(name, json!(v as i64));
                }
            }
            (F::Bool, Field::Varint(v)) => {
                if v != 0 {
                    out.insert(name, json!(true));
                }
            }
            (F::OptInt, Field::Varint(v)) => {
                out.insert(name, json!(v as i64));
            }
            (F::OptBool, Field::Varint(v)) => {
                out.insert(name, json!(v != 0));
            }
            (F::Time, Field::Bytes(x)) => {
                // A zero time is an unset one.
                let t = message(x, &[(1, "s", F::Int)])?;
                if let Some(secs) = t.get("s").and_then(Value::as_i64) {
                    out.insert(name, json!(crate::util::format_rfc3339(secs)));
                }
            }
            (F::Msg(s), Field::Bytes(x)) => {
                out.insert(name, message(x, s)?);
            }
            (F::MapStr | F::MapBytes, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, matches!(kind, F::MapBytes))?;
                crate::util::as_object_mut(out.entry(name).or_insert_with(|| json!({})))
                    .insert(k, v);
            }
            (F::MapQuantity, Field::Bytes(x)) => {
                let (k, v) = map_entry(x, true)?;
                // The value came back base64 of the Quantity message; decode its string.
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or(""))
                    .map_err(|_| ProtoError::Decode("bad quantity"))?;
                let q = message(&raw, &[(1, "s", F::Str)])?;
                crate::util::as_object_mut(out.entry(name).or_insert_with(|| json!({})))
                    .insert(k, q.get("s").cloned().unwrap_or(json!("")));
            }
            (F::IntOrString, Field::Bytes(x)) => {
                let v = message(
                    x,
                    &[
                        (1, "type", F::Int),
                        (2, "intVal", F::Int),
                        (3, "strVal", F::Str),
                    ],
                )?;
                let val = if v["type"].as_i64() == Some(1) {
                    v.get("strVal").cloned().unwrap_or(json!(""))
                } else {
                    v.get("intVal").cloned().unwrap_or(json!(0))
                };
                out.insert(name, val);
            }
            (F::RepStr, Field::Bytes(x)) => {
                if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
                    a.push(string(x));
                }
            }
            (F::RepMsg(s), Field::Bytes(x)) => {
                let m = message(x, s)?;
                if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
                    a.push(m);
                }
            }
            _ => return Err(ProtoError::Decode("unexpected wire type for a known field")),
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a `k8s\0`-enveloped object into its JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ProtoError> {
    let rest = body
        .strip_prefix(b"k8s\0")
        .ok_or(ProtoError::Decode("missing the k8s envelope"))?;
    let mut r = Reader { b: rest, pos: 0 };
    let (mut tm, mut raw) = (json!({}), &[][..]);
    while let Some((f, _, v)) = r.next()? {
        match (f, v) {
            (1, Field::Bytes(x)) => tm = message(x, TYPE_META)?,
            (2, Field::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    let kind = tm["kind"].as_str().unwrap_or("").to_owned();
    let schema = match kind.as_str() {
        "Secret" => SECRET,
        "ConfigMap" => CONFIG_MAP,
        "Namespace" => NAMESPACE,
        "ServiceAccount" => SERVICE_ACCOUNT,
        "DeleteOptions" => DELETE_OPTIONS,
        "TokenRequest" => TOKEN_REQUEST,
        "TokenReview" => TOKEN_REVIEW,
        // The self review's spec is the first two fields of the subject review's.
        "SubjectAccessReview" | "LocalSubjectAccessReview" | "SelfSubjectAccessReview" => {
            SUBJECT_ACCESS_REVIEW
        }
        "SelfSubjectRulesReview" => SELF_SUBJECT_RULES_REVIEW,
        "SelfSubjectReview" => METADATA_ONLY,
        "Role" | "ClusterRole" => ROLE,
        "Deployment" => DEPLOYMENT,
        // A Pod is a pod template's two fields (`kubectl run`).
        "Pod" => POD_TEMPLATE,
        "Job" => JOB,
        "CronJob" => CRON_JOB,
        "Scale" => SCALE,
        "Service" => SERVICE,
        "RoleBinding" | "ClusterRoleBinding" => ROLE_BINDING,
        _ => return Err(ProtoError::UnsupportedKind(kind)),
    };
    let mut obj = message(raw, schema)?;
    obj["apiVersion"] = tm["apiVersion"].clone();
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((n << 3) | 2) as u8, payload.len() as u8];
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_secret() {
        let entry = [field(1, b"k"), field(2, b"v")].concat();
        let meta = [
            field(1, b"s1"),
            field(3, b"ns"),
            field(11, &[field(1, b"owner"), field(2, b"helm")].concat()),
        ]
        .concat();
        let secret = [
            field(1, &meta),
            field(2, &entry),
            field(3, b"helm.sh/release.v1"),
        ]
        .concat();
        let tm = [field(1, b"v1"), field(2, b"Secret")].concat();
        let body = [b"k8s\0".to_vec(), field(1, &tm), field(2, &secret)].concat();
        let v = decode(&body).unwrap();
        assert_eq!(v["metadata"]["name"], "s1");
        assert_eq!(v["metadata"]["labels"]["owner"], "helm");
        assert_eq!(v["data"]["k"], "dg==");
        assert_eq!(v["type"], "helm.sh/release.v1");
        assert_eq!(v["kind"], "Secret");
    }
}
