//! Leader election against kube-sim: one replica holds the Lease, another waits, a release
//! hands it over at once, and an expired holder loses it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use stash_controller::leader::Elector;

#[tokio::test]
async fn one_replica_leads_and_a_release_hands_over() -> anyhow::Result<()> {
    let sim = kube_sim::KubeSim::start(kube_sim::Options::default()).await?;
    let client = sim.client().await?;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("stash".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await?;
    let a = Elector::new(client.clone(), "stash", "stash-operator", "pod-a");
    let b = Elector::new(client.clone(), "stash", "stash-operator", "pod-b");
    assert!(
        a.try_acquire().await?,
        "the first replica takes a free Lease"
    );
    assert!(!b.try_acquire().await?, "a held Lease is not taken");
    assert!(a.try_acquire().await?, "the holder renews");
    let lease = Api::<Lease>::namespaced(client.clone(), "stash")
        .get("stash-operator")
        .await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("pod-a")
    );
    a.release().await;
    assert!(b.try_acquire().await?, "a released Lease is taken at once");
    // The new holder stops renewing: after the lease duration the other takes over, and the
    // old holder's keep() reports the loss instead of working on.
    let take_a = async {
        loop {
            if a.try_acquire().await.unwrap() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    // While b renews, a never gets the Lease.
    let raced = tokio::select! {
        lost = b.keep() => panic!("the holder lost a Lease it renews: {lost}"),
        r = tokio::time::timeout(Duration::from_secs(5), take_a) => r,
    };
    assert!(raced.is_err(), "a Lease that is renewed is never taken");
    // Once b stops renewing, its Lease expires (15 s) and a takes it; the bound only keeps a
    // broken election from hanging the test.
    tokio::time::timeout(Duration::from_secs(300), async {
        while !a.try_acquire().await.unwrap() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("an expired Lease is taken");
    let lost = tokio::time::timeout(Duration::from_secs(300), b.keep()).await?;
    assert!(lost.to_string().contains("lost the leader Lease"), "{lost}");
    Ok(())
}
