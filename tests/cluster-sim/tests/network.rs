//! Services reach pods through their endpoints: the EndpointSlice and endpoints controllers
//! list a Deployment's pods by readiness, and kube-sim reaches an aggregated API server and
//! an admission webhook running in a pod through the Service's EndpointSlices, checked with
//! kubectl as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use base64::Engine;
use common::{Sim, http_get, images, pod_names};
use serde_json::Value;

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: app
          image: example.test/sim-test-server:1
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /readyz, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, labels: {tier: front}}
spec:
  selector: {app: web}
  ports: [{name: web, port: 80, targetPort: http}]
"#;

/// The Service's EndpointSlices, as `kubectl get endpointslices -l kubernetes.io/service-name=web`.
async fn slices(sim: &Sim) -> Result<Vec<Value>> {
    let v = sim
        .json(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
        ])
        .await?;
    Ok(v["items"].as_array().cloned().unwrap_or_default())
}

/// pod name → (ready, serving, terminating) of the one slice's endpoints.
fn conditions(slice: &Value) -> std::collections::BTreeMap<String, (bool, bool, bool)> {
    slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let c = &e["conditions"];
            (
                e["targetRef"]["name"].as_str().unwrap_or("").to_owned(),
                (
                    c["ready"] == true,
                    c["serving"] == true,
                    c["terminating"] == true,
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_lists_its_pods_by_readiness_in_endpoint_slices() -> Result<()> {
    let sim = Sim::start_with(2, images()).await?;
    sim.apply(WEB).await?;
    let pods = sim
        .until("two pods with addresses", || async {
            let v = sim.json(&["get", "pods", "-l", "app=web"]).await?;
            let ips: Vec<(String, String)> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p["metadata"]["name"].as_str()?.to_owned(),
                        p["status"]["podIP"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            Ok((ips.len() == 2).then_some(ips))
        })
        .await?;
    let svc = sim.json(&["get", "service", "web"]).await?;
    // Both pods are listed, not ready, while their probes fail.
    let slice = sim
        .until("a slice with both pods", || async {
            let s = slices(&sim).await?;
            Ok((s.len() == 1 && conditions(&s[0]).len() == 2).then(|| s[0].clone()))
        })
        .await?;
    assert!(
        conditions(&slice)
            .values()
            .all(|c| *c == (false, false, false)),
        "{slice}"
    );
    let labels = &slice["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/service-name"], "web");
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        "endpointslice-controller.k8s.io"
    );
    assert_eq!(labels["tier"], "front", "the Service's labels are copied");
    assert!(
        slice["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web-")
    );
    assert_eq!(slice["addressType"], "IPv4");
    let owner = &slice["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["uid"]),
        (&"Service".into(), &"web".into(), &svc["metadata"]["uid"])
    );
    assert_eq!(
        (&owner["controller"], &owner["blockOwnerDeletion"]),
        (&true.into(), &true.into())
    );
    // The named targetPort resolved to the container's port.
    assert_eq!(
        slice["ports"],
        serde_json::json!([{"name": "web", "port": 8080, "protocol": "TCP"}])
    );
    for e in slice["endpoints"].as_array().unwrap() {
        let (name, ip) = pods
            .iter()
            .find(|(n, _)| e["targetRef"]["name"] == n.as_str())
            .unwrap();
        assert_eq!(e["addresses"], serde_json::json!([ip]), "{name}");
        assert!(e["nodeName"].as_str().unwrap().starts_with("node-"));
    }
    // Ready once the probes pass, in the slice and in the legacy Endpoints.
    for (_, ip) in &pods {
        assert_eq!(http_get(ip, "/ready-now").await?.0, 200);
    }
    sim.until("both endpoints ready", || async {
        let s = slices(&sim).await?;
        Ok((s.len() == 1
            && conditions(&s[0])
                .values()
                .all(|c| *c == (true, true, false))
            && conditions(&s[0]).len() == 2)
            .then_some(()))
    })
    .await?;
    // Pods reach each other at their addresses.
    let target = format!("/get?{}:8080/readyz", pods[1].1);
    assert_eq!(http_get(&pods[0].1, &target).await?, (200, "200".into()));
    // And reach the Service at its cluster IP, on the Service's port.
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap();
    let target = format!("/get?{cluster_ip}:80/readyz");
    sim.until("the Service's cluster IP to answer", || async {
        let (code, body) = http_get(&pods[0].1, &target).await?;
        Ok((code == 200 && body == "200").then_some(()))
    })
    .await?;
    let ep = sim
        .until("the Endpoints with both addresses", || async {
            let ep = sim.json(&["get", "endpoints", "web"]).await?;
            let n = ep["subsets"][0]["addresses"].as_array().map_or(0, Vec::len);
            Ok((n == 2).then_some(ep))
        })
        .await?;
    assert_eq!(
        ep["subsets"][0]["ports"],
        serde_json::json!([{"name": "web", "port": 8080, "protocol": "TCP"}])
    );
    assert_eq!(ep["metadata"]["labels"]["tier"], "front");
    let table = sim.kubectl(&["get", "endpoints", "web"]).await?;
    for (_, ip) in &pods {
        assert!(table.contains(&format!("{ip}:8080")), "{table}");
    }
    // A pod whose probe fails again is kept, not ready; the other is deleted and goes.
    let (unready, unready_ip) = &pods[0];
    let (deleted, _) = &pods[1];
    assert_eq!(http_get(unready_ip, "/unready-now").await?.0, 200);
    sim.kubectl(&["delete", "pod", deleted]).await?;
    let slice = sim
        .until("the unready pod kept and the deleted one gone", || async {
            let s = slices(&sim).await?;
            let Some(s) = s.first() else { return Ok(None) };
            let c = conditions(s);
            Ok(
                (c.get(unready) == Some(&(false, false, false)) && !c.contains_key(deleted))
                    .then(|| s.clone()),
            )
        })
        .await?;
    let current = pod_names(&sim, "default", "app=web").await?;
    for name in conditions(&slice).keys() {
        assert!(
            current.contains(name),
            "{name} is not a pod of web: {current:?}"
        );
    }
    let ep = sim
        .until("the Endpoints without the deleted pod", || async {
            let ep = sim.json(&["get", "endpoints", "web"]).await?;
            let s = ep.to_string();
            Ok((!s.contains(deleted.as_str()) && s.contains(unready.as_str())).then_some(ep))
        })
        .await?;
    let not_ready: Vec<&str> = ep["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["notReadyAddresses"].as_array().into_iter().flatten())
        .filter_map(|a| a["targetRef"]["name"].as_str())
        .collect();
    assert!(not_ready.contains(&unready.as_str()), "{ep}");
    // Deleting the Service takes its slices (owner references) and its Endpoints.
    sim.kubectl(&["delete", "service", "web"]).await?;
    sim.until("the slices and Endpoints gone", || async {
        let none =
            slices(&sim).await?.is_empty() && sim.get(&["endpoints", "web"]).await?.is_none();
        Ok(none.then_some(()))
    })
    .await?;
    sim.stop().await;
    Ok(())
}

/// An extension API server and a webhook in one pod of the test image, behind Service `ext`.
fn ext(ca: &kube_sim::tls::Ca) -> String {
    let id = ca.serving(&["ext.default.svc"]).unwrap();
    let indent = |pem: &str| pem.trim().replace('\n', "\n    ");
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: ext-tls, namespace: default}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
    {crt}
  tls.key: |
    {key}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: ext, namespace: default}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: ext}}}}
  template:
    metadata: {{labels: {{app: ext}}}}
    spec:
      containers:
        - name: app
          image: example.test/sim-test-server:1
          ports: [{{name: https, containerPort: 8443}}]
          env:
            - {{name: TLS_DIR, value: /tls}}
            - {{name: CLIENT_CA, value: /front-proxy/requestheader-client-ca-file}}
          volumeMounts:
            - {{name: tls, mountPath: /tls, readOnly: true}}
            - {{name: front-proxy, mountPath: /front-proxy, readOnly: true}}
      volumes:
        - {{name: tls, secret: {{secretName: ext-tls}}}}
        - {{name: front-proxy, configMap: {{name: front-proxy-ca}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: default}}
spec:
  selector: {{app: ext}}
  ports: [{{name: https, port: 443, targetPort: https}}]
"#,
        crt = indent(&id.cert_pem),
        key = indent(&id.key_pem),
    )
}

fn registrations(ca_pem: &str) -> String {
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        r#"
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: v1.sim.test.io}}
spec:
  group: sim.test.io
  version: v1
  groupPriorityMinimum: 1000
  versionPriority: 15
  service: {{namespace: default, name: ext, port: 443}}
  caBundle: {bundle}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: ext}}
webhooks:
  - name: ext.sim.test.io
    clientConfig:
      service: {{namespace: default, name: ext, port: 443, path: /validate}}
      caBundle: {bundle}
    rules: [{{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}}]
    objectSelector: {{matchLabels: {{checked: "yes"}}}}
    sideEffects: None
    admissionReviewVersions: [v1]
    failurePolicy: Fail
"#
    )
}

fn configmap(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: default, labels: {{checked: \"yes\"}}}}\n"
    )
}

async fn available(sim: &Sim) -> Result<Value> {
    let v = sim.json(&["get", "apiservice", "v1.sim.test.io"]).await?;
    Ok(v["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Available")
        .cloned()
        .unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregated_api_and_a_webhook_are_reached_through_their_service() -> Result<()> {
    let sim = Sim::start_with(1, images()).await?;
    // The front-proxy CA, as an extension server reads it from kube-system.
    let front_proxy = sim
        .kubectl(&[
            "get",
            "configmap",
            "-n",
            "kube-system",
            "extension-apiserver-authentication",
            "-o",
            "jsonpath={.data.requestheader-client-ca-file}",
        ])
        .await?;
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("requestheader-client-ca-file");
    std::fs::write(&ca_file, front_proxy)?;
    sim.kubectl(&[
        "create",
        "configmap",
        "front-proxy-ca",
        &format!("--from-file={}", ca_file.display()),
    ])
    .await?;
    let ca = kube_sim::tls::Ca::new("ext-ca")?;
    sim.apply(&ext(&ca)).await?;
    sim.apply(&registrations(&ca.pem)).await?;
    let cond = sim
        .until("the APIService Available", || async {
            let c = available(&sim).await?;
            Ok((c["status"] == "True").then_some(c))
        })
        .await?;
    assert_eq!(cond["reason"], "Passed");
    assert_eq!(cond["message"], "all checks passed");
    // Proxied to the pod, verified with the caBundle, as the caller with the front-proxy
    // certificate.
    let disco: Value = serde_json::from_str(
        &sim.kubectl(&["get", "--raw", "/apis/sim.test.io/v1"])
            .await?,
    )?;
    assert_eq!(disco["groupVersion"], "sim.test.io/v1");
    let who: Value = serde_json::from_str(
        &sim.kubectl(&["get", "--raw", "/apis/sim.test.io/v1/whoamis"])
            .await?,
    )?;
    assert_eq!(who["user"], serde_json::json!([kube_sim::ADMIN_USER]));
    assert!(
        who["groups"]
            .as_array()
            .unwrap()
            .contains(&"system:masters".into()),
        "{who}"
    );
    assert_eq!(who["clientCertificate"]["commonName"], "front-proxy-client");
    // The discovery check does not verify the serving certificate; proxied requests do.
    let other = kube_sim::tls::Ca::new("another-ca")?;
    sim.apply(
        &registrations(&other.pem)
            .split("---")
            .next()
            .unwrap()
            .replace("v1.sim.test.io", "v2.sim.test.io")
            .replace("version: v1", "version: v2"),
    )
    .await?;
    sim.until("the second APIService Available", || async {
        let v = sim.json(&["get", "apiservice", "v2.sim.test.io"]).await?;
        Ok((v["status"]["conditions"][0]["status"] == "True").then_some(()))
    })
    .await?;
    let err = sim
        .kubectl(&["get", "--raw", "/apis/sim.test.io/v2/whoamis"])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("ServiceUnavailable"), "{err:#}");
    // The webhook, reached the same way, decides.
    sim.apply(&configmap("ok-me")).await?;
    let refused = sim.apply(&configmap("deny-me")).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("sim-test-server refuses deny-me"),
        "{refused:#}"
    );
    assert!(sim.get(&["configmap", "deny-me"]).await?.is_none());
    // Without pods the APIService is unavailable for the reason kube-apiserver gives, its
    // requests are refused, and the webhook cannot be called.
    sim.kubectl(&["scale", "deployment", "ext", "--replicas=0"])
        .await?;
    let cond = sim
        .until("the APIService unavailable", || async {
            let c = available(&sim).await?;
            Ok((c["status"] == "False").then_some(c))
        })
        .await?;
    assert_eq!(cond["reason"], "MissingEndpoints");
    assert_eq!(
        cond["message"],
        "endpointslices for service/ext in \"default\" have no addresses with port name \"https\""
    );
    let err = sim
        .kubectl(&["get", "--raw", "/apis/sim.test.io/v1/whoamis"])
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("ServiceUnavailable"), "{err:#}");
    let err = sim.apply(&configmap("ok-again")).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no endpoints available for service \"ext\""),
        "{err:#}"
    );
    // A Service that is gone is named as such.
    sim.kubectl(&["delete", "service", "ext"]).await?;
    let cond = sim
        .until("ServiceNotFound", || async {
            let c = available(&sim).await?;
            Ok((c["reason"] == "ServiceNotFound").then_some(c))
        })
        .await?;
    assert_eq!(cond["message"], "service/ext in \"default\" is not present");
    sim.stop().await;
    Ok(())
}
