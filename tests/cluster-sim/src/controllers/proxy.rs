//! kube-proxy in its userspace mode (the original one, before iptables; there is no packet
//! filter on these machines to program): every TCP port of a Service with a cluster IP is a
//! listener at `<clusterIP>:<port>` in the cluster's router, where pods' traffic for that
//! address goes, and each connection is relayed to a ready endpoint of the Service's
//! EndpointSlices, taken round-robin [docs "Virtual IPs and Service Proxies", user space proxy
//! mode (Kubernetes 1.25 and older)].

use crate::error::{Error, Result};
use crate::kubelet::net::ClusterNet;
use crate::util;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A Service port: namespace, Service name, port name.
type PortKey = (String, String, String);

/// Each Service port's ready endpoint addresses.
type Table = Arc<RwLock<BTreeMap<PortKey, Vec<SocketAddr>>>>;

/// A Service port's listener; dropping it stops accepting.
struct Listener {
    ip: Ipv4Addr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Proxy {
    net: Arc<ClusterNet>,
    table: Table,
    /// `(clusterIP, port)` → what it serves and its listener.
    listeners: Mutex<BTreeMap<(Ipv4Addr, u16), (PortKey, Listener)>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(net: Arc<ClusterNet>) -> Self {
        Self {
            net,
            table: Table::default(),
            listeners: Mutex::default(),
        }
    }

    pub async fn pass(&self, client: &Client) -> Result<()> {
        let services: Vec<Service> = util::list(&Api::all(client.clone()), "services").await?;
        let slices: Vec<EndpointSlice> =
            util::list(&Api::all(client.clone()), "endpointslices").await?;
        let mut table = BTreeMap::new();
        for s in &slices {
            let Some(svc) = s.labels().get(super::endpoints::SERVICE_NAME_LABEL) else {
                continue;
            };
            let ns = s.namespace().unwrap_or_default();
            let ready: Vec<Ipv4Addr> = s
                .endpoints
                .iter()
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
                .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
                .collect();
            for p in s.ports.iter().flatten() {
                let (Some(port), name) = (p.port, p.name.clone().unwrap_or_default()) else {
                    continue;
                };
                let Ok(port) = u16::try_from(port) else {
                    continue;
                };
                let entry: &mut Vec<SocketAddr> =
                    table.entry((ns.clone(), svc.clone(), name)).or_default();
                entry.extend(ready.iter().map(|ip| SocketAddr::from((*ip, port))));
            }
        }
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table;
        let mut want = BTreeMap::new();
        for svc in &services {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let Some(ip) = spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if !matches!(
                spec.type_.as_deref().unwrap_or("ClusterIP"),
                "ClusterIP" | "NodePort" | "LoadBalancer"
            ) {
                continue;
            }
            for p in spec.ports.iter().flatten() {
                if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                let key = (
                    svc.namespace().unwrap_or_default(),
                    svc.name_any(),
                    p.name.clone().unwrap_or_default(),
                );
                want.insert((ip, port), key);
            }
        }
        self.reconcile(want)
    }

    fn reconcile(&self, want: BTreeMap<(Ipv4Addr, u16), PortKey>) -> Result<()> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stale: Vec<(Ipv4Addr, u16)> = listeners
            .iter()
            .filter(|(k, (serves, _))| want.get(k) != Some(serves))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some((_, l)) = listeners.remove(&k)
                && !listeners.values().any(|(_, o)| o.ip == l.ip)
            {
                let _ = self.net.router_address(l.ip, false);
            }
        }
        for ((ip, port), serves) in want {
            if listeners.contains_key(&(ip, port)) {
                continue;
            }
            if !listeners.values().any(|(_, o)| o.ip == ip) {
                self.net.router_address(ip, true)?;
            }
            let std_listener = self
                .net
                .in_router(move || {
                    let l = std::net::TcpListener::bind((ip, port))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .map_err(Error::io("listen for a Service", format!("{ip}:{port}")))?;
            let listener = tokio::net::TcpListener::from_std(std_listener)
                .map_err(Error::io("listen for a Service", format!("{ip}:{port}")))?;
            let task = tokio::spawn(relay(listener, self.table.clone(), serves.clone()));
            listeners.insert((ip, port), (serves, Listener { ip, task }));
        }
        Ok(())
    }
}

async fn relay(listener: tokio::net::TcpListener, table: Table, key: PortKey) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let backends = table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .cloned()
            .unwrap_or_default();
        // No endpoint: the connection is closed, as the userspace proxy did.
        if backends.is_empty() {
            continue;
        }
        let to = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}
