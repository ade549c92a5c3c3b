"""Every variation renders objects that are well formed and refer to each other correctly:
names, namespaces, labels, selectors, ports, volumes, ServiceAccounts, roles, Services."""

from __future__ import annotations

import re
from typing import Any

import chartlib
from conftest import VARIANTS, rendered_variant
import pytest

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # DNS-1035: Services
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

CLUSTER_SCOPED = {
    "ClusterRole", "ClusterRoleBinding", "APIService", "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration", "Namespace", "CustomResourceDefinition", "PriorityClass",
}
# A RoleBinding in kube-system is how an aggregated API server reads the API server's client CA.
OTHER_NAMESPACE = {("RoleBinding", "kube-system")}

EXPECTED_API_VERSIONS = {
    "ServiceAccount": "v1", "Service": "v1", "ClusterRole": "rbac.authorization.k8s.io/v1",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1", "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1", "Deployment": "apps/v1", "DaemonSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1", "APIService": "apiregistration.k8s.io/v1",
    "MutatingWebhookConfiguration": "admissionregistration.k8s.io/v1",
    "ValidatingWebhookConfiguration": "admissionregistration.k8s.io/v1",
    "Certificate": "cert-manager.io/v1", "Issuer": "cert-manager.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}


def workloads(r: chartlib.Rendered) -> list[dict[str, Any]]:
    return r.all("Deployment") + r.all("DaemonSet")


def pods_selected(r: chartlib.Rendered, selector: dict[str, str]) -> list[dict[str, Any]]:
    return [
        w for w in workloads(r)
        if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]


@pytest.fixture(params=sorted(VARIANTS))
def r(request: pytest.FixtureRequest) -> chartlib.Rendered:
    return rendered_variant(request.param)


def test_objects_are_well_formed(r: chartlib.Rendered) -> None:
    seen = set()
    for d in r.docs:
        kind, meta = d["kind"], d["metadata"]
        assert d["apiVersion"] == EXPECTED_API_VERSIONS[kind], kind
        name = meta["name"]
        assert DNS_SUBDOMAIN.match(name), f"{kind} name {name!r}"
        assert len(name) <= 253
        if kind == "Service":
            assert DNS_LABEL.match(name) and len(name) <= 63, f"Service name {name!r}"
        if kind in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{kind}/{name} is cluster-scoped"
        elif (kind, meta.get("namespace")) not in OTHER_NAMESPACE:
            assert meta.get("namespace") == chartlib.NAMESPACE, f"{kind}/{name}"
        key = (kind, meta.get("namespace"), name)
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        for k, v in (meta.get("labels") or {}).items():
            assert isinstance(v, str) and LABEL_VALUE.match(v) and len(v) <= 63, f"label {k}={v!r}"
        assert meta["labels"]["app.kubernetes.io/instance"] == chartlib.RELEASE


def test_no_template_leaks(r: chartlib.Rendered) -> None:
    for path, text in r.sources:
        for bad in ("<no value>", "{{", "}}", "%!", "e+0"):
            assert bad not in text, f"{path} contains {bad!r}:\n{text}"


def test_pod_templates_are_consistent(r: chartlib.Rendered) -> None:
    sas = {sa["metadata"]["name"] for sa in r.all("ServiceAccount")}
    for w in workloads(r):
        spec = w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert spec["serviceAccountName"] in sas
        vols = {v["name"] for v in spec.get("volumes", [])}
        names = [c["name"] for c in spec["containers"]]
        assert len(names) == len(set(names))
        for c in spec["containers"]:
            assert not c.get("securityContext", {}).get("privileged", False)
            ports = {p["name"]: p for p in c.get("ports", [])}
            for p in ports.values():
                assert len(p["name"]) <= 15 and 0 < p["containerPort"] < 65536
            for probe in ("livenessProbe", "readinessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, f"{c['name']} {probe}"
            env_names = [e["name"] for e in c.get("env", [])]
            assert len(env_names) == len(set(env_names)), f"{c['name']}: duplicate env"
            for e in c.get("env", []):
                assert ENV_NAME.match(e["name"])
                assert ("value" in e) != ("valueFrom" in e)
                if "value" in e:
                    assert isinstance(e["value"], str), f"{e['name']}={e['value']!r} is not a string"
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{c['name']} mounts unknown volume {m['name']}"
        for ps in spec.get("imagePullSecrets", []):
            assert set(ps) == {"name"}


def test_services_select_pods_with_their_ports(r: chartlib.Rendered) -> None:
    for svc in r.all("Service"):
        targets = pods_selected(r, svc["spec"]["selector"])
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        container_ports = {
            p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in container_ports, f"{svc['metadata']['name']}:{p['name']}"


def service_port(r: chartlib.Rendered, ref: dict[str, Any]) -> dict[str, Any]:
    assert ref["namespace"] == chartlib.NAMESPACE
    svc = r.get("Service", ref["name"])
    ports = [p for p in svc["spec"]["ports"] if p["port"] == ref.get("port", 443)]
    assert ports, f"Service {ref['name']} has no port {ref.get('port', 443)}"
    return ports[0]


def test_webhooks_and_apiservice_reach_the_operator_https_port(r: chartlib.Rendered) -> None:
    operator = r.get("Deployment", "stash-operator")
    https = [p for c in operator["spec"]["template"]["spec"]["containers"] for p in c.get("ports", []) if p["name"] == "https"]
    assert https == [{"name": "https", "containerPort": 8443, "protocol": "TCP"}]
    refs = [a["spec"]["service"] for a in r.all("APIService")]
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for cfg in r.all(kind):
            for wh in cfg["webhooks"]:
                refs.append(wh["clientConfig"]["service"])
                assert "caBundle" not in wh["clientConfig"], "the chart must not render certificates"
    assert refs
    for ref in refs:
        assert service_port(r, ref)["targetPort"] == "https"


def test_bindings_refer_to_existing_roles_and_accounts(r: chartlib.Rendered) -> None:
    sas = {(sa["metadata"]["namespace"], sa["metadata"]["name"]) for sa in r.all("ServiceAccount")}
    for b in r.all("ClusterRoleBinding") + r.all("RoleBinding"):
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        builtin = ref["name"] in ("system:auth-delegator", "extension-apiserver-authentication-reader")
        if not builtin:
            r.get(ref["kind"], ref["name"])
        if ref["kind"] == "Role" and not builtin:
            assert r.get("Role", ref["name"])["metadata"]["namespace"] == b["metadata"]["namespace"]
        for s in b["subjects"]:
            assert (s["namespace"], s["name"]) in sas, f"{b['metadata']['name']} binds unknown {s}"


def test_certificates_and_issuers_are_wired(r: chartlib.Rendered) -> None:
    issuers = {i["metadata"]["name"] for i in r.all("Issuer")}
    for cert in r.all("Certificate"):
        ref = cert["spec"]["issuerRef"]
        if ref["kind"] == "Issuer":
            assert ref["name"] in issuers
    for i in r.all("Issuer"):
        if "ca" in i["spec"]:
            assert any(c["spec"]["secretName"] == i["spec"]["ca"]["secretName"] for c in r.all("Certificate"))


def test_service_monitor_ports_exist(r: chartlib.Rendered) -> None:
    for sm in r.all("ServiceMonitor"):
        selected = [
            s for s in r.all("Service")
            if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        port_names = {p["name"] for s in selected for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in port_names


def test_every_variant_renders_notes(r: chartlib.Rendered) -> None:
    assert "kubectl" in r.notes and "<no value>" not in r.notes
