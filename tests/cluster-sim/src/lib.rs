//! cluster-sim: the rest of a Kubernetes cluster behind kube-sim, for e2e tests and the
//! demo. kube-controller-manager's workload and volume controllers, kube-scheduler, a CSI
//! provisioner and one kubelet per simulated node are clients of the API, as the real
//! components are; containers of this project's own images run as real processes.
//!
//! Start it with [`Cluster::start`]; dropping the cluster (or [`Cluster::stop`]) stops
//! every loop and process and undoes every mount and address it made.

pub mod bus;
pub mod controllers;
pub mod cron;
pub mod error;
pub mod hash;
pub mod kubelet;
pub mod scheduler;
pub mod util;

pub use error::{Error, Result};
pub use kubelet::runtime::{Image, Images};

use base64::Engine;
use bus::{Bus, run_loop, watch_kind};
use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
    Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::Api;
use kubelet::net::ClusterNet;
use kubelet::{Kubelet, KubeletConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The CSI driver of the cluster's default StorageClass.
pub const CSI_DRIVER: &str = "csi.cluster-sim.test";
pub const DEFAULT_STORAGE_CLASS: &str = "standard";

#[derive(Debug, Clone)]
pub struct Options {
    /// Holds `nodes/<node>/` (each node's filesystem), `csi/` (the storage backend) and the
    /// kubeconfig.
    pub state_dir: PathBuf,
    pub nodes: usize,
    /// The API server's port (0 picks a free one).
    pub port: u16,
    pub images: Images,
    /// The `cluster-sim` binary, whose `container-init` starts each container process.
    pub init_exe: PathBuf,
}

#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    pub root: PathBuf,
    pub kubelet_root: PathBuf,
}

/// A running cluster. Dropping it stops everything it started.
pub struct Cluster {
    sim: Arc<kube_sim::KubeSim>,
    client: Client,
    tasks: Vec<JoinHandle<()>>,
    kubelet_tasks: std::collections::BTreeMap<String, JoinHandle<()>>,
    kubelets: Vec<Arc<Kubelet>>,
    net: Arc<ClusterNet>,
    kubeconfig: PathBuf,
}

fn ca_of(kubeconfig: &str) -> Result<String> {
    let b64 = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .ok_or_else(|| Error::Invalid {
            action: "read the API server's CA",
            message: "the kubeconfig has none".into(),
        })?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| Error::Invalid {
            action: "read the API server's CA",
            message: e.to_string(),
        })?;
    Ok(String::from_utf8_lossy(&pem).into_owned())
}

impl Cluster {
    pub async fn start(opts: Options) -> Result<Self> {
        let net = Arc::new(ClusterNet::claim()?);
        let gw = net.gateway();
        let sim = Arc::new(
            kube_sim::KubeSim::start(kube_sim::Options {
                addr: std::net::SocketAddr::from((gw, opts.port)),
                tls: true,
                ..Default::default()
            })
            .await?,
        );
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(Error::io("create the state directory", &opts.state_dir))?;
        let kubeconfig = opts.state_dir.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig)?;
        let client = sim.client().await?;
        let ca = ca_of(&sim.kubeconfig_yaml())?;
        let csi_root = opts.state_dir.join("csi");
        std::fs::create_dir_all(&csi_root).map_err(Error::io("create", &csi_root))?;
        install_addons(&client).await?;
        let bus = Arc::new(Bus::default());
        let mut tasks = Vec::new();
        macro_rules! watch {
            ($t:ty, $kind:literal) => {
                tasks.push(tokio::spawn(watch_kind(
                    Api::<$t>::all(client.clone()),
                    bus.clone(),
                    $kind,
                )));
            };
        }
        watch!(Deployment, "deployments");
        watch!(ReplicaSet, "replicasets");
        watch!(StatefulSet, "statefulsets");
        watch!(DaemonSet, "daemonsets");
        watch!(ControllerRevision, "controllerrevisions");
        watch!(Job, "jobs");
        watch!(CronJob, "cronjobs");
        watch!(Pod, "pods");
        watch!(Node, "nodes");
        watch!(PersistentVolumeClaim, "persistentvolumeclaims");
        watch!(PersistentVolume, "persistentvolumes");
        watch!(StorageClass, "storageclasses");
        watch!(Namespace, "namespaces");
        watch!(ServiceAccount, "serviceaccounts");
        watch!(ConfigMap, "configmaps");
        watch!(Secret, "secrets");
        watch!(Service, "services");
        watch!(Endpoints, "endpoints");
        watch!(EndpointSlice, "endpointslices");
        let second = Duration::from_secs(1);
        macro_rules! control {
            ($name:literal, [$($k:literal),*], $period:expr, $body:expr) => {{
                let c = client.clone();
                let nudge = bus.subscribe(&[$($k),*]);
                #[allow(clippy::redundant_closure_call)]
                tasks.push(tokio::spawn(run_loop($name, nudge, $period, move || {
                    let c = c.clone();
                    ($body)(c)
                })));
            }};
        }
        control!(
            "deployment",
            ["deployments", "replicasets"],
            second,
            |c: Client| async move { controllers::deployment::pass(&c).await }
        );
        control!(
            "replicaset",
            ["replicasets", "pods"],
            second,
            |c: Client| async move { controllers::replicaset::pass(&c).await }
        );
        control!(
            "statefulset",
            ["statefulsets", "pods", "controllerrevisions"],
            second,
            |c: Client| async move { controllers::statefulset::pass(&c).await }
        );
        control!(
            "daemonset",
            ["daemonsets", "pods", "nodes", "controllerrevisions"],
            second,
            |c: Client| async move { controllers::daemonset::pass(&c).await }
        );
        control!("job", ["jobs", "pods"], second, |c: Client| async move {
            controllers::job::pass(&c).await
        });
        control!(
            "cronjob",
            ["cronjobs", "jobs"],
            Duration::from_secs(5),
            |c: Client| async move { controllers::cronjob::pass(&c).await }
        );
        control!(
            "nodelifecycle",
            ["nodes"],
            Duration::from_secs(5),
            |c: Client| async move { controllers::nodelifecycle::pass(&c).await }
        );
        control!(
            "scheduler",
            [
                "pods",
                "nodes",
                "persistentvolumeclaims",
                "persistentvolumes"
            ],
            second,
            |c: Client| async move { scheduler::pass(&c).await }
        );
        {
            let (c, root) = (client.clone(), csi_root.clone());
            let nudge = bus.subscribe(&[
                "persistentvolumeclaims",
                "persistentvolumes",
                "storageclasses",
            ]);
            tasks.push(tokio::spawn(run_loop("volume", nudge, second, move || {
                let (c, root) = (c.clone(), root.clone());
                async move { controllers::volume::pass(&c, CSI_DRIVER, &root).await }
            })));
        }
        {
            let (c, ca) = (client.clone(), Arc::new(ca.clone()));
            let nudge = bus.subscribe(&["namespaces", "serviceaccounts", "configmaps"]);
            tasks.push(tokio::spawn(run_loop(
                "namespace",
                nudge,
                Duration::from_secs(5),
                move || {
                    let (c, ca) = (c.clone(), ca.clone());
                    async move { controllers::namespace::pass(&c, &ca).await }
                },
            )));
        }
        {
            let c = client.clone();
            let ctl = Arc::new(controllers::endpoints::EndpointsController::default());
            let nudge = bus.subscribe(&["services", "pods", "endpointslices", "endpoints"]);
            tasks.push(tokio::spawn(run_loop(
                "endpoints",
                nudge,
                second,
                move || {
                    let (c, ctl) = (c.clone(), ctl.clone());
                    async move { ctl.pass(&c).await }
                },
            )));
        }
        {
            let c = client.clone();
            let proxy = Arc::new(controllers::proxy::Proxy::new(net.clone()));
            let nudge = bus.subscribe(&["services", "endpointslices"]);
            tasks.push(tokio::spawn(run_loop("proxy", nudge, second, move || {
                let (c, proxy) = (c.clone(), proxy.clone());
                async move { proxy.pass(&c).await }
            })));
        }
        let images = Arc::new(opts.images.clone());
        let mut kubelets = Vec::new();
        let mut kubelet_tasks = std::collections::BTreeMap::new();
        for i in 0..opts.nodes {
            let name = format!("node-{}", i + 1);
            let cfg = KubeletConfig {
                node_root: opts.state_dir.join("nodes").join(&name),
                node_name: name,
                index: u8::try_from(i).map_err(|_| Error::Invalid {
                    action: "start the nodes",
                    message: "at most 62 nodes".into(),
                })?,
                csi_root: csi_root.clone(),
                driver: CSI_DRIVER.to_owned(),
                api_host: gw.to_string(),
                api_port: sim.addr().port(),
                images: images.clone(),
                exe: opts.init_exe.clone(),
            };
            let k = Kubelet::new(client.clone(), cfg, net.clone()).await?;
            let nudge = bus.subscribe(&["pods"]);
            kubelet_tasks.insert(k.cfg.node_name.clone(), tokio::spawn(k.clone().run(nudge)));
            kubelets.push(k);
        }
        Ok(Self {
            sim,
            client,
            tasks,
            kubelet_tasks,
            kubelets,
            net,
            kubeconfig,
        })
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn api_server(&self) -> &kube_sim::KubeSim {
        &self.sim
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.kubelets
            .iter()
            .map(|k| NodeInfo {
                name: k.cfg.node_name.clone(),
                root: k.cfg.node_root.clone(),
                kubelet_root: k.kubelet_root(),
            })
            .collect()
    }

    /// Stops one node's kubelet as a node that dies would: its containers are killed and
    /// it no longer renews its Lease (the node lifecycle controller then marks it Unknown).
    pub async fn stop_node(&mut self, name: &str) {
        if let Some(i) = self.kubelets.iter().position(|k| k.cfg.node_name == name) {
            let k = self.kubelets.remove(i);
            if let Some(t) = self.kubelet_tasks.remove(name) {
                t.abort();
                let _ = t.await;
            }
            k.mounts.unmount_all();
        }
    }

    /// Stops every loop and waits until their processes, sandboxes and mounts are gone.
    pub async fn stop(mut self) {
        let kubelet_tasks = std::mem::take(&mut self.kubelet_tasks);
        for t in self.tasks.iter().chain(kubelet_tasks.values()) {
            t.abort();
        }
        for t in self.tasks.drain(..).chain(kubelet_tasks.into_values()) {
            let _ = t.await;
        }
        for k in &self.kubelets {
            k.mounts.unmount_all();
        }
        self.sim.shutdown();
        let _ = &self.net;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(self.kubelet_tasks.values()) {
            t.abort();
        }
        for k in &self.kubelets {
            k.mounts.unmount_all();
        }
    }
}

/// What a fresh cluster's addon manager installs: the default StorageClass (delayed
/// binding, as kind's `standard` class) for the cluster's CSI driver.
async fn install_addons(client: &Client) -> Result<()> {
    let sc: StorageClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": DEFAULT_STORAGE_CLASS, "annotations": {controllers::volume::DEFAULT_CLASS: "true"}},
        "provisioner": CSI_DRIVER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .map_err(|e| Error::Invalid { action: "build the default StorageClass", message: e.to_string() })?;
    util::create_if_absent(
        &Api::<StorageClass>::all(client.clone()),
        &sc,
        "the default StorageClass",
    )
    .await
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("api", &self.sim.url())
            .field("nodes", &self.kubelets)
            .finish()
    }
}
