//! The endpoints controller and the routing kube-proxy would program: each Service with a
//! selector gets an Endpoints object of its pods' addresses (not-ready ones apart), and
//! kube-sim's service proxy (webhooks, APIServices) is pointed at a ready endpoint.

use crate::error::Result;
use crate::util;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;

pub async fn pass(client: &Client, sim: &kube_sim::KubeSim) -> Result<()> {
    let services: Vec<Service> = util::list(&Api::all(client.clone()), "services").await?;
    let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
    let existing: Vec<Endpoints> = util::list(&Api::all(client.clone()), "endpoints").await?;
    for svc in services {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let members: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && util::pod_is_active(p))
            .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
            .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
            .collect();
        let address = |p: &Pod| {
            json!({
                "ip": p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                "nodeName": p.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p.name_any(), "uid": p.uid()},
            })
        };
        let target_port = |p: &Pod, sp: &k8s_openapi::api::core::v1::ServicePort| -> Option<i32> {
            match sp.target_port.as_ref() {
                None => Some(sp.port),
                Some(IntOrString::Int(i)) => Some(*i),
                Some(IntOrString::String(n)) => p
                    .spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|cp| cp.name.as_deref() == Some(n.as_str()))
                    .map(|cp| cp.container_port),
            }
        };
        let ready: Vec<&&Pod> = members.iter().filter(|p| util::pod_is_ready(p)).collect();
        let not_ready: Vec<&&Pod> = members.iter().filter(|p| !util::pod_is_ready(p)).collect();
        let ports: Vec<serde_json::Value> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|sp| {
                let tp = members.first().and_then(|p| target_port(p, sp))?;
                Some(json!({"name": sp.name, "port": tp, "protocol": sp.protocol.clone().unwrap_or_else(|| "TCP".into())}))
            })
            .collect();
        let subsets = if members.is_empty() {
            json!([])
        } else {
            let mut s = json!({"ports": ports});
            if !ready.is_empty() {
                s["addresses"] = json!(ready.iter().map(|p| address(p)).collect::<Vec<_>>());
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] =
                    json!(not_ready.iter().map(|p| address(p)).collect::<Vec<_>>());
            }
            json!([s])
        };
        // Route each Service port to the first ready pod, as kube-proxy's rules would.
        if let Some(p) = ready.first() {
            for sp in spec.ports.iter().flatten() {
                if let (Some(ip), Some(tp)) = (
                    p.status.as_ref().and_then(|s| s.pod_ip.clone()),
                    target_port(p, sp),
                ) {
                    sim.map_service(
                        &ns,
                        &name,
                        u16::try_from(sp.port).unwrap_or(0),
                        &format!("{ip}:{tp}"),
                    );
                }
            }
        }
        let api: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
        let current = existing
            .iter()
            .find(|e| e.namespace().as_deref() == Some(ns.as_str()) && e.name_any() == name);
        let body = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name, "namespace": ns, "labels": svc.labels()}, "subsets": subsets});
        match current {
            None => {
                let ep: Endpoints = serde_json::from_value(body).unwrap_or_default();
                util::create_if_absent(&api, &ep, &format!("Endpoints {ns}/{name}")).await?;
            }
            Some(e) => {
                let cur = serde_json::to_value(&e.subsets).unwrap_or_default();
                let cur = if cur.is_null() { json!([]) } else { cur };
                if cur != subsets {
                    util::merge_patch(
                        &api,
                        &name,
                        json!({"subsets": subsets}),
                        &format!("Endpoints {ns}/{name}"),
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}
