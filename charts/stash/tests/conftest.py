"""Fixtures of the chart tests: renders of the chart with the main variations of values."""

from __future__ import annotations

import copy
from typing import Any

import pytest

import chartlib

# Both admission webhooks, off by default (the operator does not serve them yet).
WEBHOOKS_ON: dict[str, Any] = {"validating": {"enabled": True}, "mutating": {"enabled": True}}

# The variations the issue names, plus the knobs that change rendered objects. Each one is
# rendered, linted strictly and checked for consistency; the tests of one feature pick theirs.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "webhooks-on": {"webhooks": WEBHOOKS_ON},
    "validating-only": {"webhooks": {"validating": {"enabled": True}}},
    "agent-off": {"agent": {"enabled": False}},
    # With the webhooks, so cert-manager's CA injection reaches every object that needs it.
    "cert-manager": {"certManager": {"enabled": True}, "webhooks": WEBHOOKS_ON},
    "cert-manager-cluster-issuer": {
        "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
    },
    "custom-kubelet-root": {"agent": {"kubeletRoot": "/var/lib/k0s/kubelet/"}},
    "replicas": {"operator": {"replicas": 3}},
    "backup-only-no-io-uring": {"agent": {"restore": {"inPlace": False}, "ioUring": "off"}},
    "local-repositories": {"localRepositories": {"hostPaths": ["/var/lib/stash-repositories", "/srv/backups/"]}},
    "everything": {
        "logLevel": "info,stash_node_agent=debug",
        "logFormat": "json",
        "image": {"registry": "registry.example.com/team", "tag": "v9.9.9"},
        "imagePullSecrets": ["regcred", {"name": "other-cred"}],
        "commonLabels": {"team": "storage"},
        "operator": {
            "replicas": 2,
            "priorityClassName": "system-cluster-critical",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "stash@p.iam"}},
        },
        "agent": {
            "priorityClassName": "system-node-critical",
            "ioBudget": {"bytesPerSecond": "50Mi", "iops": 2000},
            "maxConcurrentVolumes": 4,
            "readMode": "stream",
            "cgroupRoot": "",
            "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/stash-agent.json"},
            "tolerations": [],
            "logLevel": "debug",
        },
        "pushgateway": {"enabled": False, "url": "http://pushgateway.monitoring.svc:9091"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "webhooks": {**WEBHOOKS_ON, "timeoutSeconds": 5, "excludeNamespaces": ["flux-system", "stash"]},
        "certManager": {"enabled": True},
    },
}


_cache: dict[str, chartlib.Rendered] = {}


def rendered_variant(name: str) -> chartlib.Rendered:
    if name not in _cache:
        _cache[name] = chartlib.render(copy.deepcopy(VARIANTS[name]))
    return _cache[name]


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, chartlib.Rendered]:
    return request.param, rendered_variant(request.param)


@pytest.fixture
def default() -> chartlib.Rendered:
    return rendered_variant("default")


@pytest.fixture
def webhooks_on() -> chartlib.Rendered:
    return rendered_variant("webhooks-on")


def render(values: dict[str, Any], **kwargs: Any) -> chartlib.Rendered:
    return chartlib.render(values, **kwargs)


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    containers = pod_owner["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert found, f"no container {name!r} in {[c['name'] for c in containers]}"
    return found[0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value (or the valueFrom mapping)."""
    out: dict[str, Any] = {}
    for e in c.get("env", []):
        assert e["name"] not in out, f"env {e['name']} appears twice"
        out[e["name"]] = e["value"] if "value" in e else e["valueFrom"]
    return out


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def volumes(pod_owner: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_owner["spec"]["template"]["spec"].get("volumes", [])}
