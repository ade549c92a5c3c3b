//! The exclusive per-repository Lease: retention (`restic forget --prune`) holds it, and no
//! backup is assigned into a repository while it is held, so a prune never races a backup.
//! Leases live in the operator's namespace, named from a hash of the repository's key.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};

use crate::context::Ctx;
use crate::error::{Error, is_conflict, is_not_found};

/// How long a holder may go without renewing before the Lease counts as free.
pub const DURATION: Duration = Duration::from_secs(120);

pub fn lease_name(repo_key: &str) -> String {
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(repo_key.as_bytes()));
    format!("stash-repository-{}", &digest[..16])
}

fn api(ctx: &Ctx) -> Api<Lease> {
    Api::namespaced(ctx.client.clone(), &ctx.args.namespace)
}

/// Whether someone holds the repository's Lease (and has renewed it in time), as a watch of
/// the operator's Leases last saw it: asking the API server, every session of a burst read it
/// once. A Lease taken a moment ago by this process is also behind its in-process repository
/// lock, which planning holds.
pub async fn held_in(leases: &Store<Lease>, ctx: &Ctx, repo_key: &str) -> Result<bool, Error> {
    // Before the first listing an empty cache would say "free".
    leases
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheStopped {
            what: "repository Leases",
        })?;
    let key = ObjectRef::new(&lease_name(repo_key)).within(&ctx.args.namespace);
    Ok(leases.get(&key).is_some_and(|l| is_held(&l)))
}

/// [`held_in`] asking the API server, for the rare caller without the watch (a restore
/// planned once).
pub async fn held(ctx: &Ctx, repo_key: &str) -> Result<bool, Error> {
    let lease = api(ctx)
        .get_opt(&lease_name(repo_key))
        .await
        .map_err(Error::kube("read the repository's Lease"))?;
    Ok(lease.is_some_and(|l| is_held(&l)))
}

fn is_held(lease: &Lease) -> bool {
    lease.spec.as_ref().is_some_and(|s| {
        s.holder_identity.as_deref().is_some_and(|h| !h.is_empty()) && still_valid(s)
    })
}

fn still_valid(s: &LeaseSpec) -> bool {
    let d = s
        .lease_duration_seconds
        .map_or(DURATION.as_secs() as i64, i64::from);
    s.renew_time.as_ref().is_some_and(|MicroTime(t)| {
        t.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(d))
            .is_ok_and(|end| end > Timestamp::now())
    })
}

/// Holds the Lease while alive (renewing it); deleting it when dropped.
#[derive(Debug)]
pub struct Held {
    renew: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    name: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renew.abort();
        let (api, name) = (self.api.clone(), self.name.clone());
        tokio::spawn(async move {
            if let Err(error) = api.delete(&name, &DeleteParams::default()).await
                && !is_not_found(&error)
            {
                tracing::warn!(%error, lease = %name, "cannot release the repository Lease; it expires by itself");
            }
        });
    }
}

/// Takes the Lease for this replica; `None` while someone else holds it.
pub async fn acquire(ctx: &Ctx, repo_key: &str) -> Result<Option<Held>, Error> {
    acquire_with(
        &ctx.client,
        &ctx.args.namespace,
        &ctx.args.pod_name,
        repo_key,
    )
    .await
}

/// [`acquire`] for callers without a reconciler's context: the Snapshot API's delete, which
/// any replica may serve.
pub async fn acquire_with(
    client: &kube::Client,
    namespace: &str,
    identity: &str,
    repo_key: &str,
) -> Result<Option<Held>, Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = lease_name(repo_key);
    let identity = identity.to_owned();
    let spec = || LeaseSpec {
        holder_identity: Some(identity.clone()),
        lease_duration_seconds: Some(DURATION.as_secs() as i32),
        acquire_time: Some(MicroTime(Timestamp::now())),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    };
    match api
        .get_opt(&name)
        .await
        .map_err(Error::kube("read the repository Lease"))?
    {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    annotations: Some(
                        [(
                            "stash.appscode.com/repository".to_owned(),
                            repo_key.to_owned(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(spec()),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => {}
                Err(e) if is_conflict(&e) => return Ok(None),
                Err(e) => return Err(Error::kube("create the repository Lease")(e)),
            }
        }
        Some(mut lease) => {
            let current = lease.spec.clone().unwrap_or_default();
            let mine = current.holder_identity.as_deref() == Some(identity.as_str());
            if !mine && still_valid(&current) {
                return Ok(None);
            }
            lease.spec = Some(spec());
            match api.replace(&name, &PostParams::default(), &lease).await {
                Ok(_) => {}
                Err(e) if is_conflict(&e) => return Ok(None),
                Err(e) => return Err(Error::kube("take the repository Lease")(e)),
            }
        }
    }
    let (renew_api, renew_name) = (api.clone(), name.clone());
    let renew = tokio::spawn(async move {
        loop {
            tokio::time::sleep(DURATION / 4).await;
            if let Ok(mut l) = renew_api.get(&renew_name).await
                && let Some(s) = l.spec.as_mut()
            {
                s.renew_time = Some(MicroTime(Timestamp::now()));
                let _ = renew_api
                    .replace(&renew_name, &PostParams::default(), &l)
                    .await;
            }
        }
    });
    Ok(Some(Held { renew, api, name }))
}
