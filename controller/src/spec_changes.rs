//! Watches that report what another kind's reconciler reads of an object: its spec (the
//! generation) and its existence, not its status. A Repository's status write used to start
//! the reconcile of every BackupConfiguration that names it, and each of their status writes
//! one of the Repository again: reconcile amplification across the two kinds.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

/// The objects of `api` as they appear, change generation, or go away.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let mut seen: HashMap<String, Option<i64>> = HashMap::new();
    watcher(api, config)
        .default_backoff()
        .filter_map(move |event| {
            let out = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    let generation = o.meta().generation;
                    let first_or_new =
                        seen.insert(o.uid().unwrap_or_default(), generation) != Some(generation);
                    // A deleting object keeps its generation; its deletion still counts.
                    (first_or_new || o.meta().deletion_timestamp.is_some()).then_some(Ok(o))
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen.remove(&o.uid().unwrap_or_default());
                    Some(Ok(o))
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => Some(Err(e)),
            };
            std::future::ready(out)
        })
}
