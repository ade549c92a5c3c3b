//! Reads restic repositories without restic: opens the master key from a key file (cached,
//! since scrypt is deliberately slow), then lists and decrypts snapshots through
//! object_store. Local paths and S3 are built in; GCS and Azure are an object_store feature
//! away. Snapshot files are immutable and named by their hash, so decrypted snapshots are
//! cached by id and a repeated listing only fetches what is new.

pub mod crypto;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, Secrets};
use crate::types::Snapshot;
use crypto::{KeyFile, MasterKey, unpack};

/// How many objects are fetched at once.
const FETCH_CONCURRENCY: usize = 32;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NativeError {
    #[error("failed to open the object store: {0}")]
    Store(String),
    #[error("failed to {action} {path}: {source}")]
    Object {
        action: &'static str,
        path: String,
        source: object_store::Error,
    },
    #[error("the repository has no config file at {0}")]
    NotFound(String),
    #[error("wrong password: no key file opens with it")]
    WrongPassword,
    #[error("the {what} failed authentication (corrupt or tampered)")]
    Authentication { what: &'static str },
    #[error("the {what} is malformed: {reason}")]
    Format { what: &'static str, reason: String },
    #[error("the {kind} file {id} does not match its hash")]
    HashMismatch { kind: &'static str, id: String },
    #[error("no snapshot matches {0:?}")]
    NoSuchSnapshot(String),
    #[error("the snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    #[error("the secrets have no RESTIC_PASSWORD")]
    MissingPassword,
    #[error("the {0} backend is not supported by the native reader in this build")]
    Unsupported(&'static str),
}

impl NativeError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, NativeError::Object { .. } | NativeError::Store(_))
    }
}

/// The repository's `config` file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct RepoConfig {
    pub version: u32,
    pub id: String,
    pub chunker_polynomial: String,
}

/// Master keys already derived in this process, by hash of (key file, password). scrypt costs
/// tens of milliseconds by design; paying it once per process is enough.
fn key_cache() -> &'static Mutex<HashMap<[u8; 32], MasterKey>> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], MasterKey>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn cache_key(key_file: &[u8], password: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((key_file.len() as u64).to_le_bytes());
    h.update(key_file);
    h.update(password);
    h.finalize().into()
}

/// An open repository.
pub struct NativeRepository {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    key: MasterKey,
    config: RepoConfig,
    snapshots: Mutex<HashMap<String, Snapshot>>,
}

impl std::fmt::Debug for NativeRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeRepository")
            .field("prefix", &self.prefix)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NativeRepository {
    /// Opens a repository described like restic's, with Stash's secret keys.
    pub async fn open(backend: &Backend, secrets: &Secrets) -> Result<Self, NativeError> {
        let password = secrets
            .get("RESTIC_PASSWORD")
            .ok_or(NativeError::MissingPassword)?;
        let (store, prefix) = store_for(backend, secrets)?;
        Self::open_store(store, prefix, password.expose()).await
    }

    /// Opens a repository in any object store under `prefix`.
    pub async fn open_store(
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        password: &[u8],
    ) -> Result<Self, NativeError> {
        let key = open_master_key(store.as_ref(), &prefix, password).await?;
        let config_path = prefix.child("config");
        let sealed = match store.get(&config_path).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let sealed = match sealed {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(NativeError::NotFound(config_path.to_string()));
            }
            Err(source) => {
                return Err(NativeError::Object {
                    action: "read",
                    path: config_path.to_string(),
                    source,
                });
            }
        };
        let plain = unpack(key.decrypt(&sealed)?, "config")?;
        let config: RepoConfig =
            serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
                what: "config",
                reason: e.to_string(),
            })?;
        Ok(NativeRepository {
            store,
            prefix,
            key,
            config,
            snapshots: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    async fn list_ids(&self, dir: &str) -> Result<Vec<String>, NativeError> {
        let path = self.prefix.child(dir);
        let metas: Vec<_> = self
            .store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|source| NativeError::Object {
                action: "list",
                path: path.to_string(),
                source,
            })?;
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .filter(|name| name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect())
    }

    async fn load_snapshot(&self, id: &str) -> Result<Snapshot, NativeError> {
        let path = self.prefix.child("snapshots").child(id);
        let bytes = self
            .store
            .get(&path)
            .await
            .map_err(|source| NativeError::Object {
                action: "read",
                path: path.to_string(),
                source,
            })?
            .bytes()
            .await
            .map_err(|source| NativeError::Object {
                action: "read",
                path: path.to_string(),
                source,
            })?;
        if hex::encode(Sha256::digest(&bytes)) != id {
            return Err(NativeError::HashMismatch {
                kind: "snapshot",
                id: id.to_owned(),
            });
        }
        let plain = unpack(self.key.decrypt(&bytes)?, "snapshot")?;
        let mut snapshot: Snapshot =
            serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
                what: "snapshot",
                reason: e.to_string(),
            })?;
        snapshot.id = id.to_owned();
        snapshot.short_id = id[..8].to_owned();
        Ok(snapshot)
    }

    /// Every snapshot, oldest first, with the fields and values `restic snapshots --json`
    /// prints. Snapshots already read are served from memory.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, NativeError> {
        let ids = self.list_ids("snapshots").await?;
        let missing: Vec<String> = {
            let cache = lock(&self.snapshots);
            ids.iter()
                .filter(|id| !cache.contains_key(*id))
                .cloned()
                .collect()
        };
        let loaded: Vec<Snapshot> = futures::stream::iter(missing)
            .map(|id| async move { self.load_snapshot(&id).await })
            .buffer_unordered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        let mut cache = lock(&self.snapshots);
        for s in loaded {
            cache.insert(s.id.clone(), s);
        }
        // Forgotten snapshots leave the cache with their files.
        cache.retain(|id, _| ids.contains(id));
        let mut all: Vec<Snapshot> = cache.values().cloned().collect();
        drop(cache);
        sort_like_restic(&mut all);
        Ok(all)
    }

    /// One snapshot by id or unique id prefix.
    pub async fn snapshot(&self, id_prefix: &str) -> Result<Snapshot, NativeError> {
        let ids = self.list_ids("snapshots").await?;
        let mut matches = ids.iter().filter(|id| id.starts_with(id_prefix));
        let id = match (matches.next(), matches.next()) {
            (Some(id), None) => id.clone(),
            (Some(_), Some(_)) => return Err(NativeError::AmbiguousSnapshot(id_prefix.into())),
            (None, _) => return Err(NativeError::NoSuchSnapshot(id_prefix.into())),
        };
        if let Some(s) = lock(&self.snapshots).get(&id) {
            return Ok(s.clone());
        }
        let s = self.load_snapshot(&id).await?;
        lock(&self.snapshots).insert(id, s.clone());
        Ok(s)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// restic lists snapshots by time, oldest first.
fn sort_like_restic(snapshots: &mut [Snapshot]) {
    snapshots.sort_by(|a, b| {
        let ta = a.time.parse::<jiff::Timestamp>().ok();
        let tb = b.time.parse::<jiff::Timestamp>().ok();
        ta.cmp(&tb).then_with(|| a.id.cmp(&b.id))
    });
}

async fn open_master_key(
    store: &dyn ObjectStore,
    prefix: &ObjectPath,
    password: &[u8],
) -> Result<MasterKey, NativeError> {
    let keys_dir = prefix.child("keys");
    let metas: Vec<_> = store
        .list(Some(&keys_dir))
        .try_collect()
        .await
        .map_err(|source| NativeError::Object {
            action: "list",
            path: keys_dir.to_string(),
            source,
        })?;
    if metas.is_empty() {
        return Err(NativeError::NotFound(prefix.child("config").to_string()));
    }
    for meta in metas {
        let bytes = store
            .get(&meta.location)
            .await
            .map_err(|source| NativeError::Object {
                action: "read",
                path: meta.location.to_string(),
                source,
            })?
            .bytes()
            .await
            .map_err(|source| NativeError::Object {
                action: "read",
                path: meta.location.to_string(),
                source,
            })?;
        let id = cache_key(&bytes, password);
        if let Some(key) = lock(key_cache()).get(&id) {
            return Ok(key.clone());
        }
        let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| NativeError::Format {
            what: "key file",
            reason: e.to_string(),
        })?;
        // scrypt is CPU-bound for tens of milliseconds: keep it off the async workers.
        let password = password.to_vec();
        let opened = tokio::task::spawn_blocking(move || file.open(&password))
            .await
            .map_err(|e| NativeError::Store(format!("key derivation task failed: {e}")))?;
        match opened {
            Ok(key) => {
                lock(key_cache()).insert(id, key.clone());
                return Ok(key);
            }
            Err(NativeError::WrongPassword) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(NativeError::WrongPassword)
}

/// Builds the object store and prefix for a backend.
pub fn store_for(
    backend: &Backend,
    secrets: &Secrets,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), NativeError> {
    match backend {
        Backend::Local { path } => {
            let store = object_store::local::LocalFileSystem::new_with_prefix(path)
                .map_err(|e| NativeError::Store(format!("{}: {e}", path.display())))?;
            Ok((Arc::new(store), ObjectPath::default()))
        }
        #[cfg(feature = "s3")]
        Backend::S3 {
            endpoint,
            bucket,
            prefix,
            region,
            insecure_tls,
        } => {
            let secret = |k: &str| {
                secrets
                    .get(k)
                    .map(|v| String::from_utf8_lossy(v.expose()).into_owned())
            };
            // restic treats an endpoint without a scheme as https.
            let url = if endpoint.contains("://") {
                endpoint.clone()
            } else {
                format!("https://{endpoint}")
            };
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&url)
                .with_bucket_name(bucket)
                .with_region(
                    region
                        .clone()
                        .or_else(|| secret("AWS_DEFAULT_REGION"))
                        .unwrap_or_else(|| "us-east-1".into()),
                )
                .with_allow_http(url.starts_with("http://"))
                // Path-style requests work with every S3 server; virtual hosts need DNS.
                .with_virtual_hosted_style_request(false)
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_allow_invalid_certificates(*insecure_tls),
                );
            if let Some(id) = secret("AWS_ACCESS_KEY_ID") {
                builder = builder.with_access_key_id(id);
            }
            if let Some(key) = secret("AWS_SECRET_ACCESS_KEY") {
                builder = builder.with_secret_access_key(key);
            }
            if let Some(token) = secret("AWS_SESSION_TOKEN") {
                builder = builder.with_token(token);
            }
            let store = builder
                .build()
                .map_err(|e| NativeError::Store(e.to_string()))?;
            Ok((Arc::new(store), ObjectPath::from(prefix.trim_matches('/'))))
        }
        #[cfg(not(feature = "s3"))]
        Backend::S3 { .. } => Err(NativeError::Unsupported("s3")),
        Backend::Gcs { .. } => Err(NativeError::Unsupported("gcs")),
        Backend::Azure { .. } => Err(NativeError::Unsupported("azure")),
        Backend::B2 { .. } => Err(NativeError::Unsupported("b2")),
        Backend::Swift { .. } => Err(NativeError::Unsupported("swift")),
        Backend::Rest { .. } => Err(NativeError::Unsupported("rest")),
    }
}
