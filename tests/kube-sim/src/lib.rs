//! kube-sim: an in-memory Kubernetes API server for tests. It speaks the real wire protocol
//! (discovery, CRUD, watch, patch, apply, CRDs, admission webhooks, aggregation) so kubectl,
//! kube-rs and Helm use it unchanged. It knows nothing about any particular operator.
//!
//! Start it in-process with [`KubeSim::start`], then use [`KubeSim::client`] or
//! [`KubeSim::kubeconfig_yaml`]. Services have no network here: a Service that a webhook or an
//! APIService points at is reached through [`Options::service_addresses`] (`ns/name:port` →
//! `host:port`) or, failing that, the Service's `kube-sim.io/address` annotation (`host:port`,
//! used for every port of the Service).

mod admission;
mod apply;
pub mod bench;
mod cel;
mod defaults;
mod discovery;
mod gc;
mod handlers;
mod patch;
mod proto;
mod registry;
mod schema;
mod selectors;
mod server;
mod status;
mod store;
mod table;
pub mod tls;
mod util;
mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

pub use tls::TlsIdentity;

/// The annotation on a Service that says where its pods really listen.
pub const ADDRESS_ANNOTATION: &str = "kube-sim.io/address";

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Serve HTTPS with a generated certificate (the kubeconfig carries its CA).
    pub tls: bool,
    /// Watch events kept per resource for resumption; older resourceVersions get 410 Gone.
    pub history_limit: usize,
    /// How often watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
    /// `namespace/name:port` of a Service → `host:port` to connect to instead.
    pub service_addresses: HashMap<String, String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
            history_limit: 20_000,
            bookmark_interval: Duration::from_secs(5),
            service_addresses: HashMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to bind {addr}: {source}")]
    BindListener {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("failed to create the serving certificate: {0}")]
    CreateCertificate(#[from] tls::TlsError),
    #[error("failed to write the kubeconfig to {path}: {source}")]
    WriteKubeconfig {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to parse the generated kubeconfig: {0}")]
    ParseKubeconfig(#[from] kube::config::KubeconfigError),
    #[error("failed to build a client: {0}")]
    BuildClient(#[from] kube::Error),
}

/// State shared by every request handler.
#[derive(Debug)]
pub(crate) struct Core {
    pub state: Mutex<store::State>,
    /// Bumped whenever the set of served resources changes (OpenAPI document hashes).
    pub epoch: AtomicU64,
    pub opts: Options,
    pub gc: Notify,
    pub server_addr: Mutex<String>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Core {
    /// The store lock. A panic while holding it cannot leave a half-applied write behind
    /// (every write is one `put`), so a poisoned lock is still usable.
    pub fn lock(&self) -> MutexGuard<'_, store::State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

/// A running server. Dropping it stops the server.
#[derive(Debug)]
pub struct KubeSim {
    core: Arc<Core>,
    addr: SocketAddr,
    url: String,
    ca_pem: Option<String>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl KubeSim {
    /// Binds, seeds the default namespaces and starts serving in the current runtime.
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|source| StartError::BindListener {
                addr: opts.addr,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::BindListener {
                addr: opts.addr,
                source,
            })?;
        let identity = if opts.tls {
            let ip = addr.ip().to_string();
            Some(TlsIdentity::generate(&[ip.as_str(), "localhost"])?)
        } else {
            None
        };
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let core = Arc::new(Core {
            state: Mutex::new(store::State::new(opts.history_limit)),
            epoch: AtomicU64::new(1),
            opts: opts.clone(),
            gc: Notify::new(),
            server_addr: Mutex::new(addr.to_string()),
            shutdown,
        });
        handlers::seed(&core);
        let tls_cfg = match &identity {
            Some(id) => Some(id.server_config()?),
            None => None,
        };
        tokio::spawn(server::serve(core.clone(), listener, tls_cfg));
        tokio::spawn(gc::run(core.clone()));
        let scheme = if identity.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "kube-sim is serving");
        Ok(Self {
            core,
            addr,
            url: format!("{scheme}://{addr}"),
            ca_pem: identity.map(|i| i.ca_pem),
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig with one context, `kube-sim`, pointing at this server.
    pub fn kubeconfig_yaml(&self) -> String {
        use base64::Engine;
        let ca = match &self.ca_pem {
            Some(pem) => format!(
                "\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(pem)
            ),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {}{ca}\nusers:\n- name: kube-sim\n  user:\n    token: kube-sim\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\n",
            self.url
        )
    }

    /// Writes the kubeconfig atomically (temp file + rename), so a watcher never reads half.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> Result<(), StartError> {
        let tmp = path.with_extension("tmp");
        let err = |source| StartError::WriteKubeconfig {
            path: path.to_owned(),
            source,
        };
        std::fs::write(&tmp, self.kubeconfig_yaml()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// A kube client for this server.
    pub async fn client(&self) -> Result<kube::Client, ClientError> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Ends every open watch with 410 Gone and forgets the event history, as an etcd
    /// compaction does: clients must list again.
    pub fn expire_watches(&self) {
        self.core.lock().expire_watches();
    }

    /// Routes a Service port to a local address (see the crate docs).
    pub fn map_service(&self, namespace: &str, name: &str, port: u16, to: &str) {
        // Options are read-only after start; the annotation route is the runtime one, so
        // record the mapping in the store-backed table instead.
        let mut st = self.core.lock();
        st.service_map
            .insert(format!("{namespace}/{name}:{port}"), to.to_owned());
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.core.lock().rv
    }

    /// Stops serving; open connections and watches are closed.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
