"""Helm's strict lint is clean for every variation, and the schema refuses bad values with a
message that names the key."""

from __future__ import annotations

import copy
from typing import Any

import helm_python as helm
import pytest

import chartlib
from conftest import VARIANTS


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_strict_lint_is_clean(name: str) -> None:
    report = helm.lint(chartlib.CHART, copy.deepcopy(VARIANTS[name]), strict=True, namespace=chartlib.NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report
    # The only remark left: the project has no icon yet.
    assert [m["error"] for m in report["messages"]] == ["icon is recommended"]


def test_lint_without_values_for_other_kubernetes_versions() -> None:
    for kube in ("v1.27.0", "v1.33.0"):
        report = helm.lint(chartlib.CHART, strict=True, kube_version=kube)
        assert report["errors"] == [], (kube, report)


def test_every_variant_passes_the_schema() -> None:
    with helm.Chart.load(chartlib.CHART) as chart:
        assert chart.schema is not None
        for values in VARIANTS.values():
            chart.validate_schema(chart.merge_values(copy.deepcopy(values)))


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown key (typo)", {"agnet": {"enabled": False}}, "additional properties 'agnet' not allowed"),
    ("unknown nested key", {"agent": {"kubeletDir": "/x"}}, "additional properties 'kubeletDir' not allowed"),
    ("io_uring mode", {"agent": {"ioUring": "on"}}, "at '/agent/ioUring': value must be one of 'auto', 'off'"),
    ("read mode", {"agent": {"readMode": "mmap"}}, "at '/agent/readMode': value must be one of 'stream', 'direct'"),
    ("relative kubelet root", {"agent": {"kubeletRoot": "var/lib/kubelet"}}, "at '/agent/kubeletRoot'"),
    ("negative budget", {"agent": {"ioBudget": {"bytesPerSecond": -1}}}, "at '/agent/ioBudget/bytesPerSecond'"),
    ("budget unit", {"agent": {"ioBudget": {"bytesPerSecond": "100MB"}}}, "'100MB' does not match pattern"),
    ("iops", {"agent": {"ioBudget": {"iops": -5}}}, "at '/agent/ioBudget/iops'"),
    ("concurrency", {"agent": {"maxConcurrentVolumes": 0}}, "at '/agent/maxConcurrentVolumes': minimum: got 0, want 1"),
    ("replicas", {"operator": {"replicas": 0}}, "at '/operator/replicas': minimum: got 0, want 1"),
    ("log format", {"logFormat": "xml"}, "at '/logFormat': value must be one of 'text', 'json'"),
    ("log level", {"logLevel": "verbose"}, "at '/logLevel'"),
    ("agent log level", {"agent": {"logLevel": "loud"}}, "at '/agent/logLevel'"),
    ("failure policy", {"webhooks": {"validating": {"failurePolicy": "Retry"}}}, "value must be one of 'Fail', 'Ignore'"),
    ("webhook timeout", {"webhooks": {"timeoutSeconds": 60}}, "at '/webhooks/timeoutSeconds': maximum: got 60, want 30"),
    ("seccomp without profile", {"agent": {"seccompProfile": {"type": "Localhost"}}}, "missing property 'localhostProfile'"),
    ("seccomp type", {"agent": {"seccompProfile": {"type": "Privileged"}}}, "at '/agent/seccompProfile/type'"),
    ("tag as a number", {"image": {"tag": 1.5}}, "at '/image/tag': got number, want string"),
    ("pull policy", {"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
    ("issuer without name", {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer"}}}, "at '/certManager/issuerRef'"),
    ("enabled as a string", {"agent": {"enabled": "yes"}}, "at '/agent/enabled': got string, want boolean"),
    ("pushgateway url", {"pushgateway": {"url": "pushgateway:9091"}}, "at '/pushgateway/url'"),
    ("pull secret name", {"imagePullSecrets": ["Not_A_Name"]}, "at '/imagePullSecrets/0'"),
    ("env without name", {"operator": {"extraEnv": [{"value": "x"}]}}, "missing property 'name'"),
    ("agent surge", {"agent": {"updateStrategy": {"rollingUpdate": {"maxSurge": 1}}}},
     "at '/agent/updateStrategy/rollingUpdate/maxSurge': value must be one of 0, '0%'"),
    ("agent update type", {"agent": {"updateStrategy": {"type": "Recreate"}}}, "at '/agent/updateStrategy/type'"),
    ("relative local repository root", {"localRepositories": {"hostPaths": ["srv/repos"]}},
     "at '/localRepositories/hostPaths/0'"),
    ("the whole host as a local repository root", {"localRepositories": {"hostPaths": ["/"]}},
     "at '/localRepositories/hostPaths/0'"),
    ("a local repository root climbing out", {"localRepositories": {"hostPaths": ["/srv/../etc"]}},
     "at '/localRepositories/hostPaths/0'"),
    ("agent update typo", {"agent": {"updateStrategy": {"rollingUpdate": {"maxSurg": 1}}}},
     "additional properties 'maxSurg' not allowed"),
]


@pytest.mark.parametrize(("what", "values", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_with_a_clear_message(what: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chartlib.render(values)
    text = str(err.value)
    assert "values don't meet the specifications of the schema" in text
    assert message in text, text
    # helm lint (and so `helm install`) refuses them the same way.
    report = helm.lint(chartlib.CHART, values, strict=True)
    assert any(message in e for e in report["errors"]), report
