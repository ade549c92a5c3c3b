//! Wakes the control loops: one watch per kind turns every change into a nudge for the
//! loops that read that kind. Loops are level-triggered (each pass lists afresh), so a
//! nudge carries no data and many coalesce into one pass.

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Bus {
    subs: Mutex<Vec<(Vec<&'static str>, Arc<Notify>)>>,
}

impl Bus {
    pub fn subscribe(&self, kinds: &[&'static str]) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((kinds.to_vec(), n.clone()));
        n
    }

    pub fn publish(&self, kind: &str) {
        let subs = self
            .subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (kinds, n) in subs.iter() {
            if kinds.contains(&kind) {
                n.notify_one();
            }
        }
    }
}

/// Watches every object of `K` and nudges the kind's subscribers on each event. The
/// watcher re-lists after errors by itself.
pub async fn watch_kind<K>(api: Api<K>, bus: Arc<Bus>, kind: &'static str)
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(_) => bus.publish(kind),
            Err(error) => {
                tracing::debug!(kind, %error, "watch failed; the watcher retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Runs `pass` whenever nudged, and at least every `period` (for what depends on time:
/// back-offs, schedules, minReadySeconds). Errors are logged and retried on the next pass.
pub async fn run_loop<F, Fut>(name: &'static str, nudge: Arc<Notify>, period: Duration, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::error::Result<()>>,
{
    loop {
        if let Err(error) = pass().await {
            if error.is_retryable() {
                tracing::debug!(loop_name = name, category = error.category(), %error, "pass failed");
            } else {
                tracing::warn!(loop_name = name, category = error.category(), %error, "pass failed");
            }
        }
        tokio::select! {
            _ = nudge.notified() => {}
            _ = tokio::time::sleep(period) => {}
        }
        // Let a burst of events land before the next pass.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}
