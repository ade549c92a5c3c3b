//! The Snapshot API (`repositories.stash.appscode.com/v1alpha1`, `kubectl get snapshots`): an
//! aggregated API server on the operator's secure port, serving from an in-memory index of
//! every Repository's snapshots that the native reader keeps current in the background.

pub mod auth;
pub mod cert;
pub mod index;
pub mod object;
pub mod query;
pub mod refresh;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::cli::RunArgs;
use crate::context::RepoLocks;
use crate::error::Error;

/// The front-proxy settings, retried until the API server publishes them (a fresh control
/// plane writes the ConfigMap a moment after it starts).
async fn front_proxy(client: &kube::Client) -> auth::FrontProxy {
    let mut wait = Duration::from_millis(500);
    loop {
        match auth::load_front_proxy(client).await {
            Ok(cfg) => return cfg,
            Err(error) => {
                tracing::warn!(%error, "the Snapshot API waits for the front-proxy configuration");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// How often the serving certificate is checked: it is renewed 30 days before it expires,
/// by whichever replica looks first, and the others pick the renewed one up from its Secret.
const CERT_CHECK: Duration = Duration::from_secs(6 * 3600);

/// Checks the serving certificate every [`CERT_CHECK`] and serves the renewed one to new
/// connections. A failed check is retried at the next one: the current certificate still has
/// weeks to run.
async fn renew(
    client: &kube::Client,
    args: &RunArgs,
    front_proxy: &auth::FrontProxy,
    mut serving: cert::Serving,
    tls: tokio::sync::watch::Sender<Arc<rustls::ServerConfig>>,
) {
    let mut every = tokio::time::interval(CERT_CHECK);
    every.tick().await;
    loop {
        every.tick().await;
        let renewed = match cert::ensure(client, args).await {
            Ok(s) if s.cert_pem != serving.cert_pem => s,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "cannot check the Snapshot API's serving certificate");
                continue;
            }
        };
        match server::tls_config(&renewed, front_proxy) {
            Ok(config) => {
                tracing::info!("serving the Snapshot API with a renewed certificate");
                tls.send_replace(config);
                serving = renewed;
            }
            Err(error) => tracing::warn!(%error, "cannot serve the renewed certificate"),
        }
    }
}

/// Binds the secure port, then serves the Snapshot API and fills its index until dropped.
/// Every replica serves; only the one `leading` writes Repository conditions.
pub async fn run(
    client: kube::Client,
    args: RunArgs,
    locks: RepoLocks,
    leading: Arc<AtomicBool>,
) -> Result<(), Error> {
    let port = args.snapshot_api.secure_port;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .map_err(|source| Error::Serve {
            what: "the Snapshot API",
            port,
            source,
        })?;
    serve_on(listener, client, args, locks, leading).await
}

/// [`run`] on a bound listener (tests bind port 0).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    client: kube::Client,
    args: RunArgs,
    locks: RepoLocks,
    leading: Arc<AtomicBool>,
) -> Result<(), Error> {
    let index = Arc::new(index::Index::new());
    let (refresher, refreshing) =
        refresh::Refresher::start(client.clone(), args.clone(), index.clone(), leading);
    let serving = async {
        let front_proxy = front_proxy(&client).await;
        let serving = cert::ensure(&client, &args).await?;
        let (tls, tls_rx) =
            tokio::sync::watch::channel(server::tls_config(&serving, &front_proxy)?);
        let renewing = renew(&client, &args, &front_proxy, serving, tls);
        let api = Arc::new(server::SnapshotApi {
            index,
            refresher,
            authorizer: auth::Authorizer::new(client.clone()),
            front_proxy: front_proxy.clone(),
            client: client.clone(),
            args: args.clone(),
            locks,
        });
        tracing::info!(
            port = listener.local_addr().map(|a| a.port()).unwrap_or(0),
            "serving the Snapshot API"
        );
        tokio::select! {
            r = server::serve(listener, tls_rx, api) => r,
            () = renewing => Ok(()),
        }
    };
    tokio::select! {
        r = serving => r,
        () = refreshing => Ok(()),
    }
}
