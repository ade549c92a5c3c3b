//! kube-controller-manager's EndpointSlice controller and its legacy endpoints controller:
//! each Service with a selector gets EndpointSlices and an Endpoints object listing its pods'
//! addresses, on the ports the Service's `targetPort`s name in each pod. Services without a
//! selector are left to whoever manages their endpoints.

use crate::error::{Error, Result};
use crate::util;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER_NAME: &str = "endpointslice-controller.k8s.io";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The Services seen on the last pass: the endpoints controller deletes a Service's
/// Endpoints when the Service goes, and only then (a user's Endpoints without a Service stay).
#[derive(Debug, Default)]
pub struct EndpointsController {
    known: Mutex<BTreeSet<(String, String)>>,
}

impl EndpointsController {
    pub async fn pass(&self, client: &Client) -> Result<()> {
        let services: Vec<Service> = util::list(&Api::all(client.clone()), "services").await?;
        let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
        let endpoints: Vec<Endpoints> = util::list(&Api::all(client.clone()), "endpoints").await?;
        let slices: Vec<EndpointSlice> =
            util::list(&Api::all(client.clone()), "endpointslices").await?;
        let now: BTreeSet<(String, String)> = services
            .iter()
            .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        let gone: Vec<(String, String)> = {
            let mut known = self
                .known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let gone = known.difference(&now).cloned().collect();
            *known = now;
            gone
        };
        for (ns, name) in gone {
            let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
            util::delete(&api, &name, &format!("Endpoints {ns}/{name}")).await?;
        }
        for svc in &services {
            let ns = svc.namespace().unwrap_or_default();
            let Some(selector) = svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            // `labels.Set(selector).AsSelectorPreValidated()`: every pair must match.
            let members: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
                .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                .collect();
            let own: Vec<&EndpointSlice> = slices
                .iter()
                .filter(|s| {
                    s.namespace().as_deref() == Some(ns.as_str())
                        && s.labels().get(SERVICE_NAME_LABEL) == Some(&svc.name_any())
                        && s.labels().get(MANAGED_BY_LABEL).map(String::as_str)
                            == Some(CONTROLLER_NAME)
                })
                .collect();
            sync_slices(client, svc, &members, &own).await?;
            let current = endpoints.iter().find(|e| {
                e.namespace().as_deref() == Some(ns.as_str()) && e.name_any() == svc.name_any()
            });
            sync_endpoints(client, svc, &members, current).await?;
        }
        Ok(())
    }
}

fn publish_not_ready(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false)
}

fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// `ShouldPodBeInEndpoints`: not Succeeded/Failed, has an address, and (unless terminating
/// pods are wanted) not being deleted [k8s.io/endpointslice util/controller_utils.go].
fn should_be_in_endpoints(pod: &Pod, include_terminating: bool) -> bool {
    if util::pod_is_terminal(pod) {
        return false;
    }
    if pod_ipv4s(pod).is_empty() {
        return false;
    }
    include_terminating || !util::is_deleting(pod)
}

fn pod_ipv4s(pod: &Pod) -> Vec<String> {
    let Some(st) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<String> = st
        .pod_ips
        .iter()
        .flatten()
        .map(|i| i.ip.clone())
        .filter(|ip| !ip.contains(':'))
        .collect();
    if ips.is_empty()
        && let Some(ip) = st.pod_ip.clone().filter(|ip| !ip.contains(':'))
    {
        ips.push(ip);
    }
    ips
}

/// `findPort`: a number is used as it is; a name is looked up among the containers' (and
/// sidecar init containers') ports of the same protocol.
fn find_port(pod: &Pod, sp: &ServicePort) -> Option<i32> {
    let proto = sp.protocol.as_deref().unwrap_or("TCP");
    match sp.target_port.as_ref() {
        None => Some(sp.port),
        Some(IntOrString::Int(i)) => Some(*i),
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == proto
                })
                .map(|cp| cp.container_port)
        }
    }
}

/// `ShouldSetHostname`: the pod names this Service as its subdomain.
fn hostname_for(pod: &Pod, svc: &Service) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let hostname = spec.hostname.clone().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == Some(svc.name_any().as_str())
        && pod.namespace() == svc.namespace())
    .then_some(hostname)
}

fn target_ref(pod: &Pod) -> Value {
    json!({"kind": "Pod", "namespace": pod.namespace(), "name": pod.name_any(), "uid": pod.uid()})
}

/// `getEndpointPorts`: one port per Service port that resolves in this pod.
fn slice_ports(svc: &Service, pod: &Pod) -> Vec<Value> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|sp| {
            let port = find_port(pod, sp)?;
            let mut p = json!({"name": sp.name.clone().unwrap_or_default(), "port": port,
                "protocol": sp.protocol.clone().unwrap_or_else(|| "TCP".into())});
            if let Some(a) = &sp.app_protocol {
                p["appProtocol"] = json!(a);
            }
            Some(p)
        })
        .collect()
}

/// `podToEndpoint`: `serving` is the pod's Ready condition, `terminating` its deletion, and
/// `ready` is serving and not terminating (or forced by `publishNotReadyAddresses`).
fn slice_endpoint(pod: &Pod, svc: &Service) -> Value {
    let serving = util::pod_is_ready(pod);
    let terminating = util::is_deleting(pod);
    let ready = publish_not_ready(svc) || (serving && !terminating);
    let mut ep = json!({
        "addresses": pod_ipv4s(pod),
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": target_ref(pod),
    });
    if let Some(n) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        ep["nodeName"] = json!(n);
    }
    if let Some(h) = hostname_for(pod, svc) {
        ep["hostname"] = json!(h);
    }
    ep
}

/// `setEndpointSliceLabels`: the Service's labels without the reserved ones, then the
/// headless label, the service name and the manager.
fn slice_labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = svc
        .labels()
        .iter()
        .filter(|(k, _)| {
            ![SERVICE_NAME_LABEL, MANAGED_BY_LABEL, HEADLESS_LABEL].contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let ip_set = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty() && ip != "None");
    if !ip_set {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels.insert(SERVICE_NAME_LABEL.into(), svc.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), CONTROLLER_NAME.into());
    labels
}

/// The desired slices: the Service's pods grouped by the ports they resolve to (a named
/// `targetPort` may differ between pods), endpoints in pod-name order, at most 100 a slice.
/// One placeholder slice without endpoints or ports when there are none [k8s.io/endpointslice
/// reconciler.go].
fn desired_slices(svc: &Service, members: &[&Pod]) -> Vec<(Vec<Value>, Vec<Value>)> {
    let mut pods: Vec<&&Pod> = members
        .iter()
        .filter(|p| should_be_in_endpoints(p, true))
        .collect();
    pods.sort_by_key(|p| p.name_any());
    let mut groups: BTreeMap<String, (Vec<Value>, Vec<Value>)> = BTreeMap::new();
    for p in pods {
        let ports = slice_ports(svc, p);
        let key = serde_json::to_string(&ports).unwrap_or_default();
        groups
            .entry(key)
            .or_insert_with(|| (ports, Vec::new()))
            .1
            .push(slice_endpoint(p, svc));
    }
    if groups.is_empty() {
        return vec![(Vec::new(), Vec::new())];
    }
    // At most `--max-endpoints-per-slice` (100) endpoints in a slice.
    groups
        .into_values()
        .flat_map(|(ports, eps)| {
            eps.chunks(MAX_ENDPOINTS_PER_SLICE)
                .map(|c| (ports.clone(), c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// kube-controller-manager's `--max-endpoints-per-slice` default.
const MAX_ENDPOINTS_PER_SLICE: usize = 100;

fn body_of(slice: &EndpointSlice) -> (Value, Value) {
    let ports = serde_json::to_value(slice.ports.clone().unwrap_or_default()).unwrap_or_default();
    let eps = serde_json::to_value(&slice.endpoints).unwrap_or_default();
    (ports, eps)
}

async fn sync_slices(
    client: &Client,
    svc: &Service,
    members: &[&Pod],
    existing: &[&EndpointSlice],
) -> Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let labels = slice_labels(svc);
    let owner = util::controller_ref(svc);
    let mut unmatched: Vec<&EndpointSlice> = existing
        .iter()
        .copied()
        // A slice of a Service of the same name that was deleted and made again goes.
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| o.uid == svc.uid().unwrap_or_default())
        })
        .collect();
    for stale in existing
        .iter()
        .filter(|s| !unmatched.iter().any(|u| u.name_any() == s.name_any()))
    {
        util::delete(
            &api,
            &stale.name_any(),
            &format!("EndpointSlice {ns}/{}", stale.name_any()),
        )
        .await?;
    }
    let mut pending = Vec::new();
    for (ports, eps) in desired_slices(svc, members) {
        let (pv, ev) = (json!(ports), json!(eps));
        // The slice with these ports, if there is one.
        if let Some(i) = unmatched.iter().position(|s| body_of(s).0 == pv) {
            let s = unmatched.remove(i);
            if body_of(s).1 != ev || s.labels() != &labels {
                replace_slice(&api, s, &labels, &pv, &ev).await?;
            }
        } else {
            pending.push((pv, ev));
        }
    }
    for (pv, ev) in pending {
        // A create becomes an update of a slice that would otherwise be deleted
        // (`finalize`), as a placeholder turning into the first real slice does.
        if !unmatched.is_empty() {
            let s = unmatched.remove(0);
            replace_slice(&api, s, &labels, &pv, &ev).await?;
            continue;
        }
        let mut body = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"generateName": format!("{name}-"), "namespace": ns, "labels": labels,
                "ownerReferences": [owner]},
            "addressType": "IPv4",
            "endpoints": ev,
        });
        if pv.as_array().is_some_and(|a| !a.is_empty()) {
            body["ports"] = pv;
        }
        let slice: EndpointSlice = serde_json::from_value(body).map_err(|e| Error::Invalid {
            action: "build an EndpointSlice",
            message: e.to_string(),
        })?;
        util::create(&api, &slice, &format!("an EndpointSlice of {ns}/{name}")).await?;
    }
    for s in unmatched {
        util::delete(
            &api,
            &s.name_any(),
            &format!("EndpointSlice {ns}/{}", s.name_any()),
        )
        .await?;
    }
    Ok(())
}

async fn replace_slice(
    api: &Api<EndpointSlice>,
    current: &EndpointSlice,
    labels: &BTreeMap<String, String>,
    ports: &Value,
    eps: &Value,
) -> Result<()> {
    let mut obj = serde_json::to_value(current).unwrap_or_default();
    obj["metadata"]["labels"] = json!(labels);
    obj["endpoints"] = eps.clone();
    obj["ports"] = if ports.as_array().is_some_and(|a| !a.is_empty()) {
        ports.clone()
    } else {
        Value::Null
    };
    let slice: EndpointSlice = serde_json::from_value(obj).map_err(|e| Error::Invalid {
        action: "build an EndpointSlice",
        message: e.to_string(),
    })?;
    let name = current.name_any();
    api.replace(&name, &PostParams::default(), &slice)
        .await
        .map_err(Error::kube(format!("update EndpointSlice {name}")))?;
    Ok(())
}

/// The endpoints controller's subsets: per pod and Service port, the address under
/// `addresses` (Ready, or `publishNotReadyAddresses`) or `notReadyAddresses`; then repacked
/// so addresses that share a port set share a subset, addresses sorted by IP
/// [k/k: pkg/controller/endpoint/endpoints_controller.go `syncService`, `addEndpointSubset`;
/// pkg/api/v1/endpoints `RepackSubsets`].
fn desired_subsets(svc: &Service, members: &[&Pod]) -> Value {
    let tolerate = publish_not_ready(svc);
    // address (as JSON) → (ready, ports)
    let mut addrs: BTreeMap<String, (Value, bool, BTreeSet<String>)> = BTreeMap::new();
    for pod in members
        .iter()
        .filter(|p| should_be_in_endpoints(p, tolerate))
    {
        let Some(ip) = pod_ipv4s(pod).into_iter().next() else {
            continue;
        };
        let mut a = json!({"ip": ip, "targetRef": target_ref(pod)});
        if let Some(n) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            a["nodeName"] = json!(n);
        }
        if let Some(h) = hostname_for(pod, svc) {
            a["hostname"] = json!(h);
        }
        let ready = tolerate || util::pod_is_ready(pod);
        let ports: BTreeSet<String> = slice_ports(svc, pod)
            .iter()
            .map(|p| p.to_string())
            .collect();
        let ports_declared = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .is_some_and(|p| !p.is_empty());
        if ports_declared && ports.is_empty() {
            continue;
        }
        let k = format!("{ip}/{}", pod.name_any());
        addrs.insert(k, (a, ready, ports));
    }
    // Ready and not-ready addresses per port set; `addrs` is already in address order.
    type Subset = (Vec<Value>, Vec<Value>);
    let mut subsets: BTreeMap<Vec<String>, Subset> = BTreeMap::new();
    for (_, (a, ready, ports)) in addrs {
        let entry = subsets.entry(ports.into_iter().collect()).or_default();
        if ready {
            entry.0.push(a);
        } else {
            entry.1.push(a);
        }
    }
    let out: Vec<Value> = subsets
        .into_iter()
        .map(|(ports, (ready, not_ready))| {
            let mut s = json!({});
            if !ready.is_empty() {
                s["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = json!(not_ready);
            }
            let ports: Vec<Value> = ports
                .iter()
                .filter_map(|p| serde_json::from_str::<Value>(p).ok())
                .map(|mut p| {
                    if p["name"] == "" {
                        p.as_object_mut().map(|m| m.remove("name"));
                    }
                    p
                })
                .collect();
            if !ports.is_empty() {
                s["ports"] = json!(ports);
            }
            s
        })
        .collect();
    json!(out)
}

async fn sync_endpoints(
    client: &Client,
    svc: &Service,
    members: &[&Pod],
    current: Option<&Endpoints>,
) -> Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
    let subsets = desired_subsets(svc, members);
    // The Service's labels, with the headless label when it has no cluster IP.
    let mut labels = svc.labels().clone();
    if is_headless(svc) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    match current {
        None => {
            let body = json!({"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "subsets": subsets});
            let ep: Endpoints = serde_json::from_value(body).map_err(|e| Error::Invalid {
                action: "build an Endpoints object",
                message: e.to_string(),
            })?;
            util::create_if_absent(&api, &ep, &format!("Endpoints {ns}/{name}")).await
        }
        Some(e) => {
            let cur =
                serde_json::to_value(e.subsets.clone().unwrap_or_default()).unwrap_or_default();
            if cur == subsets && e.labels() == &labels {
                return Ok(());
            }
            let mut obj = serde_json::to_value(e).unwrap_or_default();
            obj["metadata"]["labels"] = json!(labels);
            obj["subsets"] = subsets;
            let ep: Endpoints = serde_json::from_value(obj).map_err(|e| Error::Invalid {
                action: "build an Endpoints object",
                message: e.to_string(),
            })?;
            api.replace(&name, &PostParams::default(), &ep)
                .await
                .map_err(Error::kube(format!("update Endpoints {ns}/{name}")))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1"},
            "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.9",
                "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}]},
        }))
        .unwrap()
    }

    fn pod(i: usize, port: i32, ready: bool, deleting: bool) -> Pod {
        let mut p = json!({
            "metadata": {"name": format!("web-{i:03}"), "namespace": "ns", "uid": format!("p{i}")},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c",
                "ports": [{"name": "web", "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": format!("100.65.0.{}", i % 250 + 2),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn slices_hold_at_most_a_hundred_endpoints_per_port_set() {
        let pods: Vec<Pod> = (0..150)
            .map(|i| pod(i, if i < 120 { 8080 } else { 9090 }, true, false))
            .collect();
        let refs: Vec<&Pod> = pods.iter().collect();
        let slices = desired_slices(&svc(), &refs);
        let sizes: Vec<(i64, usize)> = slices
            .iter()
            .map(|(ports, eps)| (ports[0]["port"].as_i64().unwrap(), eps.len()))
            .collect();
        assert_eq!(sizes, [(8080, 100), (8080, 20), (9090, 30)]);
    }

    #[test]
    fn a_terminating_pod_is_serving_but_not_ready() {
        let pods = [pod(1, 8080, true, true), pod(2, 8080, false, false)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let slices = desired_slices(&svc(), &refs);
        let conds: Vec<&Value> = slices[0].1.iter().map(|e| &e["conditions"]).collect();
        assert_eq!(
            conds,
            [
                &json!({"ready": false, "serving": true, "terminating": true}),
                &json!({"ready": false, "serving": false, "terminating": false}),
            ]
        );
        // The legacy Endpoints leave the terminating pod out and list the other as not ready.
        let subsets = desired_subsets(&svc(), &refs);
        assert_eq!(
            subsets[0]["notReadyAddresses"][0]["targetRef"]["name"],
            "web-002"
        );
        assert!(subsets[0].get("addresses").is_none(), "{subsets}");
    }
}
