//! kube-sim: an in-memory Kubernetes API server for tests. It speaks the real wire protocol
//! (discovery, CRUD, watch, patch, apply, CRDs, admission webhooks, aggregation) so kubectl,
//! kube-rs and Helm use it unchanged, and authenticates (tokens, client certificates,
//! impersonation) and authorizes (RBAC) every request as the real one does. It knows nothing
//! about any particular operator.
//!
//! Start it in-process with [`KubeSim::start`], then use [`KubeSim::client`] or
//! [`KubeSim::kubeconfig_yaml`]. A Service that a webhook or an APIService points at is reached
//! through a ready endpoint of its EndpointSlices, as kube-apiserver with
//! `--enable-aggregator-routing` does. Without a cluster to make endpoints,
//! [`Options::service_addresses`] (`ns/name:port` → `host:port`) or the Service's
//! `kube-sim.io/address` annotation (`host:port`, for every port) stand in for them.

mod admission;
mod apply;
mod auth;
mod available;
pub mod bench;
mod builtin;
mod cel;
mod cron;
mod defaults;
mod discovery;
mod events;
mod gc;
mod handlers;
mod logs;
mod patch;
mod proto;
mod rbac;
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

pub use auth::{ADMIN_TOKEN, ADMIN_USER};
pub use tls::{ClientCert, TlsIdentity};

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
    /// Wakes the APIService availability controller.
    pub available: Notify,
    /// Objects created with owners since the collector last looked: on a create, only the
    /// new object can have lost its owner, so the collector checks just these (a whole pass
    /// over thousands of objects per owned create held the store's lock for most of a burst).
    pub gc_created: Mutex<Vec<(registry::Gr, String)>>,
    /// Something else changed (a delete, a finalizer): the next round is a whole pass.
    pub gc_full: std::sync::atomic::AtomicBool,
    pub server_addr: Mutex<String>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// CAs, certificates and the token signing key.
    pub auth: auth::Authority,
    /// Requests served, by verb and resource: what a client's load is made of (benchmarks
    /// read it; the server itself never does).
    pub requests: Mutex<std::collections::BTreeMap<String, u64>>,
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

    /// Wakes the collector for a whole pass.
    pub fn collect_all(&self) {
        self.gc_full.store(true, Ordering::Release);
        self.gc.notify_one();
    }

    /// Wakes the collector to check one object created with owners.
    pub fn collect_created(&self, gr: registry::Gr, key: String) {
        self.gc_created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((gr, key));
        self.gc.notify_one();
    }
}

/// A running server. Dropping it stops the server.
#[derive(Debug)]
pub struct KubeSim {
    core: Arc<Core>,
    addr: SocketAddr,
    url: String,
    kubeconfig_ca: Option<String>,
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
        // The names a client may reach the API server by, in and out of the cluster.
        let ip = addr.ip().to_string();
        let authority = auth::Authority::generate(&[
            ip.as_str(),
            "127.0.0.1",
            "localhost",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ])?;
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let core = Arc::new(Core {
            state: Mutex::new(store::State::new(opts.history_limit)),
            epoch: AtomicU64::new(1),
            opts: opts.clone(),
            gc: Notify::new(),
            available: Notify::new(),
            gc_created: Mutex::default(),
            gc_full: std::sync::atomic::AtomicBool::new(false),
            server_addr: Mutex::new(addr.to_string()),
            shutdown,
            auth: authority,
            requests: Mutex::default(),
        });
        handlers::seed(&core);
        let tls_cfg = if opts.tls {
            Some(
                core.auth
                    .serving
                    .server_config_with_client_ca(&core.auth.ca.pem)?,
            )
        } else {
            None
        };
        let kubeconfig_ca = opts.tls.then(|| core.auth.ca.pem.clone());
        tokio::spawn(server::serve(core.clone(), listener, tls_cfg));
        tokio::spawn(gc::run(core.clone()));
        tokio::spawn(available::run(core.clone()));
        let scheme = if opts.tls { "https" } else { "http" };
        tracing::info!(%addr, scheme, "kube-sim is serving");
        Ok(Self {
            core,
            addr,
            url: format!("{scheme}://{addr}"),
            kubeconfig_ca,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests served so far, keyed `<verb> <resource>[/<subresource>]` (`list pods`,
    /// `patch backupsessions/status`, `watch leases`) or `<verb> <path>` for non-resource
    /// requests.
    pub fn request_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.core
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig with one context, `kube-sim`, pointing at this server as the admin
    /// (`system:masters`).
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_with_user(&format!("token: {ADMIN_TOKEN}"))
    }

    /// A kubeconfig that authenticates with a bearer token (a ServiceAccount token from
    /// `kubectl create token` or the TokenRequest API).
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        self.kubeconfig_with_user(&format!("token: {token}"))
    }

    /// A kubeconfig that authenticates with a client certificate (needs `Options::tls`).
    pub fn kubeconfig_with_certificate(&self, cert: &ClientCert) -> String {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        self.kubeconfig_with_user(&format!(
            "client-certificate-data: {}\n    client-key-data: {}",
            b64(&cert.cert_pem),
            b64(&cert.key_pem)
        ))
    }

    fn kubeconfig_with_user(&self, user: &str) -> String {
        use base64::Engine;
        let ca = match &self.kubeconfig_ca {
            Some(pem) => format!(
                "\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(pem)
            ),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {}{ca}\nusers:\n- name: kube-sim\n  user:\n    {user}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\n",
            self.url
        )
    }

    /// The cluster CA (PEM): it signed the serving certificate and signs client certificates;
    /// pods find it in the `kube-root-ca.crt` ConfigMap of their namespace.
    pub fn ca_pem(&self) -> &str {
        &self.core.auth.ca.pem
    }

    /// The CA of the front-proxy client certificate aggregated API servers are called with.
    pub fn front_proxy_ca_pem(&self) -> &str {
        &self.core.auth.front_proxy_ca.pem
    }

    /// A client certificate for `user` in up to two `groups`, signed by the cluster CA, as an
    /// administrator would issue one (CN = user, O = groups).
    pub fn client_certificate(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<ClientCert, tls::TlsError> {
        self.core.auth.ca.client(user, groups)
    }

    /// Moves the clock tokens are issued and checked by forward (a test hook for expiry).
    pub fn advance_token_clock(&self, by: Duration) {
        self.core
            .auth
            .advance_clock(i64::try_from(by.as_secs()).unwrap_or(i64::MAX));
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

    /// A kube client for this server, as the admin.
    pub async fn client(&self) -> Result<kube::Client, ClientError> {
        Self::client_for(&self.kubeconfig_yaml()).await
    }

    /// A kube client from one of this server's kubeconfigs.
    pub async fn client_for(kubeconfig: &str) -> Result<kube::Client, ClientError> {
        let kc = kube::config::Kubeconfig::from_yaml(kubeconfig)?;
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
