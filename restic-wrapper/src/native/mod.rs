//! Reads restic repositories without restic: opens the master key from a key file (cached,
//! since scrypt is deliberately slow), then lists and decrypts snapshots through
//! object_store. S3 is built in; GCS and Azure are an object_store feature away. Local
//! repositories are read with plain file reads in batches: object_store's local store costs
//! two blocking-pool hops per file, which was most of a 1,000-snapshot listing. Snapshot files
//! are immutable and named by their hash, so decrypted snapshots are cached by id and a
//! repeated listing only fetches what is new. Lock files are read and removed one by one
//! (`lock`).

pub mod crypto;
mod lock;
mod shared;
pub mod tree;

pub use lock::Lock;
pub use shared::{is_open, reader, with_reader};
pub use tree::{BlobId, BlobIndex, BlobKind, NodeKind, TreeNode, blob_id};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, Secrets};
use crate::types::Snapshot;
use crypto::{KeyFile, MasterKey, Unpacker, unpack};

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
    #[error("failed to {action} {path}: {source}")]
    Local {
        action: &'static str,
        path: String,
        source: std::io::Error,
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
        matches!(
            self,
            NativeError::Object { .. } | NativeError::Store(_) | NativeError::Local { .. }
        )
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

/// Key derivations running at once in this process. restic's scrypt parameters (N = 2^15,
/// r = 8) take 32 MiB each: an operator opening its ten repositories at start-up derived all
/// ten together and peaked at 368 MiB resident. Two keep a second core busy; the rest wait,
/// and find the key in the cache when it was the same one.
const CONCURRENT_DERIVATIONS: usize = 2;

fn derivations() -> &'static tokio::sync::Semaphore {
    static SLOTS: tokio::sync::Semaphore =
        tokio::sync::Semaphore::const_new(CONCURRENT_DERIVATIONS);
    &SLOTS
}

fn cache_key(key_file: &[u8], password: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((key_file.len() as u64).to_le_bytes());
    h.update(key_file);
    h.update(password);
    h.finalize().into()
}

/// Where the repository's files are read from.
#[derive(Clone)]
enum Source {
    Local(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
    },
}

/// Files read from a local directory per blocking task.
const LOCAL_BATCH: usize = 64;
/// Snapshots decoded per blocking task.
const DECODE_BATCH: usize = 128;

/// A repository file's object path below the repository's prefix.
fn object_path(prefix: &ObjectPath, rel: &str) -> ObjectPath {
    rel.split('/').fold(prefix.clone(), |p, part| p.child(part))
}

impl Source {
    fn describe(&self, rel: &str) -> String {
        match self {
            Source::Local(root) => root.join(rel).display().to_string(),
            Source::Store { prefix, .. } => object_path(prefix, rel).to_string(),
        }
    }

    /// The file names in a directory of the repository (restic's dirs are flat, except
    /// `data/`, which this reader never lists).
    async fn list(&self, dir: &'static str) -> Result<Vec<String>, NativeError> {
        match self {
            Source::Local(root) => {
                let path = root.join(dir);
                tokio::task::spawn_blocking(move || {
                    let entries = match std::fs::read_dir(&path) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
                        Err(e) => return Err(local_error("list", &path, e)),
                    };
                    let mut names = Vec::new();
                    for entry in entries {
                        let entry = entry.map_err(|e| local_error("list", &path, e))?;
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                    Ok(names)
                })
                .await
                .map_err(|e| NativeError::Store(format!("listing task failed: {e}")))?
            }
            Source::Store { store, prefix } => {
                let path = prefix.child(dir);
                let metas: Vec<_> =
                    store
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
                    .collect())
            }
        }
    }

    /// One file, or `None` if it does not exist.
    async fn get(&self, rel: String) -> Result<Option<Vec<u8>>, NativeError> {
        match self {
            Source::Local(root) => {
                let path = root.join(&rel);
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(local_error("read", &path, e)),
                }
            }
            Source::Store { store, prefix } => {
                let path = object_path(prefix, &rel);
                let result = match store.get(&path).await {
                    Ok(r) => r.bytes().await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(b) => Ok(Some(b.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(source) => Err(NativeError::Object {
                        action: "read",
                        path: path.to_string(),
                        source,
                    }),
                }
            }
        }
    }

    /// `len` bytes of a file from `offset` (packs are immutable: a short read is corruption).
    async fn get_range(&self, rel: String, offset: u64, len: u64) -> Result<Vec<u8>, NativeError> {
        match self {
            Source::Local(root) => {
                let path = root.join(&rel);
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let file =
                        std::fs::File::open(&path).map_err(|e| local_error("open", &path, e))?;
                    let mut buf = vec![0u8; len as usize];
                    file.read_exact_at(&mut buf, offset)
                        .map_err(|e| local_error("read", &path, e))?;
                    Ok(buf)
                })
                .await
                .map_err(|e| NativeError::Store(format!("read task failed: {e}")))?
            }
            Source::Store { store, prefix } => {
                let path = object_path(prefix, &rel);
                let bytes =
                    store
                        .get_range(&path, offset..offset + len)
                        .await
                        .map_err(|source| NativeError::Object {
                            action: "read",
                            path: path.to_string(),
                            source,
                        })?;
                if bytes.len() as u64 != len {
                    return Err(NativeError::Format {
                        what: "pack",
                        reason: format!("{path}: {} bytes where the index has {len}", bytes.len()),
                    });
                }
                Ok(bytes.to_vec())
            }
        }
    }

    /// Deletes one file; one that is already gone is not an error.
    async fn delete(&self, rel: String) -> Result<(), NativeError> {
        match self {
            Source::Local(root) => {
                let path = root.join(&rel);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(local_error("delete", &path, e)),
                }
            }
            Source::Store { store, prefix } => {
                let path = object_path(prefix, &rel);
                match store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(NativeError::Object {
                        action: "delete",
                        path: path.to_string(),
                        source,
                    }),
                }
            }
        }
    }

    /// Writes one file (test support only: the reader never writes to a repository).
    #[cfg(any(test, feature = "test-support"))]
    async fn put(&self, rel: String, bytes: Vec<u8>) -> Result<(), NativeError> {
        match self {
            Source::Local(root) => {
                let path = root.join(&rel);
                tokio::fs::write(&path, bytes)
                    .await
                    .map_err(|e| local_error("write", &path, e))
            }
            Source::Store { store, prefix } => {
                let path = object_path(prefix, &rel);
                store
                    .put(&path, bytes.into())
                    .await
                    .map(drop)
                    .map_err(|source| NativeError::Object {
                        action: "write",
                        path: path.to_string(),
                        source,
                    })
            }
        }
    }

    /// Several files of one directory; every one must exist.
    async fn get_many(
        &self,
        dir: &'static str,
        names: Vec<String>,
    ) -> Result<Vec<(String, Vec<u8>)>, NativeError> {
        match self {
            Source::Local(root) => {
                let batches: Vec<Vec<String>> =
                    names.chunks(LOCAL_BATCH).map(<[String]>::to_vec).collect();
                let dir = root.join(dir);
                let tasks = batches.into_iter().map(|batch| {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || {
                        batch
                            .into_iter()
                            .map(|name| {
                                let path = dir.join(&name);
                                std::fs::read(&path)
                                    .map(|b| (name, b))
                                    .map_err(|e| local_error("read", &path, e))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                });
                let mut out = Vec::with_capacity(names.len());
                for batch in futures::future::join_all(tasks).await {
                    out.extend(batch.map_err(|e| NativeError::Store(e.to_string()))??);
                }
                Ok(out)
            }
            Source::Store { .. } => {
                futures::stream::iter(names)
                    .map(|name| async move {
                        let rel = format!("{dir}/{name}");
                        match self.get(rel.clone()).await? {
                            Some(b) => Ok((name, b)),
                            None => Err(NativeError::NotFound(self.describe(&rel))),
                        }
                    })
                    .buffer_unordered(FETCH_CONCURRENCY)
                    .try_collect()
                    .await
            }
        }
    }
}

fn local_error(action: &'static str, path: &std::path::Path, e: std::io::Error) -> NativeError {
    NativeError::Local {
        action,
        path: path.display().to_string(),
        source: e,
    }
}

/// What a repository shows without its password: which files it holds. Enough to tell
/// whether it is initialized and whether it has any snapshot, without paying for scrypt.
pub struct RepositoryFiles {
    source: Source,
}

impl std::fmt::Debug for RepositoryFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryFiles")
            .field("source", &self.source.describe(""))
            .finish()
    }
}

impl RepositoryFiles {
    pub fn new(backend: &Backend, secrets: &Secrets) -> Result<Self, NativeError> {
        let source = match backend {
            Backend::Local { path } => Source::Local(path.clone()),
            _ => {
                let (store, prefix) = store_for(backend, secrets)?;
                Source::Store { store, prefix }
            }
        };
        Ok(RepositoryFiles { source })
    }

    /// Whether the repository's `config` file exists (it is written last by `restic init`
    /// after the key file, so an initialization cut short leaves none).
    pub async fn has_config(&self) -> Result<bool, NativeError> {
        Ok(self.source.get("config".into()).await?.is_some())
    }

    /// The ids of the repository's snapshots (their file names).
    pub async fn snapshot_ids(&self) -> Result<Vec<String>, NativeError> {
        snapshot_ids(&self.source).await
    }
}

async fn snapshot_ids(source: &Source) -> Result<Vec<String>, NativeError> {
    let mut ids = source.list("snapshots").await?;
    ids.retain(|name| name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()));
    Ok(ids)
}

/// An open repository.
pub struct NativeRepository {
    source: Source,
    key: MasterKey,
    config: RepoConfig,
    snapshots: Mutex<HashMap<String, Snapshot>>,
}

impl std::fmt::Debug for NativeRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeRepository")
            .field("source", &self.source.describe(""))
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
        let source = RepositoryFiles::new(backend, secrets)?.source;
        Self::open_source(source, password.expose()).await
    }

    /// Opens a repository in any object store under `prefix`.
    pub async fn open_store(
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        password: &[u8],
    ) -> Result<Self, NativeError> {
        Self::open_source(Source::Store { store, prefix }, password).await
    }

    async fn open_source(source: Source, password: &[u8]) -> Result<Self, NativeError> {
        let key = open_master_key(&source, password).await?;
        let config = read_config(&source, &key).await?;
        Ok(NativeRepository {
            source,
            key,
            config,
            snapshots: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Whether the repository is still the one this reader opened: its config file is there
    /// and opens with this reader's key to the same id (one read; a repository wiped and
    /// initialised again in place has another).
    pub async fn is_current(&self) -> bool {
        read_config(&self.source, &self.key)
            .await
            .is_ok_and(|c| c.id == self.config.id)
    }

    async fn snapshot_ids(&self) -> Result<Vec<String>, NativeError> {
        snapshot_ids(&self.source).await
    }

    async fn load_snapshots(&self, ids: Vec<String>) -> Result<Vec<Snapshot>, NativeError> {
        self.get_decoded("snapshots", ids, decode_snapshot).await
    }

    /// The files `names` of `dir`, each fetched and decoded by `decode`.
    async fn get_decoded<T: Send + 'static>(
        &self,
        dir: &'static str,
        names: Vec<String>,
        decode: fn(&MasterKey, &mut Unpacker, &str, &[u8]) -> Result<T, NativeError>,
    ) -> Result<Vec<T>, NativeError> {
        let files = self.source.get_many(dir, names).await?;
        // Hashing, decrypting, decompressing and parsing are CPU work: spread them over the
        // blocking pool in batches instead of running them on one async worker.
        let tasks = files.chunks(DECODE_BATCH).map(|batch| {
            let (batch, key) = (batch.to_vec(), self.key.clone());
            tokio::task::spawn_blocking(move || {
                let mut unpacker = Unpacker::default();
                batch
                    .iter()
                    .map(|(id, bytes)| decode(&key, &mut unpacker, id, bytes))
                    .collect::<Result<Vec<_>, _>>()
            })
        });
        let mut out = Vec::with_capacity(files.len());
        for batch in futures::future::join_all(tasks).await {
            out.extend(batch.map_err(|e| NativeError::Store(e.to_string()))??);
        }
        Ok(out)
    }

    /// Every snapshot, oldest first, with the fields and values `restic snapshots --json`
    /// prints. Snapshots already read are served from memory.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, NativeError> {
        let ids = self.snapshot_ids().await?;
        let missing: Vec<String> = {
            let cache = lock(&self.snapshots);
            ids.iter()
                .filter(|id| !cache.contains_key(*id))
                .cloned()
                .collect()
        };
        let loaded = self.load_snapshots(missing).await?;
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
        let ids = self.snapshot_ids().await?;
        let mut matches = ids.iter().filter(|id| id.starts_with(id_prefix));
        let id = match (matches.next(), matches.next()) {
            (Some(id), None) => id.clone(),
            (Some(_), Some(_)) => return Err(NativeError::AmbiguousSnapshot(id_prefix.into())),
            (None, _) => return Err(NativeError::NoSuchSnapshot(id_prefix.into())),
        };
        if let Some(s) = lock(&self.snapshots).get(&id) {
            return Ok(s.clone());
        }
        let s = self.load_snapshots(vec![id.clone()]).await?;
        let s = s
            .into_iter()
            .next()
            .ok_or(NativeError::NoSuchSnapshot(id.clone()))?;
        lock(&self.snapshots).insert(id, s.clone());
        Ok(s)
    }
}

/// A repository file named by the SHA-256 of its content (an index or a snapshot),
/// checked, decrypted, unpacked and parsed as JSON.
fn open_file<T: serde::de::DeserializeOwned>(
    key: &MasterKey,
    unpacker: &mut Unpacker,
    kind: &'static str,
    id: &str,
    sealed: &[u8],
) -> Result<T, NativeError> {
    if hex::encode(Sha256::digest(sealed)) != id {
        return Err(NativeError::HashMismatch {
            kind,
            id: id.to_owned(),
        });
    }
    let plain = unpacker.unpack(key.decrypt(sealed)?, kind)?;
    serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
        what: kind,
        reason: e.to_string(),
    })
}

fn decode_snapshot(
    key: &MasterKey,
    unpacker: &mut Unpacker,
    id: &str,
    bytes: &[u8],
) -> Result<Snapshot, NativeError> {
    let mut snapshot: Snapshot = open_file(key, unpacker, "snapshot", id, bytes)?;
    snapshot.id = id.to_owned();
    snapshot.short_id = id[..8].to_owned();
    Ok(snapshot)
}

async fn read_config(source: &Source, key: &MasterKey) -> Result<RepoConfig, NativeError> {
    let sealed = source
        .get("config".into())
        .await?
        .ok_or_else(|| NativeError::NotFound(source.describe("config")))?;
    let plain = unpack(key.decrypt(&sealed)?, "config")?;
    serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
        what: "config",
        reason: e.to_string(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the map half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// restic lists snapshots by time, oldest first.
fn sort_like_restic(snapshots: &mut [Snapshot]) {
    snapshots.sort_by_cached_key(|s| (s.time.parse::<jiff::Timestamp>().ok(), s.id.clone()));
}

async fn open_master_key(source: &Source, password: &[u8]) -> Result<MasterKey, NativeError> {
    let names = source.list("keys").await?;
    if names.is_empty() {
        return Err(NativeError::NotFound(source.describe("config")));
    }
    for (_, bytes) in source.get_many("keys", names).await? {
        let id = cache_key(&bytes, password);
        if let Some(key) = lock(key_cache()).get(&id) {
            return Ok(key.clone());
        }
        let _slot = derivations()
            .acquire()
            .await
            .map_err(|e| NativeError::Store(format!("key derivation slots closed: {e}")))?;
        // Another open of the same repository may have derived it while this one waited.
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
            // object_store's HTTP client is built without a TLS crypto provider; install
            // ring's unless the process already chose one.
            let _ = rustls::crypto::ring::default_provider().install_default();
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
                // Path-style requests work with every S3 server; virtual hosts need DNS.
                .with_virtual_hosted_style_request(false)
                // The client options carry allow_http too: set both here, or one is lost.
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_allow_http(url.starts_with("http://"))
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
