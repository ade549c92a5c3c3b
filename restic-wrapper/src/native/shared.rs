//! One open reader per repository and credentials in the process: the snapshots a reader
//! has decrypted are not fetched and decrypted again by the next caller (the agent's next
//! backup, the operator's next listing), and its key was derived once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use sha2::{Digest, Sha256};

use super::{NativeError, NativeRepository, lock};
use crate::backend::{Backend, Secrets};

type Readers = HashMap<[u8; 32], Arc<NativeRepository>>;

fn readers() -> &'static Mutex<Readers> {
    static READERS: OnceLock<Mutex<Readers>> = OnceLock::new();
    READERS.get_or_init(Default::default)
}

/// What a reader was opened with: the repository and every secret (a changed password or
/// credential opens a new reader).
fn fingerprint(backend: &Backend, secrets: &Secrets) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(backend.repository_string().as_bytes());
    for (k, v) in secrets.iter() {
        h.update([0]);
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.expose());
    }
    h.finalize().into()
}

/// Whether this process has a reader open for the repository.
pub fn is_open(backend: &Backend, secrets: &Secrets) -> bool {
    lock(readers()).contains_key(&fingerprint(backend, secrets))
}

fn cached(id: &[u8; 32]) -> Option<Arc<NativeRepository>> {
    lock(readers()).get(id).cloned()
}

async fn open(
    id: [u8; 32],
    backend: &Backend,
    secrets: &Secrets,
) -> Result<Arc<NativeRepository>, NativeError> {
    let reader = Arc::new(NativeRepository::open(backend, secrets).await?);
    lock(readers()).insert(id, reader.clone());
    Ok(reader)
}

/// Runs `use_it` on the process's reader of the repository, opening it first if needed. A
/// cached reader that fails is replaced once (the repository may have been recreated in
/// place, with another master key); a new reader's failure is the answer.
pub async fn with_reader<T, F>(
    backend: &Backend,
    secrets: &Secrets,
    use_it: impl Fn(Arc<NativeRepository>) -> F,
) -> Result<T, NativeError>
where
    F: Future<Output = Result<T, NativeError>>,
{
    let id = fingerprint(backend, secrets);
    if let Some(reader) = cached(&id) {
        match use_it(reader).await {
            Ok(v) => return Ok(v),
            Err(_) => {
                lock(readers()).remove(&id);
            }
        }
    }
    use_it(open(id, backend, secrets).await?).await
}

/// The process's reader of the repository, opened if needed. A cached one is first checked
/// against the repository's config file (one read), so a reader handed out here never
/// belongs to a repository since wiped and initialised again.
pub async fn reader(
    backend: &Backend,
    secrets: &Secrets,
) -> Result<Arc<NativeRepository>, NativeError> {
    let id = fingerprint(backend, secrets);
    match cached(&id) {
        Some(reader) if reader.is_current().await => Ok(reader),
        _ => open(id, backend, secrets).await,
    }
}
