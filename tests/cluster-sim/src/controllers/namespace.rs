//! The serviceaccount and root-ca-cert-publisher controllers: every active namespace gets a
//! `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap with the API server's CA.

use crate::error::Result;
use crate::util;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;

pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

pub async fn pass(client: &Client, ca_pem: &str) -> Result<()> {
    let namespaces: Vec<Namespace> = util::list(&Api::all(client.clone()), "namespaces").await?;
    let sas: Vec<ServiceAccount> = util::list(&Api::all(client.clone()), "serviceaccounts").await?;
    let cms: Vec<ConfigMap> = util::list(&Api::all(client.clone()), "configmaps").await?;
    for ns in namespaces {
        let active = ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating");
        if !active || util::is_deleting(&ns) {
            continue;
        }
        let n = ns.name_any();
        let has = |names: &[(Option<String>, String)], want: &str| {
            names
                .iter()
                .any(|(o, m)| o.as_deref() == Some(n.as_str()) && m == want)
        };
        let sa_names: Vec<_> = sas.iter().map(|s| (s.namespace(), s.name_any())).collect();
        if !has(&sa_names, "default") {
            let sa = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some("default".into()),
                    namespace: Some(n.clone()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &n);
            util::create_if_absent(&api, &sa, &format!("ServiceAccount {n}/default")).await?;
        }
        let cm = cms.iter().find(|c| {
            c.namespace().as_deref() == Some(n.as_str()) && c.name_any() == ROOT_CA_CONFIGMAP
        });
        let want: BTreeMap<String, String> = [("ca.crt".to_owned(), ca_pem.to_owned())].into();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &n);
        match cm {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(ROOT_CA_CONFIGMAP.into()),
                        namespace: Some(n.clone()),
                        annotations: Some(
                            [(
                                "kubernetes.io/description".to_owned(),
                                "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_owned(),
                            )]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    data: Some(want),
                    ..Default::default()
                };
                util::create_if_absent(&api, &cm, &format!("ConfigMap {n}/{ROOT_CA_CONFIGMAP}"))
                    .await?;
            }
            Some(c) if c.data.as_ref() != Some(&want) => {
                util::merge_patch(
                    &api,
                    ROOT_CA_CONFIGMAP,
                    serde_json::json!({"data": want}),
                    &format!("ConfigMap {n}/{ROOT_CA_CONFIGMAP}"),
                )
                .await?;
            }
            Some(_) => {}
        }
    }
    Ok(())
}
