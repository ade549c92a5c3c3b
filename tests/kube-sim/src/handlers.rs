//! The REST verbs on stored resources: get, list, create, update, patch, apply, delete and
//! delete-collection, with the API server's own rules (resourceVersion preconditions,
//! generation, status subresources, generateName, finalizers, namespace lifecycle).

use crate::Core;
use crate::apply::{self, Shape};
use crate::defaults;
use crate::registry::{Gr, ResourceDef, StatusOnCreate};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::server::{Body, json_response};
use crate::status::{ApiError, ApiResult, Cause, success_status};
use crate::store::{EventType, key};
use crate::table;
use crate::util::*;
use http::Response;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// One request against one resource.
#[derive(Debug)]
pub struct Ctx {
    pub core: Arc<Core>,
    pub def: Arc<ResourceDef>,
    pub ns: String,
    pub all_namespaces: bool,
    pub query: HashMap<String, String>,
    pub accept: String,
    pub content_type: String,
    pub user_agent: String,
    /// Who is asking (after impersonation).
    pub user: crate::auth::UserInfo,
    /// `Warning` headers for the answer (unknown fields under `fieldValidation=Warn`).
    pub warnings: std::sync::Mutex<Vec<String>>,
}

impl Ctx {
    fn gr(&self) -> Gr {
        self.def.gr()
    }
    fn q(&self, k: &str) -> &str {
        self.query.get(k).map(String::as_str).unwrap_or("")
    }
    fn dry_run(&self) -> bool {
        self.q("dryRun") == "All"
    }
    /// The field manager: the query parameter, else the client's program name as the real
    /// server derives it from the User-Agent.
    fn manager(&self) -> String {
        let m = self.q("fieldManager");
        if !m.is_empty() {
            return m.to_owned();
        }
        self.user_agent
            .split('/')
            .next()
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_owned()
    }
    /// Decodes a built-in object as the server does (typed, pruned), recording a warning per
    /// unknown field unless `fieldValidation` says otherwise.
    fn decode_builtin(&self, obj: Value) -> ApiResult<Value> {
        let validation = match self.q("fieldValidation") {
            "" => "Warn",
            v => v,
        };
        if let Some(schema) = &self.def.schema {
            // A custom resource: its schema prunes later; here its unknown fields are reported.
            let unknown = crate::schema::unknown_fields(schema, &obj);
            let unknown = crate::builtin::check_unknown(
                &self.def.kind,
                &self.def.version,
                unknown,
                validation,
            )?;
            self.warn_unknown(unknown);
            return Ok(obj);
        }
        if !self.def.is_builtin() {
            return Ok(obj);
        }
        match crate::builtin::decode(
            &self.def.group,
            &self.def.version,
            &self.def.kind,
            &obj,
            validation,
        )? {
            crate::builtin::Decoded::Untyped => Ok(obj),
            crate::builtin::Decoded::Ok(pruned, unknown) => {
                self.warn_unknown(unknown);
                Ok(pruned)
            }
        }
    }

    /// One `Warning` per unknown field, each once.
    fn warn_unknown(&self, unknown: Vec<String>) {
        let mut w = self
            .warnings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for f in unknown {
            let h = crate::builtin::warning(&f);
            if !w.contains(&h) {
                w.push(h);
            }
        }
    }

    fn shape(&self) -> Shape<'_> {
        Shape {
            builtin: self.def.is_builtin(),
            schema: self.def.schema.as_deref(),
        }
    }
}

/// Seeds what a fresh cluster has: the system namespaces and the `kubernetes` Service.
pub fn seed(core: &Core) {
    let mut st = core.lock();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "uid": new_uid(), "creationTimestamp": now_rfc3339(),
                "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        st.put(&gr("", "namespaces"), obj);
    }
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": new_uid(),
            "creationTimestamp": now_rfc3339(), "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    });
    st.put(&gr("", "services"), svc);
    // The API server keeps the `kubernetes` Service's endpoints itself, a skip-mirror
    // Endpoints and a slice of the same name [k/k: pkg/controlplane/reconcilers
    // endpointsadapter.go]: its own address.
    let addr = core
        .server_addr
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    if let Some((ip, port)) = addr.rsplit_once(':')
        && let Ok(port) = port.parse::<u16>()
    {
        let ports = json!([{"name": "https", "port": port, "protocol": "TCP"}]);
        st.put(
            &gr("", "endpoints"),
            json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default", "uid": new_uid(),
                    "creationTimestamp": now_rfc3339(),
                    "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                "subsets": [{"addresses": [{"ip": ip}], "ports": ports}],
            }),
        );
        st.put(
            &gr("discovery.k8s.io", "endpointslices"),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kubernetes", "namespace": "default", "uid": new_uid(),
                    "creationTimestamp": now_rfc3339(),
                    "labels": {"kubernetes.io/service-name": "kubernetes"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
                "ports": ports,
            }),
        );
    }
    crate::rbac::seed(&mut st);
    crate::auth::publish_extension_authentication(core, &mut st);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"metadata": {"name": ns}});
        crate::auth::publish_root_ca(core, &mut st, "", "namespaces", &obj);
    }
}

pub fn gr(group: &str, resource: &str) -> Gr {
    Gr {
        group: group.into(),
        resource: resource.into(),
    }
}

pub(crate) fn parse_body(body: &[u8], content_type: &str) -> ApiResult<Value> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the body of the request was empty"));
    }
    let v: Value = if content_type.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?
    } else if content_type.contains("protobuf") {
        crate::proto::decode(body).map_err(|e| match e {
            crate::proto::ProtoError::UnsupportedKind(_) => {
                ApiError::unsupported_media_type(content_type)
            }
            other => ApiError::bad_request(other.to_string()),
        })?
    } else if content_type.contains("cbor") {
        return Err(ApiError::unsupported_media_type(content_type));
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        })?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request(format!(
            "couldn't get version/kind; json parse error: expected an object, got {}",
            crate::status::json_type(&v)
        )));
    }
    Ok(v)
}

/// apiVersion/kind of a body must name this resource; missing ones are filled in.
fn check_type(def: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() {
        let text = obj.to_string();
        let short: String = text.chars().take(256).collect();
        return Err(ApiError::bad_request(format!(
            "Object 'Kind' is missing in '{short}'"
        )));
    }
    if !av.is_empty() && av != def.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            def.api_version()
        )));
    }
    if kind != def.kind {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            def.kind
        )));
    }
    obj["apiVersion"] = json!(def.api_version());
    Ok(())
}

/// The object as this version presents it: versions of a CRD share storage, so only the
/// apiVersion changes ("None" conversion).
fn present(def: &ResourceDef, obj: &Arc<Value>) -> Arc<Value> {
    let av = def.api_version();
    if let Some(converted) = crate::events::present(obj, &av) {
        return Arc::new(converted);
    }
    if obj.get("apiVersion").and_then(Value::as_str) == Some(av.as_str()) {
        return obj.clone();
    }
    let mut o = (**obj).clone();
    o["apiVersion"] = json!(av);
    Arc::new(o)
}

fn respond(cx: &Ctx, code: u16, obj: &Value) -> Response<Body> {
    if table::wants_table(&cx.accept) {
        let t = table::table(
            &cx.def,
            &[Arc::new(obj.clone())],
            json!({"resourceVersion": meta_str(obj, "resourceVersion")}),
            cx.q("includeObject"),
        );
        return json_response(code, &t);
    }
    if table::wants_metadata(&cx.accept) {
        return json_response(code, &table::partial_metadata(obj));
    }
    json_response(code, obj)
}

fn scale_of(def: &ResourceDef, obj: &Value) -> ApiResult<Value> {
    let Some(sd) = &def.scale else {
        return Err(ApiError::no_route());
    };
    let spec = table::jsonpath(obj, &sd.spec_replicas)
        .into_iter()
        .next()
        .unwrap_or(json!(0));
    let status = table::jsonpath(obj, &sd.status_replicas)
        .into_iter()
        .next()
        .unwrap_or(json!(0));
    let selector = sd
        .label_selector
        .as_ref()
        .and_then(|p| table::jsonpath(obj, p).into_iter().next())
        .map(|s| match s {
            Value::String(s) => s,
            other => selector_string(&other),
        })
        .unwrap_or_default();
    let m = &obj["metadata"];
    Ok(json!({
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
            "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": spec},
        "status": {"replicas": status, "selector": selector},
    }))
}

fn selector_string(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            parts.push(format!("{k}={}", scalar_string(v)));
        }
    }
    parts.join(",")
}

fn set_path(obj: &mut Value, path: &str, v: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            as_object_mut(cur).insert((*p).to_owned(), v);
            return;
        }
        cur = as_object_mut(cur)
            .entry((*p).to_owned())
            .or_insert_with(|| json!({}));
    }
}

pub fn get(cx: &Ctx, name: &str, sub: &str) -> ApiResult<Response<Body>> {
    let obj = cx
        .core
        .lock()
        .get(&cx.gr(), &key(&cx.ns, name))
        .ok_or_else(|| ApiError::not_found(&cx.def.group, &cx.def.plural, name))?;
    let obj = present(&cx.def, &obj);
    match sub {
        "" | "status" => Ok(respond(cx, 200, &obj)),
        "scale" => Ok(json_response(200, &scale_of(&cx.def, &obj)?)),
        _ => Err(ApiError::no_route()),
    }
}

/// The opaque continue token: the key to resume after, and the list's resourceVersion.
fn encode_continue(rv: u64, after: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": after}).to_string())
}

fn decode_continue(tok: &str) -> ApiResult<(u64, String)> {
    use base64::Engine;
    let bad = || ApiError::bad_request("continue key is not valid: illegal base64 data");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_owned()))
}

pub struct Selection {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// Field selectors name the fields of this version (Events stored in another form).
    pub api_version: String,
}

pub fn selection(cx: &Ctx) -> ApiResult<Selection> {
    Ok(Selection {
        labels: LabelSelector::parse(cx.q("labelSelector"))?,
        fields: FieldSelector::parse(cx.q("fieldSelector"), &cx.def.field_labels)?,
        api_version: cx.def.api_version(),
    })
}

impl Selection {
    pub fn matches(&self, obj: &Value) -> bool {
        if !self.labels.matches(labels_of(obj)) {
            return false;
        }
        if self.fields.is_empty() {
            return true;
        }
        match crate::events::present(obj, &self.api_version) {
            Some(converted) => self.fields.matches(&converted),
            None => self.fields.matches(obj),
        }
    }
}

pub fn list(cx: &Ctx) -> ApiResult<Response<Body>> {
    let sel = selection(cx)?;
    let limit: usize = cx.q("limit").parse().unwrap_or(0);
    let start = match cx.q("continue") {
        "" => None,
        tok => Some(decode_continue(tok)?),
    };
    let prefix = if cx.all_namespaces || !cx.def.namespaced {
        String::new()
    } else {
        format!("{}/", cx.ns)
    };
    let (items, rv, next, remaining) = {
        let st = cx.core.lock();
        // Every page of a paged list reports the first page's resourceVersion, so a watch
        // started from it replays whatever changed while the pages were read.
        let rv = match &start {
            Some((rv, _)) => {
                let floor = st.tables.get(&cx.gr()).map_or(0, |t| t.floor);
                if *rv < floor {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                *rv
            }
            None => st.rv,
        };
        let mut items: Vec<Arc<Value>> = Vec::new();
        let mut next = None;
        let mut remaining = 0usize;
        if let Some(t) = st.tables.get(&cx.gr()) {
            use std::ops::Bound;
            let lower = match &start {
                Some((_, s)) => Bound::Excluded(s.clone()),
                None => Bound::Included(prefix.clone()),
            };
            for (k, obj) in t.objects.range((lower, Bound::Unbounded)) {
                if !k.starts_with(&prefix) {
                    break;
                }
                if !sel.matches(obj) {
                    continue;
                }
                if limit > 0 && items.len() == limit {
                    if next.is_none() {
                        next = items.last().map(|o| key_of_obj(o));
                    }
                    remaining += 1;
                    continue;
                }
                items.push(obj.clone());
            }
        }
        (items, rv, next, remaining)
    };
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(n) = &next {
        meta["continue"] = json!(encode_continue(rv, n));
        if sel.labels.is_empty() && sel.fields.is_empty() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    if table::wants_table(&cx.accept) {
        let t = table::table(&cx.def, &items, meta, cx.q("includeObject"));
        return Ok(json_response(200, &t));
    }
    let metadata_only = table::wants_metadata(&cx.accept);
    // Written by hand so thousands of stored objects are serialized without being copied.
    let mut out = Vec::with_capacity(items.len() * 512 + 256);
    let (kind, av) = if metadata_only {
        (
            "PartialObjectMetadataList".to_owned(),
            "meta.k8s.io/v1".to_owned(),
        )
    } else {
        (cx.def.list_kind(), cx.def.api_version())
    };
    out.extend_from_slice(
        format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
            json!(kind),
            json!(av),
            meta
        )
        .as_bytes(),
    );
    for (i, obj) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let obj = present(&cx.def, obj);
        let r = if metadata_only {
            serde_json::to_writer(&mut out, &table::partial_metadata(&obj))
        } else {
            serde_json::to_writer(&mut out, &*obj)
        };
        if let Err(e) = r {
            return Err(ApiError::internal(format!("failed to encode a list: {e}")));
        }
    }
    out.extend_from_slice(b"]}");
    let mut r = Response::new(crate::server::full(out));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn key_of_obj(o: &Value) -> String {
    key(namespace_of(o), name_of(o))
}

/// NamespaceLifecycle: content goes only into namespaces that exist and are not terminating.
fn check_namespace(core: &Core, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<()> {
    if !def.namespaced {
        return Ok(());
    }
    let st = core.lock();
    match st.get(&gr("", "namespaces"), &key("", ns)) {
        None => Err(ApiError::not_found("", "namespaces", ns)),
        Some(n) if is_deleting(&n) => {
            let mut e = ApiError::forbidden(format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                crate::status::qualified(&def.group, &def.plural)
            ));
            e.details = Some(json!({"name": name, "kind": def.plural, "group": def.group,
                "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}));
            Err(e)
        }
        Some(_) => Ok(()),
    }
}

fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid(&def.group, &def.kind, name, causes)
}

/// Schema, defaults and kind checks shared by create and update.
fn admit_shape(
    def: &ResourceDef,
    obj: &mut Value,
    old: Option<&Value>,
    creating: bool,
) -> ApiResult<()> {
    defaults::apply_defaults(def, obj, creating);
    let mut causes = defaults::validate_meta(def, obj);
    if let Some(schema) = &def.schema {
        causes.extend(crate::schema::apply(schema, obj, old));
    }
    causes.extend(defaults::validate_kind(def, obj));
    if let Some(old) = old {
        causes.extend(defaults::validate_update(def, obj, old));
    }
    if creating && crate::events::is_events_v1(def) {
        causes.extend(crate::events::validate_create(obj));
    }
    if def.crd.is_none() && def.group == "apiextensions.k8s.io" {
        causes.extend(crate::gc::validate_crd(obj));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(def, name_of(obj), causes))
    }
}

/// Builds a new object for create from a request body (or an applied configuration).
/// `applied`: the object comes from server-side apply, whose managedFields it keeps.
fn prepare_create(cx: &Ctx, mut obj: Value, applied: bool) -> ApiResult<Value> {
    check_type(&cx.def, &mut obj)?;
    let body_ns = namespace_of(&obj).to_owned();
    if cx.def.namespaced {
        if body_ns.is_empty() {
            meta_mut(&mut obj).insert("namespace".into(), json!(cx.ns));
        } else if body_ns != cx.ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    } else {
        meta_mut(&mut obj).remove("namespace");
    }
    if name_of(&obj).is_empty() {
        let gen_name = meta_str(&obj, "generateName").to_owned();
        if !gen_name.is_empty() {
            let base: String = gen_name.chars().take(58).collect();
            meta_mut(&mut obj).insert("name".into(), json!(format!("{base}{}", name_suffix())));
        }
    }
    let m = meta_mut(&mut obj);
    for k in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        m.remove(k);
    }
    if !applied {
        m.remove("managedFields");
    }
    m.insert("uid".into(), json!(new_uid()));
    m.insert("creationTimestamp".into(), json!(now_rfc3339()));
    m.insert("generation".into(), json!(1));
    if cx.def.status {
        match &cx.def.status_on_create {
            StatusOnCreate::Keep => {}
            StatusOnCreate::Drop => {
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
            }
            StatusOnCreate::Set(v) => obj["status"] = v.clone(),
        }
    }
    crate::gc::on_create(&cx.def, &mut obj);
    let mut obj = cx.decode_builtin(obj)?;
    if cx.def.is_builtin() && cx.def.group.is_empty() && cx.def.plural == "pods" {
        crate::auth::admit_service_account(&cx.core, &cx.ns, &mut obj);
    }
    admit_shape(&cx.def, &mut obj, None, true)?;
    Ok(obj)
}

/// Records the request's field manager in `managedFields`, as every write does.
fn record_manager(cx: &Ctx, old: Option<&Value>, obj: &mut Value, subresource: &str) {
    apply::record_update(
        old,
        obj,
        &cx.manager(),
        &cx.def.api_version(),
        subresource,
        cx.shape(),
        cx.def.status,
    );
}

pub async fn create(cx: &Ctx, body: &[u8]) -> ApiResult<Response<Body>> {
    let obj = parse_body(body, &cx.content_type)?;
    let mut obj = prepare_create(cx, obj, false)?;
    record_manager(cx, None, &mut obj, "");
    let stored = commit_create(cx, obj).await?;
    Ok(respond(cx, 201, &stored))
}

async fn commit_create(cx: &Ctx, obj: Value) -> ApiResult<Value> {
    let name = name_of(&obj).to_owned();
    check_namespace(&cx.core, &cx.def, &cx.ns, &name)?;
    let mut obj = crate::admission::admit(cx, "CREATE", "", Some(obj), None)
        .await?
        .unwrap_or_default();
    if cx.dry_run() {
        return Ok(obj);
    }
    let mut st = cx.core.lock();
    let k = key(&cx.ns, &name);
    if st.get(&cx.gr(), &k).is_some() {
        return Err(ApiError::already_exists(
            &cx.def.group,
            &cx.def.plural,
            &name,
        ));
    }
    meta_mut(&mut obj).insert("namespace".into(), json!(cx.ns));
    if !cx.def.namespaced {
        meta_mut(&mut obj).remove("namespace");
    }
    let obj = crate::events::to_storage(&cx.def, obj);
    let (stored, _) = st.put(&cx.gr(), obj);
    crate::gc::after_write(&cx.core, &mut st, &cx.def, &stored);
    drop(st);
    // Only objects with owners can need the collector on create (their owner may be gone).
    if stored.pointer("/metadata/ownerReferences").is_some() {
        cx.core
            .collect_created(cx.gr(), crate::store::key_of(&stored));
    }
    Ok((*present(&cx.def, &stored)).clone())
}

/// Whether anything but metadata (and status, when it is a subresource) differs.
fn spec_changed(old: &Value, new: &Value, skip_status: bool) -> bool {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    let relevant = |k: &str| k != "metadata" && !(skip_status && k == "status");
    o.iter()
        .filter(|(k, _)| relevant(k))
        .any(|(k, v)| n.get(k) != Some(v))
        || n.iter()
            .filter(|(k, _)| relevant(k))
            .any(|(k, _)| !o.contains_key(k))
}

fn strip_volatile(v: &Value) -> Value {
    let mut v = v.clone();
    let m = meta_mut(&mut v);
    m.remove("resourceVersion");
    if let Some(Value::Array(mf)) = m.get_mut("managedFields") {
        for e in mf {
            if let Some(e) = e.as_object_mut() {
                e.remove("time");
            }
        }
    }
    v
}

/// Turns a requested new state into the object to store; `None` when nothing changes.
fn prepare_update(
    cx: &Ctx,
    old: &Value,
    mut new: Value,
    sub: &str,
    applied: bool,
) -> ApiResult<Option<Value>> {
    check_type(&cx.def, &mut new)?;
    let url_name = name_of(old).to_owned();
    let body_name = name_of(&new).to_owned();
    if !body_name.is_empty() && body_name != url_name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
        )));
    }
    let body_ns = namespace_of(&new).to_owned();
    if cx.def.namespaced && !body_ns.is_empty() && body_ns != cx.ns {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let body_rv = meta_str(&new, "resourceVersion").to_owned();
    if body_rv.is_empty() && !applied && !cx.def.allows_unconditional_update() {
        // The strategy of these kinds refuses updates that do not say what they replace.
        return Err(ApiError::invalid(
            &cx.def.group,
            &cx.def.plural,
            &url_name,
            vec![Cause::invalid_printed(
                "metadata.resourceVersion",
                "0x0",
                "must be specified for an update",
            )],
        ));
    }
    if !body_rv.is_empty() && body_rv != meta_str(old, "resourceVersion") {
        return Err(ApiError::stale(&cx.def.group, &cx.def.plural, &url_name));
    }
    let body_uid = meta_str(&new, "uid").to_owned();
    if !body_uid.is_empty() && body_uid != uid_of(old) {
        return Err(ApiError::conflict(
            &cx.def.group,
            &cx.def.plural,
            &url_name,
            &format!(
                "Precondition failed: UID in precondition: {body_uid}, UID in object meta: {}",
                uid_of(old)
            ),
        ));
    }
    let mut result = match sub {
        "status" => {
            // A status write changes status only; metadata and spec stay as stored.
            let mut r = old.clone();
            match new.get("status") {
                Some(s) => r["status"] = s.clone(),
                None => {
                    if let Some(m) = r.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if applied && let Some(mf) = new.pointer("/metadata/managedFields") {
                meta_mut(&mut r).insert("managedFields".into(), mf.clone());
            }
            r
        }
        _ => {
            if cx.def.status {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            new
        }
    };
    // Identity and lifecycle fields belong to the server.
    {
        let om = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
        let m = meta_mut(&mut result);
        m.insert("name".into(), json!(url_name));
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "namespace",
        ] {
            match om.get(k) {
                Some(v) => m.insert(k.into(), v.clone()),
                None => m.remove(k),
            };
        }
        m.remove("selfLink");
        if !applied && sub != "status" {
            // Clients echo managedFields back; the server keeps its own record.
            match om.get("managedFields") {
                Some(v) => m.insert("managedFields".into(), v.clone()),
                None => m.remove("managedFields"),
            };
        }
    }
    if cx.def.group.is_empty() && cx.def.plural == "namespaces" && sub != "finalize" {
        // Namespace spec.finalizers change only through /finalize.
        match old.get("spec") {
            Some(s) => result["spec"] = s.clone(),
            None => {
                if let Some(m) = result.as_object_mut() {
                    m.remove("spec");
                }
            }
        }
    }
    if is_deleting(old) {
        let before = finalizers_of(old);
        let added: Vec<String> = finalizers_of(&result)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            return Err(invalid(
                &cx.def,
                &url_name,
                vec![Cause::forbidden(
                    "metadata.finalizers",
                    &format!(
                        "no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
                    ),
                )],
            ));
        }
    }
    let mut result = cx.decode_builtin(result)?;
    admit_shape(&cx.def, &mut result, Some(old), false)?;
    let skip_status = cx.def.status;
    if spec_changed(old, &result, skip_status) {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta_mut(&mut result).insert("generation".into(), json!(g + 1));
    }
    if !applied {
        record_manager(
            cx,
            Some(old),
            &mut result,
            if sub == "status" { "status" } else { "" },
        );
    }
    if strip_volatile(old) == strip_volatile(&result) {
        return Ok(None);
    }
    Ok(Some(result))
}

/// The read-modify-write loop of every update: `make` builds the new state from the stored
/// object (or from nothing, for apply-creates); a concurrent write makes it run again.
async fn modify(
    cx: &Ctx,
    name: &str,
    sub: &str,
    applied: bool,
    make: &(dyn Fn(Option<&Value>) -> ApiResult<Option<Value>> + Sync),
) -> ApiResult<Response<Body>> {
    let k = key(&cx.ns, name);
    for _ in 0..16 {
        let old = cx.core.lock().get(&cx.gr(), &k);
        let Some(old) = old else {
            return match make(None)? {
                Some(new) => {
                    let mut obj = prepare_create(cx, new, applied)?;
                    if !applied {
                        record_manager(cx, None, &mut obj, "");
                    }
                    let stored = commit_create(cx, obj).await?;
                    Ok(respond(cx, 201, &stored))
                }
                None => Err(ApiError::not_found(&cx.def.group, &cx.def.plural, name)),
            };
        };
        let old_view = present(&cx.def, &old);
        let Some(new) = make(Some(&old_view))? else {
            return Err(ApiError::not_found(&cx.def.group, &cx.def.plural, name));
        };
        let Some(new) = prepare_update(cx, &old_view, new, sub, applied)? else {
            return Ok(respond(cx, 200, &old_view));
        };
        let new = crate::admission::admit(cx, "UPDATE", sub, Some(new), Some(&old_view))
            .await?
            .unwrap_or_default();
        if cx.dry_run() {
            return Ok(respond(cx, 200, &new));
        }
        let mut st = cx.core.lock();
        let current = st.get(&cx.gr(), &k);
        if current.as_ref().map(|c| meta_str(c, "resourceVersion"))
            != Some(meta_str(&old, "resourceVersion"))
        {
            continue;
        }
        let (stored, typ) = st.put(&cx.gr(), crate::events::to_storage(&cx.def, new));
        crate::gc::after_write(&cx.core, &mut st, &cx.def, &stored);
        drop(st);
        if typ == EventType::Deleted || is_deleting(&stored) {
            cx.core.collect_all();
        }
        return Ok(respond(cx, 200, &present(&cx.def, &stored)));
    }
    Err(ApiError::stale(&cx.def.group, &cx.def.plural, name))
}

/// `POST pods/<name>/binding`, as the API server's BindingREST serves the scheduler: the pod
/// is assigned to the Binding's node once (a pod already on a node, being deleted, or whose
/// UID differs from the Binding's is a Conflict), and its `PodScheduled` condition becomes
/// True. The answer is a Status of Success.
pub async fn bind_pod(cx: &Ctx, name: &str, body: &[u8]) -> ApiResult<Response<Body>> {
    let binding = parse_body(body, &cx.content_type)?;
    let text = |p: &str| {
        binding
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (node, kind, uid) = (
        text("/target/name"),
        text("/target/kind"),
        text("/metadata/uid"),
    );
    if node.is_empty() || !(kind.is_empty() || kind == "Node") {
        return Err(ApiError::invalid(
            "",
            "Binding",
            name,
            vec![Cause::invalid(
                "target",
                binding.get("target").unwrap_or(&Value::Null),
                "must name a Node",
            )],
        ));
    }
    let conflict = |why: String| ApiError::conflict("", "pods/binding", name, &why);
    let assign = |old: Option<&Value>| -> ApiResult<Option<Value>> {
        let Some(old) = old else { return Ok(None) };
        if !uid.is_empty() && meta_str(old, "uid") != uid {
            return Err(conflict(format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(old, "uid")
            )));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(conflict(format!(
                "pod {name} is being deleted, cannot be assigned to a host"
            )));
        }
        let current = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !current.is_empty() {
            return Err(conflict(format!(
                "pod {name} is already assigned to node \"{current}\""
            )));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        Ok(Some(new))
    };
    modify(cx, name, "", false, &assign).await?;
    let scheduled = |old: Option<&Value>| -> ApiResult<Option<Value>> {
        let Some(old) = old else { return Ok(None) };
        let mut new = old.clone();
        let mut conditions: Vec<Value> = new
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        conditions.retain(|c| c["type"] != "PodScheduled");
        conditions.push(json!({
            "type": "PodScheduled",
            "status": "True",
            "lastProbeTime": null,
            "lastTransitionTime": crate::util::now_rfc3339(),
        }));
        if !new["status"].is_object() {
            new["status"] = json!({});
        }
        new["status"]["conditions"] = json!(conditions);
        Ok(Some(new))
    };
    modify(cx, name, "status", false, &scheduled).await?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}

pub async fn update(cx: &Ctx, name: &str, sub: &str, body: &[u8]) -> ApiResult<Response<Body>> {
    let body = parse_body(body, &cx.content_type)?;
    match sub {
        "" | "status" => {}
        "scale" => return update_scale(cx, name, &|_| Ok(body.clone())).await,
        "finalize" if cx.def.plural == "namespaces" => {}
        _ => return Err(ApiError::no_route()),
    }
    modify(cx, name, sub, false, &|old| Ok(old.map(|_| body.clone()))).await
}

async fn update_scale(
    cx: &Ctx,
    name: &str,
    new_scale: &(dyn Fn(&Value) -> ApiResult<Value> + Sync),
) -> ApiResult<Response<Body>> {
    let Some(sd) = cx.def.scale.clone() else {
        return Err(ApiError::no_route());
    };
    let make = |old: Option<&Value>| -> ApiResult<Option<Value>> {
        let Some(old) = old else { return Ok(None) };
        let scale = new_scale(&scale_of(&cx.def, old)?)?;
        let rv = meta_str(&scale, "resourceVersion");
        if !rv.is_empty() && rv != meta_str(old, "resourceVersion") {
            return Err(ApiError::stale(&cx.def.group, &cx.def.plural, name));
        }
        let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
        if !replicas.is_i64() || replicas.as_i64().is_some_and(|r| r < 0) {
            return Err(ApiError::invalid(
                "autoscaling",
                "Scale",
                name,
                vec![Cause::invalid(
                    "spec.replicas",
                    &replicas,
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let mut new = old.clone();
        set_path(&mut new, &sd.spec_replicas, replicas);
        meta_mut(&mut new).remove("resourceVersion");
        Ok(Some(new))
    };
    let resp = modify(cx, name, "", false, &make).await?;
    // The answer to a scale write is the Scale, not the object.
    let obj = cx
        .core
        .lock()
        .get(&cx.gr(), &key(&cx.ns, name))
        .ok_or_else(|| ApiError::not_found(&cx.def.group, &cx.def.plural, name))?;
    let _ = resp;
    Ok(json_response(200, &scale_of(&cx.def, &obj)?))
}

pub async fn patch(cx: &Ctx, name: &str, sub: &str, body: &[u8]) -> ApiResult<Response<Body>> {
    let ct = cx
        .content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    if !matches!(sub, "" | "status" | "scale") {
        return Err(ApiError::no_route());
    }
    let apply_patch = |old: &Value| -> ApiResult<Value> {
        match ct.as_str() {
            "application/json-patch+json" => crate::patch::json_patch(old, body),
            "application/merge-patch+json" => crate::patch::merge_patch(old, body),
            "application/strategic-merge-patch+json" if cx.def.is_builtin() || sub == "scale" => {
                crate::patch::strategic_merge_patch(old, body)
            }
            other => Err(ApiError::unsupported_media_type(other)),
        }
    };
    if ct == "application/apply-patch+yaml" || ct == "application/apply-patch+cbor" {
        return server_side_apply(cx, name, sub, body).await;
    }
    if sub == "scale" {
        return update_scale(cx, name, &apply_patch).await;
    }
    modify(cx, name, sub, false, &|old| match old {
        Some(o) => apply_patch(o).map(Some),
        None => Ok(None),
    })
    .await
}

async fn server_side_apply(
    cx: &Ctx,
    name: &str,
    sub: &str,
    body: &[u8],
) -> ApiResult<Response<Body>> {
    let applied = parse_body(body, "application/yaml")?;
    let manager = cx.q("fieldManager").to_owned();
    if manager.is_empty() {
        return Err(ApiError::bad_request(
            "PATCH, application/apply-patch+yaml requires fieldManager to be set",
        ));
    }
    let force = cx.q("force") == "true";
    if !name_of(&applied).is_empty() && name_of(&applied) != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            name_of(&applied)
        )));
    }
    modify(cx, name, sub, true, &|old| {
        let mut base = old.cloned();
        if let Some(b) = &mut base {
            // The applied configuration carries no resourceVersion precondition unless set.
            meta_mut(b).remove("resourceVersion");
        }
        let mut merged = apply::server_side_apply(
            base.as_ref(),
            &applied,
            &manager,
            force,
            sub,
            cx.shape(),
            cx.def.status,
        )?;
        if old.is_none() {
            meta_mut(&mut merged).insert("name".into(), json!(name));
        }
        if let Some(rv) = applied.pointer("/metadata/resourceVersion") {
            meta_mut(&mut merged).insert("resourceVersion".into(), rv.clone());
        }
        Ok(Some(merged))
    })
    .await
}

#[derive(Debug, Default)]
struct DeleteOptions {
    propagation: Option<String>,
    uid: Option<String>,
    rv: Option<String>,
}

fn delete_options(cx: &Ctx, body: &[u8]) -> ApiResult<DeleteOptions> {
    let mut o = DeleteOptions::default();
    if !body.is_empty() {
        let v: Value = if cx.content_type.contains("protobuf") {
            crate::proto::decode(body).map_err(|e| ApiError::bad_request(e.to_string()))?
        } else {
            serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
            })?
        };
        o.propagation = v
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if o.propagation.is_none() {
            match v.get("orphanDependents").and_then(Value::as_bool) {
                Some(true) => o.propagation = Some("Orphan".into()),
                Some(false) => o.propagation = Some("Background".into()),
                None => {}
            }
        }
        o.uid = v
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        o.rv = v
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    if let Some(p) = cx.query.get("propagationPolicy") {
        o.propagation = Some(p.clone());
    }
    if let Some(p) = &o.propagation
        && !matches!(p.as_str(), "Orphan" | "Background" | "Foreground")
    {
        return Err(ApiError::invalid(
            "",
            "DeleteOptions",
            "",
            vec![Cause::not_supported(
                "propagationPolicy",
                &json!(p),
                &[json!("Foreground"), json!("Background"), json!("Orphan")],
            )],
        ));
    }
    Ok(o)
}

pub async fn delete(cx: &Ctx, name: &str, body: &[u8]) -> ApiResult<Response<Body>> {
    let opts = delete_options(cx, body)?;
    let (code, v) = delete_one(cx, name, &opts).await?;
    Ok(json_response(code, &v))
}

async fn delete_one(cx: &Ctx, name: &str, opts: &DeleteOptions) -> ApiResult<(u16, Value)> {
    let k = key(&cx.ns, name);
    let old = cx
        .core
        .lock()
        .get(&cx.gr(), &k)
        .ok_or_else(|| ApiError::not_found(&cx.def.group, &cx.def.plural, name))?;
    if let Some(uid) = &opts.uid
        && uid != uid_of(&old)
    {
        return Err(ApiError::conflict(
            &cx.def.group,
            &cx.def.plural,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                uid_of(&old)
            ),
        ));
    }
    if let Some(rv) = &opts.rv
        && rv != meta_str(&old, "resourceVersion")
    {
        return Err(ApiError::conflict(
            &cx.def.group,
            &cx.def.plural,
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta_str(&old, "resourceVersion")
            ),
        ));
    }
    crate::admission::admit(cx, "DELETE", "", None, Some(&old)).await?;
    if cx.dry_run() {
        return Ok((200, (*old).clone()));
    }
    let mut st = cx.core.lock();
    let Some(cur) = st.get(&cx.gr(), &k) else {
        return Err(ApiError::not_found(&cx.def.group, &cx.def.plural, name));
    };
    let policy = opts
        .propagation
        .clone()
        .unwrap_or_else(|| "Background".into());
    let policy_finalizer = match policy.as_str() {
        "Foreground" => Some("foregroundDeletion"),
        "Orphan" => Some("orphan"),
        _ => None,
    };
    let mut fins = finalizers_of(&cur);
    let is_ns = cx.def.group.is_empty() && cx.def.plural == "namespaces";
    let graceful = !fins.is_empty() || policy_finalizer.is_some() || is_ns;
    let result = if graceful {
        let mut obj = (*cur).clone();
        if let Some(f) = policy_finalizer
            && !fins.iter().any(|x| x == f)
        {
            fins.push(f.to_owned());
            meta_mut(&mut obj).insert("finalizers".into(), json!(fins));
        }
        if !is_deleting(&obj) {
            let m = meta_mut(&mut obj);
            m.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if is_ns {
                obj["status"] = json!({"phase": "Terminating"});
            }
        } else if obj == *cur {
            return Ok((200, (*present(&cx.def, &cur)).clone()));
        }
        let (stored, _) = st.put(&cx.gr(), obj);
        crate::gc::after_write(&cx.core, &mut st, &cx.def, &stored);
        let code = if policy_finalizer == Some("foregroundDeletion") {
            202
        } else {
            200
        };
        (code, (*present(&cx.def, &stored)).clone())
    } else {
        let gone = st.remove_with(&cx.gr(), &k, None);
        crate::gc::after_write(&cx.core, &mut st, &cx.def, &gone);
        // Custom resources and pods answer with the object, most built-ins with a Status.
        if cx.def.crd.is_some() || matches!(cx.def.plural.as_str(), "pods" | "services") {
            (200, (*present(&cx.def, &gone)).clone())
        } else {
            (
                200,
                success_status(&cx.def.group, &cx.def.plural, name, uid_of(&gone)),
            )
        }
    };
    drop(st);
    cx.core.collect_all();
    Ok(result)
}

pub async fn delete_collection(cx: &Ctx, body: &[u8]) -> ApiResult<Response<Body>> {
    let opts = delete_options(cx, body)?;
    let sel = selection(cx)?;
    let names: Vec<(String, String)> = {
        let st = cx.core.lock();
        st.tables
            .get(&cx.gr())
            .map(|t| {
                t.objects
                    .values()
                    .filter(|o| cx.all_namespaces || !cx.def.namespaced || namespace_of(o) == cx.ns)
                    .filter(|o| sel.matches(o))
                    .map(|o| (namespace_of(o).to_owned(), name_of(o).to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut items = Vec::new();
    for (ns, name) in names {
        let sub = Ctx {
            core: cx.core.clone(),
            def: cx.def.clone(),
            ns,
            all_namespaces: false,
            query: cx.query.clone(),
            accept: cx.accept.clone(),
            content_type: cx.content_type.clone(),
            user_agent: cx.user_agent.clone(),
            user: cx.user.clone(),
            warnings: Default::default(),
        };
        match delete_one(&sub, &name, &opts).await {
            Ok((_, v)) => items.push(v),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let rv = cx.core.lock().rv;
    Ok(json_response(
        200,
        &json!({
            "kind": cx.def.list_kind(), "apiVersion": cx.def.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}, "items": items,
        }),
    ))
}
