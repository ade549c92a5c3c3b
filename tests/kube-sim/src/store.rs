//! The object store: every object of every resource, one global resourceVersion counter, a
//! bounded event history per resource for watch resumption, and the live watchers.
//! Everything sits behind one lock so a write, its event and its fan-out are one atomic step.

use crate::registry::{Gr, Registry};
use crate::util::{finalizers_of, is_deleting, meta_mut, uid_of};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub struct Event {
    pub typ: EventType,
    pub rv: u64,
    pub obj: Arc<Value>,
    /// The object before the change, so selector watches can turn a label change into the
    /// ADDED/DELETED pair the real watch cache sends.
    pub old: Option<Arc<Value>>,
}

/// What a watcher's channel carries.
#[derive(Debug, Clone)]
pub enum WatchMsg {
    Event(Arc<Event>),
    Bookmark(u64),
    /// The `k8s.io/initial-events-end` bookmark of a streaming list.
    InitialEnd(u64),
    /// The history this watch would need is gone: send 410 and stop.
    Expired(u64),
}

#[derive(Debug, Default)]
pub struct Table {
    pub objects: BTreeMap<String, Arc<Value>>,
    pub history: VecDeque<Arc<Event>>,
    /// Watches may resume from any resourceVersion >= floor.
    pub floor: u64,
    pub watchers: Vec<mpsc::UnboundedSender<WatchMsg>>,
}

/// Where a new watch starts.
#[derive(Debug, Clone, Copy)]
pub enum WatchFrom {
    /// Synthetic ADDED for every current object, then changes (`resourceVersion` unset or 0).
    Initial { end_bookmark: bool },
    /// Changes after this resourceVersion.
    After(u64),
}

#[derive(Debug)]
pub struct State {
    pub rv: u64,
    pub tables: HashMap<Gr, Table>,
    pub registry: Registry,
    /// uid → where the object lives, for ownerReference lookups.
    pub uids: HashMap<String, (Gr, String)>,
    pub history_limit: usize,
    /// `namespace/name:port` → `host:port` for Services reached by webhooks and APIServices.
    pub service_map: HashMap<String, String>,
}

pub fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

pub fn key_of(obj: &Value) -> String {
    key(crate::util::namespace_of(obj), crate::util::name_of(obj))
}

impl State {
    pub fn new(history_limit: usize) -> Self {
        Self {
            rv: 1000,
            tables: HashMap::new(),
            registry: Registry::with_builtins(),
            uids: HashMap::new(),
            history_limit,
            service_map: HashMap::new(),
        }
    }

    pub fn table(&mut self, gr: &Gr) -> &mut Table {
        let rv = self.rv;
        self.tables.entry(gr.clone()).or_insert_with(|| Table {
            floor: rv,
            ..Table::default()
        })
    }

    pub fn get(&self, gr: &Gr, key: &str) -> Option<Arc<Value>> {
        self.tables.get(gr)?.objects.get(key).cloned()
    }

    /// Stores `obj` (a create or an update) with a fresh resourceVersion, or removes it when it
    /// is being deleted and nothing holds it any more. Returns the object as stored (or as
    /// finally deleted) and the event type.
    pub fn put(&mut self, gr: &Gr, mut obj: Value) -> (Arc<Value>, EventType) {
        let k = key_of(&obj);
        if is_deleting(&obj) && finalizers_of(&obj).is_empty() && !namespace_held(gr, &obj) {
            return (self.remove_with(gr, &k, Some(obj)), EventType::Deleted);
        }
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = uid_of(&obj).to_owned();
        let obj = Arc::new(obj);
        let table = self.table(gr);
        let old = table.objects.insert(k.clone(), obj.clone());
        let typ = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        if !uid.is_empty() {
            self.uids.insert(uid, (gr.clone(), k));
        }
        self.emit(gr, typ, rv, obj.clone(), old);
        (obj, typ)
    }

    /// Removes the object at `k` now. `last` is the final state to report (an update that
    /// dropped the last finalizer); otherwise the stored object is.
    pub fn remove_with(&mut self, gr: &Gr, k: &str, last: Option<Value>) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let table = self.table(gr);
        let old = table.objects.remove(k);
        let mut obj = match (last, &old) {
            (Some(v), _) => v,
            (None, Some(o)) => (**o).clone(),
            (None, None) => json!({}),
        };
        // The DELETED event carries the deletion's resourceVersion, as etcd's watch does.
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = uid_of(&obj).to_owned();
        self.uids.remove(&uid);
        let obj = Arc::new(obj);
        if old.is_some() {
            self.emit(gr, EventType::Deleted, rv, obj.clone(), old);
        }
        obj
    }

    fn emit(&mut self, gr: &Gr, typ: EventType, rv: u64, obj: Arc<Value>, old: Option<Arc<Value>>) {
        let limit = self.history_limit;
        let table = self.table(gr);
        let ev = Arc::new(Event { typ, rv, obj, old });
        table.history.push_back(ev.clone());
        while table.history.len() > limit {
            if let Some(dropped) = table.history.pop_front() {
                table.floor = dropped.rv;
            }
        }
        table
            .watchers
            .retain(|w| w.send(WatchMsg::Event(ev.clone())).is_ok());
    }

    /// Registers a watcher; fails with the floor when `from` is older than the history kept.
    pub fn watch(
        &mut self,
        gr: &Gr,
        from: WatchFrom,
        tx: mpsc::UnboundedSender<WatchMsg>,
    ) -> Result<(), u64> {
        let rv = self.rv;
        let table = self.table(gr);
        match from {
            WatchFrom::Initial { end_bookmark } => {
                for obj in table.objects.values() {
                    let ev = Arc::new(Event {
                        typ: EventType::Added,
                        rv,
                        obj: obj.clone(),
                        old: None,
                    });
                    let _ = tx.send(WatchMsg::Event(ev));
                }
                if end_bookmark {
                    let _ = tx.send(WatchMsg::InitialEnd(rv));
                }
            }
            WatchFrom::After(from) => {
                if from < table.floor {
                    return Err(table.floor);
                }
                // History is in rv order: skip what the client has seen.
                let start = table.history.partition_point(|e| e.rv <= from);
                for ev in table.history.iter().skip(start) {
                    let _ = tx.send(WatchMsg::Event(ev.clone()));
                }
            }
        }
        table.watchers.push(tx);
        Ok(())
    }

    /// Forgets all history and ends every open watch with 410 Gone, as an etcd compaction
    /// followed by a watch cache restart would.
    pub fn expire_watches(&mut self) {
        let rv = self.rv;
        for table in self.tables.values_mut() {
            table.history.clear();
            table.floor = rv;
            for w in table.watchers.drain(..) {
                let _ = w.send(WatchMsg::Expired(rv));
            }
        }
    }

    /// Sends a bookmark through `tx` in order with the events already queued on it.
    pub fn bookmark(&self, tx: &mpsc::UnboundedSender<WatchMsg>) -> bool {
        tx.send(WatchMsg::Bookmark(self.rv)).is_ok()
    }

    pub fn exists_uid(&self, uid: &str) -> bool {
        self.uids.contains_key(uid)
    }
}

// A namespace also waits for its spec.finalizers (the namespace controller's "kubernetes").
fn namespace_held(gr: &Gr, obj: &Value) -> bool {
    gr.group.is_empty()
        && gr.resource == "namespaces"
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gr() -> Gr {
        Gr {
            group: String::new(),
            resource: "configmaps".into(),
        }
    }

    #[test]
    fn watch_resumes_and_expires() {
        let mut s = State::new(3);
        for i in 0..5 {
            s.put(
                &gr(),
                json!({"metadata": {"name": format!("c{i}"), "namespace": "d", "uid": format!("u{i}")}}),
            );
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Only the last three events are kept: resuming from before them is refused.
        assert!(s.watch(&gr(), WatchFrom::After(1001), tx.clone()).is_err());
        s.watch(&gr(), WatchFrom::After(1003), tx).unwrap();
        let mut got = vec![];
        while let Ok(WatchMsg::Event(e)) = rx.try_recv() {
            got.push(e.rv);
        }
        assert_eq!(got, vec![1004, 1005]);
        s.expire_watches();
        assert!(matches!(rx.try_recv(), Ok(WatchMsg::Expired(_))));
    }

    #[test]
    fn deleting_without_finalizers_removes() {
        let mut s = State::new(10);
        s.put(
            &gr(),
            json!({"metadata": {"name": "a", "namespace": "d", "uid": "u", "finalizers": ["x"]}}),
        );
        let (_, t) = s.put(
            &gr(),
            json!({"metadata": {"name": "a", "namespace": "d", "uid": "u", "finalizers": ["x"], "deletionTimestamp": "2024-01-01T00:00:00Z"}}),
        );
        assert_eq!(t, EventType::Modified);
        let (_, t) = s.put(
            &gr(),
            json!({"metadata": {"name": "a", "namespace": "d", "uid": "u", "deletionTimestamp": "2024-01-01T00:00:00Z"}}),
        );
        assert_eq!(t, EventType::Deleted);
        assert!(s.get(&gr(), "d/a").is_none());
        assert!(!s.exists_uid("u"));
    }
}
