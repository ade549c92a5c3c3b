//! The manifests a user would write: workloads whose busybox containers write known files
//! into their volumes, and Stash's v1beta1 objects in the form of `deploy/examples/`.

use std::collections::BTreeMap;

use crate::env::S3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    StatefulSet { replicas: usize },
    DaemonSet,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet { .. } => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
        }
    }

    /// `deploy`, `sts`, `ds`: the resource as kubectl names it.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Deployment => "deployment",
            Kind::StatefulSet { .. } => "statefulset",
            Kind::DaemonSet => "daemonset",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A PVC of the default StorageClass (a volumeClaimTemplate for a StatefulSet).
    Pvc,
    EmptyDir,
}

/// A volume of the workload and what its container writes into it.
#[derive(Debug, Clone)]
pub struct Volume {
    pub name: String,
    pub source: Source,
    pub mount: String,
    /// Files copied in at start (from a ConfigMap the scenario creates), by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// `seq 1 N > big.txt`: a large file without shipping it through the API server.
    pub seq_lines: Option<u64>,
}

impl Volume {
    pub fn new(name: &str, source: Source, mount: &str) -> Self {
        Self {
            name: name.into(),
            source,
            mount: mount.into(),
            files: BTreeMap::new(),
            seq_lines: None,
        }
    }

    pub fn with_file(mut self, path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.files.insert(path.into(), bytes.into());
        self
    }

    pub fn with_seq(mut self, lines: u64) -> Self {
        self.seq_lines = Some(lines);
        self
    }
}

/// What `seq 1 N` prints.
pub fn seq_bytes(lines: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=lines {
        out.extend_from_slice(format!("{i}\n").as_bytes());
    }
    out
}

/// The file a ticking workload rewrites every second.
pub const TICK_FILE: &str = "tick";

#[derive(Debug, Clone)]
pub struct Workload {
    pub kind: Kind,
    pub name: String,
    pub volumes: Vec<Volume>,
    /// Rewrite `tick` in the first volume every second, so every backup sees a change.
    pub tick: bool,
    /// The node the pods must run on (`nodeSelector: kubernetes.io/hostname`).
    pub node: Option<String>,
}

impl Workload {
    pub fn new(kind: Kind, name: &str, volumes: Vec<Volume>) -> Self {
        Self {
            kind,
            name: name.into(),
            volumes,
            tick: false,
            node: None,
        }
    }

    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    pub fn ticking(mut self) -> Self {
        self.tick = true;
        self
    }

    /// The ConfigMap holding the seed files of a volume.
    pub fn seed_configmap(&self, v: &Volume) -> String {
        format!("{}-{}-seed", self.name, v.name)
    }

    /// The file in the first volume that names the writer, if this kind writes one:
    /// `pod.txt` (StatefulSet replicas, `$POD_NAME`) or `node.txt` (DaemonSet, `$NODE_NAME`).
    fn identity(&self) -> Option<(&'static str, &'static str)> {
        match self.kind {
            Kind::Deployment => None,
            Kind::StatefulSet { .. } => Some(("pod.txt", "POD_NAME")),
            Kind::DaemonSet => Some(("node.txt", "NODE_NAME")),
        }
    }

    /// What a volume holds once the pod is Ready. `who` is the pod name (StatefulSet) or
    /// node name (DaemonSet) its identity file names. `tick` is not listed (it changes).
    pub fn expected(&self, v: &Volume, who: Option<&str>) -> BTreeMap<String, Vec<u8>> {
        let mut files = v.files.clone();
        if let Some(n) = v.seq_lines {
            files.insert("big.txt".into(), seq_bytes(n));
        }
        if let (Some((file, _)), Some(who)) = (self.identity(), who)
            && self.volumes.first().is_some_and(|f| f.name == v.name)
        {
            files.insert(file.into(), format!("{who}\n").into_bytes());
        }
        files
    }

    /// [`Workload::expected`] as SHA-256 digests, as `Scenario::digests` reads a volume.
    pub fn expected_digests(&self, v: &Volume, who: Option<&str>) -> BTreeMap<String, String> {
        use sha2::Digest;
        self.expected(v, who)
            .into_iter()
            .map(|(p, bytes)| (p, hex::encode(sha2::Sha256::digest(&bytes))))
            .collect()
    }

    /// The container's script: copy the seeds, write the rest, say Ready, then idle (or
    /// tick) until SIGTERM.
    fn script(&self) -> String {
        let mut s = String::from("set -e\n");
        for v in &self.volumes {
            for (i, path) in v.files.keys().enumerate() {
                let dst = format!("{}/{path}", v.mount);
                if let Some((dir, _)) = dst.rsplit_once('/') {
                    s.push_str(&format!("mkdir -p '{dir}'\n"));
                }
                s.push_str(&format!("cp /seed/{}/f{i} '{dst}'\n", v.name));
            }
            if let Some(n) = v.seq_lines {
                s.push_str(&format!("seq 1 {n} > '{}/big.txt'\n", v.mount));
            }
        }
        if let (Some((file, var)), Some(first)) = (self.identity(), self.volumes.first()) {
            s.push_str(&format!("echo \"${var}\" > '{}/{file}'\n", first.mount));
        }
        // Everything is written before the readiness probe passes.
        s.push_str("sync\ntouch /tmp/ready\ntrap 'exit 0' TERM\n");
        match (self.tick, self.volumes.first()) {
            (true, Some(first)) => s.push_str(&format!(
                "i=0\nwhile true; do i=$((i+1)); echo $i > '{}/{TICK_FILE}'; sleep 1 & wait $!; done\n",
                first.mount
            )),
            _ => s.push_str("while true; do sleep 3600 & wait $!; done\n"),
        }
        s
    }

    /// The PVCs (Deployment), the headless Service (StatefulSet) and the workload.
    pub fn manifest(&self, ns: &str) -> String {
        let mut docs = Vec::new();
        let labels = format!("{{app: {}}}", self.name);
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        let mut templates = Vec::new();
        for v in &self.volumes {
            mounts.push(format!("{{name: {}, mountPath: '{}'}}", v.name, v.mount));
            mounts.push(format!(
                "{{name: {}-seed, mountPath: /seed/{}}}",
                v.name, v.name
            ));
            volumes.push(format!(
                "{{name: {}-seed, configMap: {{name: {}}}}}",
                v.name,
                self.seed_configmap(v)
            ));
            match (&v.source, self.kind) {
                (Source::EmptyDir, _) => volumes.push(format!("{{name: {}, emptyDir: {{}}}}", v.name)),
                (Source::Pvc, Kind::StatefulSet { .. }) => templates.push(format!(
                    "{{metadata: {{name: {}}}, spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}}}",
                    v.name
                )),
                (Source::Pvc, _) => {
                    let claim = format!("{}-{}", self.name, v.name);
                    docs.push(format!(
                        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {claim}, namespace: {ns}}}\n\
                         spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}\n"
                    ));
                    volumes.push(format!(
                        "{{name: {}, persistentVolumeClaim: {{claimName: {claim}}}}}",
                        v.name
                    ));
                }
            }
        }
        let script = serde_json::to_string(&self.script()).unwrap_or_default();
        let env = "[{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}, \
                   {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}, \
                   {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}]";
        let node_selector = self
            .node
            .as_ref()
            .map(|n| {
                format!(
                    "      nodeSelector: {{kubernetes.io/hostname: {}}}\n",
                    json(n)
                )
            })
            .unwrap_or_default();
        let pod = format!(
            "    metadata: {{labels: {labels}}}\n    spec:\n{node_selector}      terminationGracePeriodSeconds: 5\n      containers:\n\
             \x20     - name: busybox\n        image: busybox:1.36\n        command: [sh, -c, {script}]\n\
             \x20       env: {env}\n        volumeMounts: [{}]\n\
             \x20       readinessProbe: {{exec: {{command: [test, -f, /tmp/ready]}}, periodSeconds: 1}}\n\
             \x20     volumes: [{}]\n",
            mounts.join(", "),
            volumes.join(", ")
        );
        let head = format!(
            "apiVersion: apps/v1\nkind: {}\nmetadata: {{name: {}, namespace: {ns}, labels: {labels}}}\nspec:\n  selector: {{matchLabels: {labels}}}\n",
            self.kind.name(),
            self.name
        );
        let workload = match self.kind {
            Kind::Deployment => format!("{head}  replicas: 1\n  template:\n{pod}"),
            Kind::DaemonSet => format!("{head}  template:\n{pod}"),
            Kind::StatefulSet { replicas } => {
                docs.push(format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {n}, namespace: {ns}}}\n\
                     spec: {{clusterIP: None, selector: {labels}, ports: [{{name: http, port: 80}}]}}\n",
                    n = self.name
                ));
                format!(
                    "{head}  serviceName: {}\n  replicas: {replicas}\n  template:\n{pod}  volumeClaimTemplates: [{}]\n",
                    self.name,
                    templates.join(", ")
                )
            }
        };
        docs.push(workload);
        docs.join("---\n")
    }
}

/// The storage Secret of an S3 Repository (STASH-API §1.1).
pub fn s3_secret(name: &str, ns: &str, s3: &S3, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: Opaque\nstringData:\n\
         \x20 RESTIC_PASSWORD: {}\n  AWS_ACCESS_KEY_ID: {}\n  AWS_SECRET_ACCESS_KEY: {}\n",
        json(password),
        json(&s3.access_key_id),
        json(&s3.secret_access_key)
    )
}

/// An S3 Repository (as `deploy/examples/repository-s3.yaml`).
pub fn s3_repository(name: &str, ns: &str, secret: &str, s3: &S3, prefix: &str) -> String {
    format!(
        "apiVersion: stash.appscode.com/v1alpha1\nkind: Repository\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n\
         \x20 backend:\n    s3: {{endpoint: {}, bucket: {}, prefix: {}, region: {}}}\n    storageSecretName: {secret}\n",
        json(&s3.endpoint),
        json(&s3.bucket),
        json(prefix),
        json(&s3.region)
    )
}

/// The storage Secret of a local Repository: the password only.
pub fn password_secret(name: &str, ns: &str, password: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: Opaque\nstringData:\n\
         \x20 RESTIC_PASSWORD: {}\n",
        json(password)
    )
}

/// A local Repository on a hostPath, in Stash's form (the repository is
/// `<path>/<subPath>`; `mountPath` is where Stash's sidecar mounted it).
pub fn local_repository(name: &str, ns: &str, secret: &str, path: &str, sub_path: &str) -> String {
    format!(
        "apiVersion: stash.appscode.com/v1alpha1\nkind: Repository\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n\
         \x20 backend:\n    local:\n      hostPath: {{path: {}}}\n      mountPath: /safe/data\n      subPath: {}\n\
         \x20   storageSecretName: {secret}\n",
        json(path),
        json(sub_path)
    )
}

/// A BackupConfiguration of one workload's volumes (as `deploy/examples/`).
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub name: String,
    pub repository: String,
    pub schedule: String,
    pub paused: bool,
    pub keep_last: u32,
    pub history_limit: u32,
    pub io_budget: Option<String>,
}

impl BackupConfig {
    /// A schedule that does not fire during a test run (1 January, 03:00), retention that
    /// keeps everything a scenario makes, and a history long enough to read every session.
    pub fn new(name: &str, repository: &str) -> Self {
        Self {
            name: name.into(),
            repository: repository.into(),
            schedule: "0 3 1 1 *".into(),
            paused: false,
            keep_last: 20,
            history_limit: 20,
            io_budget: None,
        }
    }

    pub fn manifest(&self, ns: &str, w: &Workload) -> String {
        let mounts: Vec<String> = w
            .volumes
            .iter()
            .map(|v| format!("{{name: {}, mountPath: '{}'}}", v.name, v.mount))
            .collect();
        let paths: Vec<String> = w.volumes.iter().map(|v| format!("'{}'", v.mount)).collect();
        let budget = self
            .io_budget
            .as_ref()
            .map(|b| format!("  ioBudget: {{bytesPerSecond: {b}}}\n"))
            .unwrap_or_default();
        format!(
            "apiVersion: stash.appscode.com/v1beta1\nkind: BackupConfiguration\nmetadata: {{name: {}, namespace: {ns}}}\nspec:\n\
             \x20 repository: {{name: {}}}\n  schedule: {}\n  paused: {}\n\
             \x20 target:\n    ref: {{apiVersion: apps/v1, kind: {}, name: {}}}\n    volumeMounts: [{}]\n    paths: [{}]\n\
             {budget}\
             \x20 retentionPolicy: {{name: keep-last-{k}, keepLast: {k}, prune: true}}\n  backupHistoryLimit: {}\n",
            self.name,
            self.repository,
            json(&self.schedule),
            self.paused,
            w.kind.name(),
            w.name,
            mounts.join(", "),
            paths.join(", "),
            self.history_limit,
            k = self.keep_last,
        )
    }
}

/// An instant backup, written as the trigger would write it (`deploy/examples/backupsession.yaml`).
pub fn backup_session(name: &str, ns: &str, bc: &str, w: &Workload) -> String {
    format!(
        "apiVersion: stash.appscode.com/v1beta1\nkind: BackupSession\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n\
         \x20   app.kubernetes.io/component: stash-backup\n    app.kubernetes.io/managed-by: stash.appscode.com\n\
         \x20   stash.appscode.com/invoker-type: BackupConfiguration\n    stash.appscode.com/invoker-name: {bc}\n\
         \x20   stash.appscode.com/target-kind: {}\n    stash.appscode.com/target-name: {}\n    stash.appscode.com/target-namespace: {ns}\n\
         spec:\n  invoker: {{apiGroup: stash.appscode.com, kind: BackupConfiguration, name: {bc}}}\n",
        w.kind.name(),
        w.name
    )
}

/// A RestoreSession as Stash's guides write it: the repository, the target with the volumes
/// to restore into, and `rules` (YAML flow sequences, e.g. `[{paths: [/data]}]`; empty for
/// none); `extra` lines go under `target:` (e.g. `    args: [--delete]`).
pub fn restore_session(
    name: &str,
    ns: &str,
    repository: &str,
    w: &Workload,
    rules: &str,
    extra: &str,
) -> String {
    let mounts: Vec<String> = w
        .volumes
        .iter()
        .map(|v| format!("{{name: {}, mountPath: '{}'}}", v.name, v.mount))
        .collect();
    let rules = if rules.is_empty() {
        String::new()
    } else {
        format!("    rules: {rules}\n")
    };
    format!(
        "apiVersion: stash.appscode.com/v1beta1\nkind: RestoreSession\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n\
         \x20 repository: {{name: {repository}}}\n  target:\n    ref: {{apiVersion: apps/v1, kind: {}, name: {}}}\n\
         \x20   volumeMounts: [{}]\n{rules}{extra}",
        w.kind.name(),
        w.name,
        mounts.join(", "),
    )
}

/// A YAML scalar, quoted (JSON strings are YAML).
fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_bytes_match_seq() {
        assert_eq!(seq_bytes(3), b"1\n2\n3\n");
        assert_eq!(seq_bytes(11).len(), 9 * 2 + 2 * 3);
    }

    #[test]
    fn statefulset_identity_goes_to_the_first_volume_only() {
        let w = Workload::new(
            Kind::StatefulSet { replicas: 3 },
            "db",
            vec![
                Volume::new("data", Source::Pvc, "/data").with_file("a", "x"),
                Volume::new("logs", Source::EmptyDir, "/logs"),
            ],
        );
        let first = w.expected(&w.volumes[0], Some("db-1"));
        assert_eq!(first["pod.txt"], b"db-1\n");
        assert_eq!(first["a"], b"x");
        assert!(w.expected(&w.volumes[1], Some("db-1")).is_empty());
        let m = w.manifest("ns");
        assert!(
            m.contains("volumeClaimTemplates: [{metadata: {name: data}"),
            "{m}"
        );
        assert!(m.contains("kind: Service"), "{m}");
    }
}
