//! Which resources the server serves: the built-in kinds it stores and the ones custom resource
//! definitions add. Discovery, routing and storage all read this one table.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A printer column as CRDs declare them (`additionalPrinterColumns`); built-ins use the same
/// shape so one table converter serves both.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

impl Column {
    /// The column the real server prints when a resource declares none of its own.
    pub fn age() -> Column {
        Column {
            name: "Age".into(),
            type_: "date".into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: ".metadata.creationTimestamp".into(),
        }
    }
}

/// Where a scale subresource reads and writes replicas.
#[derive(Debug, Clone)]
pub struct ScaleDef {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// What happens to `.status` on create.
#[derive(Debug, Clone)]
pub enum StatusOnCreate {
    Keep,
    Drop,
    Set(Value),
}

#[derive(Debug, Clone)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status: bool,
    pub scale: Option<ScaleDef>,
    pub columns: Vec<Column>,
    /// The structural schema of a custom resource version.
    pub schema: Option<Arc<Value>>,
    /// The CRD that defines it, if any.
    pub crd: Option<String>,
    /// Field selectors besides metadata.name/namespace.
    pub field_labels: Vec<String>,
    pub status_on_create: StatusOnCreate,
    /// The version objects are stored in (custom resources: the CRD's storage version).
    pub storage_version: bool,
    /// Served by an aggregated API server, not stored here.
    pub aggregated: bool,
    /// A review kind: only `create`, answered and never stored.
    pub create_only: bool,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Storage key: all versions of a group/resource share one store, and events.k8s.io
    /// Events are the core Events.
    pub fn gr(&self) -> Gr {
        if crate::events::is_events_v1(self) {
            return Gr {
                group: String::new(),
                resource: "events".into(),
            };
        }
        Gr {
            group: self.group.clone(),
            resource: self.plural.clone(),
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        if self.create_only {
            return vec!["create"];
        }
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    /// Namespaces, services and a few others must be DNS-1123 labels, most other kinds DNS
    /// subdomains.
    pub fn name_is_label(&self) -> bool {
        self.group.is_empty() && matches!(self.plural.as_str(), "namespaces" | "services")
    }

    /// Whether a PUT without a resourceVersion may replace the object (Leases: no).
    pub fn allows_unconditional_update(&self) -> bool {
        !(self.crd.is_none() && self.group == "coordination.k8s.io" && self.plural == "leases")
    }

    /// Strategic merge patch applies to built-ins only, as in the real server.
    pub fn is_builtin(&self) -> bool {
        self.crd.is_none() && !self.aggregated
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gr {
    pub group: String,
    pub resource: String,
}

/// All served resources, by group/version/plural.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    pub defs: BTreeMap<(String, String, String), Arc<ResourceDef>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        for d in builtins() {
            r.insert(d);
        }
        r
    }

    pub fn insert(&mut self, d: ResourceDef) {
        self.defs.insert(
            (d.group.clone(), d.version.clone(), d.plural.clone()),
            Arc::new(d),
        );
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .get(&(group.to_owned(), version.to_owned(), plural.to_owned()))
            .cloned()
    }

    /// The definition objects of this group/resource are stored as.
    pub fn storage_def(&self, gr: &Gr) -> Option<Arc<ResourceDef>> {
        let mut fallback = None;
        for d in self.defs.values() {
            if d.group == gr.group && d.plural == gr.resource {
                if d.storage_version {
                    return Some(d.clone());
                }
                fallback = Some(d.clone());
            }
        }
        fallback
    }

    pub fn remove_crd(&mut self, crd: &str) {
        self.defs.retain(|_, d| d.crd.as_deref() != Some(crd));
    }

    /// Groups in the order discovery lists them: the legacy group first, then built-in groups,
    /// then the rest alphabetically.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in self.defs.values() {
            let vs = groups.entry(d.group.clone()).or_default();
            if !vs.contains(&d.version) {
                vs.push(d.version.clone());
            }
        }
        for vs in groups.values_mut() {
            vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        groups.into_iter().collect()
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        self.defs
            .values()
            .filter(|d| d.group == group && d.version == version)
            .cloned()
            .collect()
    }
}

/// Kubernetes version ordering: GA > beta > alpha, higher numbers first.
pub fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major: u32 = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (level, num) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    (level, major, num.parse().unwrap_or(0))
}

fn col(name: &str, type_: &str, path: &str, priority: i64) -> Column {
    Column {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: path.into(),
    }
}

struct B {
    d: ResourceDef,
}

impl B {
    fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        let singular = kind.to_lowercase();
        B {
            d: ResourceDef {
                group: group.into(),
                version: version.into(),
                plural: plural.into(),
                singular,
                kind: kind.into(),
                namespaced,
                short_names: vec![],
                categories: vec![],
                status: false,
                scale: None,
                columns: vec![],
                schema: None,
                crd: None,
                field_labels: vec![],
                status_on_create: StatusOnCreate::Keep,
                storage_version: true,
                aggregated: false,
                create_only: false,
            },
        }
    }
    fn short(mut self, s: &[&str]) -> Self {
        self.d.short_names = s.iter().map(|s| s.to_string()).collect();
        self
    }
    fn all(mut self) -> Self {
        self.d.categories = vec!["all".into()];
        self
    }
    fn status(mut self, on_create: StatusOnCreate) -> Self {
        self.d.status = true;
        self.d.status_on_create = on_create;
        self
    }
    fn scale(mut self) -> Self {
        self.d.scale = Some(ScaleDef {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            label_selector: Some(".spec.selector".into()),
        });
        self
    }
    fn cols(mut self, c: Vec<Column>) -> Self {
        self.d.columns = c;
        self
    }
    fn create_only(mut self) -> Self {
        self.d.create_only = true;
        self
    }
    fn fields(mut self, f: &[&str]) -> Self {
        self.d.field_labels = f.iter().map(|s| s.to_string()).collect();
        self
    }
}

fn age() -> Column {
    col("Age", "date", ".metadata.creationTimestamp", 0)
}

/// The built-in kinds the operator and its tests use. Storing them is all the server does; the
/// controllers that would act on them do not exist here.
fn builtins() -> Vec<ResourceDef> {
    use StatusOnCreate::*;
    let v = vec![
        B::new("", "v1", "namespaces", "Namespace", false)
            .short(&["ns"])
            .status(Set(json!({"phase": "Active"})))
            .cols(vec![col("Status", "string", ".status.phase", 0), age()])
            .fields(&["status.phase"]),
        B::new("", "v1", "nodes", "Node", false)
            .short(&["no"])
            .status(Keep)
            .fields(&["spec.unschedulable"]),
        B::new("", "v1", "pods", "Pod", true)
            .short(&["po"])
            .all()
            .status(Set(json!({"phase": "Pending", "qosClass": "BestEffort"})))
            .cols(vec![
                col("Ready", "string", "", 0),
                col("Status", "string", ".status.phase", 0),
                col("Restarts", "string", "", 0),
                age(),
                col("IP", "string", ".status.podIP", 1),
                col("Node", "string", ".spec.nodeName", 1),
            ])
            .fields(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]),
        B::new("", "v1", "secrets", "Secret", true)
            .cols(vec![
                col("Type", "string", ".type", 0),
                col("Data", "string", "", 0),
                age(),
            ])
            .fields(&["type"]),
        B::new("", "v1", "configmaps", "ConfigMap", true)
            .short(&["cm"])
            .cols(vec![col("Data", "string", "", 0), age()]),
        B::new("", "v1", "serviceaccounts", "ServiceAccount", true)
            .short(&["sa"])
            .cols(vec![age()]),
        B::new("", "v1", "services", "Service", true)
            .short(&["svc"])
            .all()
            .status(Drop)
            .cols(vec![
                col("Type", "string", ".spec.type", 0),
                col("Cluster-IP", "string", ".spec.clusterIP", 0),
                col("External-IP", "string", "", 0),
                col("Port(s)", "string", "", 0),
                age(),
            ]),
        B::new("", "v1", "endpoints", "Endpoints", true)
            .short(&["ep"])
            .cols(vec![col("Endpoints", "string", "", 0), age()]),
        B::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        )
        .cols(vec![
            col("AddressType", "string", ".addressType", 0),
            col("Ports", "string", "", 0),
            col("Endpoints", "string", "", 0),
            age(),
        ]),
        B::new("", "v1", "persistentvolumes", "PersistentVolume", false)
            .short(&["pv"])
            .status(Set(json!({"phase": "Pending"})))
            .cols(vec![
                col("Capacity", "string", ".spec.capacity.storage", 0),
                col("Status", "string", ".status.phase", 0),
                age(),
            ]),
        B::new(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
        )
        .short(&["pvc"])
        .status(Set(json!({"phase": "Pending"})))
        .cols(vec![
            col("Status", "string", ".status.phase", 0),
            col("Volume", "string", ".spec.volumeName", 0),
            col("Capacity", "string", ".status.capacity.storage", 0),
            age(),
        ]),
        B::new("", "v1", "events", "Event", true)
            .short(&["ev"])
            .cols(vec![
                col("Type", "string", ".type", 0),
                col("Reason", "string", ".reason", 0),
                col("Message", "string", ".message", 0),
                age(),
            ])
            .fields(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]),
        B::new(
            "",
            "v1",
            "replicationcontrollers",
            "ReplicationController",
            true,
        )
        .short(&["rc"])
        .all()
        .status(Drop)
        .scale(),
        B::new("apps", "v1", "deployments", "Deployment", true)
            .short(&["deploy"])
            .all()
            .status(Drop)
            .scale()
            .cols(vec![
                col("Ready", "string", "", 0),
                col("Up-to-date", "integer", ".status.updatedReplicas", 0),
                col("Available", "integer", ".status.availableReplicas", 0),
                age(),
            ]),
        B::new("apps", "v1", "statefulsets", "StatefulSet", true)
            .short(&["sts"])
            .all()
            .status(Drop)
            .scale()
            .cols(vec![col("Ready", "string", "", 0), age()]),
        B::new("apps", "v1", "daemonsets", "DaemonSet", true)
            .short(&["ds"])
            .all()
            .status(Drop)
            .cols(vec![
                col("Desired", "integer", ".status.desiredNumberScheduled", 0),
                col("Current", "integer", ".status.currentNumberScheduled", 0),
                col("Ready", "integer", ".status.numberReady", 0),
                age(),
            ]),
        B::new("apps", "v1", "replicasets", "ReplicaSet", true)
            .short(&["rs"])
            .all()
            .status(Drop)
            .scale()
            .fields(&["status.replicas"]),
        B::new(
            "apps",
            "v1",
            "controllerrevisions",
            "ControllerRevision",
            true,
        ),
        B::new("batch", "v1", "jobs", "Job", true)
            .all()
            .status(Drop)
            .cols(vec![
                col("Status", "string", "", 0),
                col("Completions", "string", "", 0),
                age(),
            ])
            .fields(&["status.successful"]),
        B::new("batch", "v1", "cronjobs", "CronJob", true)
            .short(&["cj"])
            .all()
            .status(Drop)
            .cols(vec![
                col("Schedule", "string", ".spec.schedule", 0),
                col("Suspend", "boolean", ".spec.suspend", 0),
                col("Last Schedule", "date", ".status.lastScheduleTime", 0),
                age(),
            ]),
        B::new("events.k8s.io", "v1", "events", "Event", true)
            .short(&["ev"])
            .fields(&[
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "reportingController",
                "type",
            ]),
        B::new("coordination.k8s.io", "v1", "leases", "Lease", true).cols(vec![
            col("Holder", "string", ".spec.holderIdentity", 0),
            age(),
        ]),
        B::new("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        B::new(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
        ),
        B::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
        ),
        B::new(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        ),
        B::new(
            "authorization.k8s.io",
            "v1",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
        )
        .create_only(),
        B::new(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
        )
        .create_only(),
        B::new(
            "authorization.k8s.io",
            "v1",
            "localsubjectaccessreviews",
            "LocalSubjectAccessReview",
            true,
        )
        .create_only(),
        B::new(
            "authorization.k8s.io",
            "v1",
            "selfsubjectrulesreviews",
            "SelfSubjectRulesReview",
            false,
        )
        .create_only(),
        B::new(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
        )
        .create_only(),
        B::new(
            "authentication.k8s.io",
            "v1",
            "selfsubjectreviews",
            "SelfSubjectReview",
            false,
        )
        .create_only(),
        B::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .short(&["crd", "crds"])
        .status(Drop)
        .cols(vec![col(
            "Created At",
            "date",
            ".metadata.creationTimestamp",
            0,
        )]),
        B::new(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            false,
        ),
        B::new(
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            false,
        ),
        B::new(
            "apiregistration.k8s.io",
            "v1",
            "apiservices",
            "APIService",
            false,
        )
        .status(Drop)
        .cols(vec![
            col("Service", "string", "", 0),
            col("Available", "string", "", 0),
            age(),
        ]),
        B::new(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
        )
        .short(&["pdb"])
        .status(Drop),
        B::new(
            "storage.k8s.io",
            "v1",
            "storageclasses",
            "StorageClass",
            false,
        )
        .short(&["sc"])
        .cols(vec![col("Provisioner", "string", ".provisioner", 0), age()]),
        B::new(
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            "PriorityClass",
            false,
        )
        .short(&["pc"]),
    ];
    v.into_iter()
        .map(|mut b| {
            // Stored as core Events (see `gr`).
            if crate::events::is_events_v1(&b.d) {
                b.d.storage_version = false;
            }
            b.d
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_kubernetes() {
        let mut v = vec!["v1alpha1", "v1", "v2beta1", "v1beta1", "v2"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(v, vec!["v2", "v1", "v2beta1", "v1beta1", "v1alpha1"]);
    }
}
