//! Leader election on a `coordination.k8s.io` Lease, as client-go does it: a replica takes
//! the Lease when it is free or its holder stopped renewing it for `LEASE_DURATION`, renews it
//! every `RETRY_PERIOD`, and gives up leadership (the process exits, so nothing half-done
//! continues) when it could not renew for `RENEW_DEADLINE`. On shutdown it releases the
//! Lease so the next replica need not wait for it to expire.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{Error, is_conflict, is_not_found};

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// One replica's claim on a Lease.
#[derive(Clone, Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

/// What the holder fields of a Lease say, decided purely from them and the clock.
pub fn may_take(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let duration = spec
        .lease_duration_seconds
        .map_or(LEASE_DURATION.as_secs() as i64, i64::from);
    match &spec.renew_time {
        Some(MicroTime(renewed)) => renewed
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(duration))
            .is_ok_and(|expiry| expiry < now),
        None => true,
    }
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
        }
    }

    /// One attempt to take or renew the Lease; `Ok(true)` when this replica holds it.
    pub async fn try_acquire(&self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        match self.api.get(&self.name).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(mine(0, None)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(Error::kube("create the leader Lease")(e)),
                }
            }
            Err(e) => Err(Error::kube("read the leader Lease")(e)),
            Ok(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                if !may_take(&spec, &self.identity, now) {
                    return Ok(false);
                }
                let held = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!held);
                lease.spec = Some(mine(
                    transitions,
                    if held { spec.acquire_time } else { None },
                ));
                // The resourceVersion read above makes this a compare-and-swap: two replicas
                // taking an expired Lease at once cannot both succeed.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(false),
                    Err(e) => Err(Error::kube("renew the leader Lease")(e)),
                }
            }
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "cannot take the leader Lease yet"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    /// Renews the Lease until a renewal has failed for `RENEW_DEADLINE`; then returns the
    /// error, and the caller stops working as the leader.
    pub async fn keep(&self) -> Error {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            match self.try_acquire().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    return Error::LostLeadership {
                        lease: self.name.clone(),
                    };
                }
                Err(error) => tracing::warn!(%error, "cannot renew the leader Lease"),
            }
            if last_renewed.elapsed() > RENEW_DEADLINE {
                return Error::LostLeadership {
                    lease: self.name.clone(),
                };
            }
        }
    }

    /// Gives the Lease up (holder cleared), so a successor takes it at once.
    pub async fn release(&self) {
        let Ok(mut lease) = self.api.get(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Err(error) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(%error, "cannot release the leader Lease; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_lease_is_free_when_unheld_mine_or_expired() {
        let now = Timestamp::from_second(1_000).unwrap();
        let held_by = |who: &str, renewed: i64| LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        };
        assert!(may_take(&LeaseSpec::default(), "a", now));
        assert!(may_take(&held_by("a", 999), "a", now));
        assert!(!may_take(&held_by("b", 990), "a", now));
        assert!(may_take(&held_by("b", 984), "a", now));
    }
}
