"""Least privilege: what the operator and the node agent may and may not do, evaluated with
Kubernetes' RBAC matching over the rendered roles and bindings."""

from __future__ import annotations

import pytest

import chartlib
from conftest import VARIANTS, rendered_variant
from rbac import Permissions

STASH = "stash.appscode.com"
NS = chartlib.NAMESPACE
ASSIGNMENTS = ["backupassignments", "restoreassignments"]


@pytest.fixture
def agent() -> Permissions:
    return Permissions(rendered_variant("default"), "stash-node-agent")


@pytest.fixture
def operator() -> Permissions:
    return Permissions(rendered_variant("default"), "stash-operator")


@pytest.mark.parametrize("kind", ASSIGNMENTS)
def test_agent_reads_assignments_and_writes_only_their_status_and_finalizer(agent: Permissions, kind: str) -> None:
    # patch: the agent's finalizer, by server-side apply (the spec is immutable).
    for verb in ("get", "list", "watch", "patch"):
        assert agent.can(verb, kind, STASH)
    for verb in ("update", "patch"):
        assert agent.can(verb, f"{kind}/status", STASH)
    for verb in ("create", "update", "delete", "deletecollection"):
        assert not agent.can(verb, kind, STASH, namespace="default"), verb
        assert not agent.can(verb, kind, STASH, namespace=NS), verb


def test_agent_rules_are_exactly_what_it_needs(agent: Permissions) -> None:
    assert agent.can("get", "secrets")
    assert not agent.can("list", "secrets") and not agent.can("watch", "secrets")
    assert agent.can("get", "repositories", STASH)
    assert not agent.can("update", "repositories", STASH)
    for res in ("pods", "persistentvolumeclaims", "persistentvolumes"):
        assert agent.can("watch", res) and not agent.can("patch", res) and not agent.can("delete", res)
    assert agent.can("create", "events") and agent.can("patch", "events", "events.k8s.io")
    for verb, res, group in [
        ("create", "pods", ""), ("create", "pods/exec", ""), ("get", "nodes", ""),
        ("create", "backupsessions", STASH), ("update", "backupsessions/status", STASH),
        ("patch", "deployments", "apps"), ("get", "configmaps", ""), ("create", "secrets", ""),
        ("create", "leases", "coordination.k8s.io"),
    ]:
        assert not agent.can(verb, res, group, namespace=NS), (verb, res)
    for rule in agent.all_rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    assert agent.builtin == set()


def test_only_the_operator_may_create_assignments() -> None:
    for name in sorted(VARIANTS):
        r = rendered_variant(name)
        for sa in r.all("ServiceAccount"):
            perms = Permissions(r, sa["metadata"]["name"])
            may = all(perms.can("create", kind, STASH, namespace="apps") for kind in ASSIGNMENTS)
            assert may == (sa["metadata"]["name"] == "stash-operator"), (name, sa["metadata"]["name"])


def test_operator_permissions(operator: Permissions) -> None:
    for kind in ASSIGNMENTS + ["backupsessions", "backupconfigurations", "repositories", "restoresessions"]:
        for verb in ("create", "update", "delete", "watch"):
            assert operator.can(verb, kind, STASH)
        assert operator.can("patch", f"{kind}/status", STASH)
    assert operator.can("create", "appbindings", "appcatalog.appscode.com") is True
    for res in ("deployments", "statefulsets", "daemonsets"):
        assert operator.can("patch", res, "apps") and operator.can("watch", res, "apps")
        assert not operator.can("delete", res, "apps") and not operator.can("create", res, "apps")
    for res in ("pods", "persistentvolumeclaims"):
        assert operator.can("patch", res) and operator.can("list", res)
    for res in ("persistentvolumes", "nodes"):
        assert operator.can("list", res) and not operator.can("patch", res)
    assert operator.can("get", "secrets", namespace="app") and not operator.can("create", "secrets", namespace="app")
    for res in ("cronjobs", "jobs"):
        assert operator.can("create", res, "batch") and operator.can("delete", res, "batch")
    assert operator.can("create", "serviceaccounts") and operator.can("create", "rolebindings", "rbac.authorization.k8s.io")
    assert not operator.can("create", "clusterrolebindings", "rbac.authorization.k8s.io")
    assert not operator.can("create", "roles", "rbac.authorization.k8s.io")
    assert not operator.can("escalate", "clusterroles", "rbac.authorization.k8s.io")
    assert operator.can("create", "events") and operator.can("patch", "events", "events.k8s.io")
    assert not operator.can("create", "pods/exec")


def test_operator_leases_only_in_its_namespace(operator: Permissions) -> None:
    lease = ("update", "leases", "coordination.k8s.io")
    assert operator.can(*lease, namespace=NS, name="stash-operator")
    assert operator.can("create", "leases", "coordination.k8s.io", namespace=NS)
    assert not operator.can(*lease, namespace="default", name="stash-operator")


def test_operator_patches_only_its_own_webhooks_and_apiservice(operator: Permissions) -> None:
    adm = "admissionregistration.k8s.io"
    for res in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
        assert operator.can("patch", res, adm, name="stash-admission")
        assert not operator.can("patch", res, adm, name="someone-elses")
        assert not operator.can("patch", res, adm)
        assert not operator.can("create", res, adm) and not operator.can("delete", res, adm, name="stash-admission")
    api = "apiregistration.k8s.io"
    assert operator.can("patch", "apiservices", api, name="v1alpha1.repositories.stash.appscode.com")
    assert not operator.can("patch", "apiservices", api, name="v1beta1.metrics.k8s.io")
    # Its certificate Secret: created once, then only that one Secret may change.
    assert operator.can("create", "secrets", namespace=NS)
    assert operator.can("update", "secrets", namespace=NS, name="stash-apiserver-cert")
    assert not operator.can("update", "secrets", namespace=NS, name="another")


def test_operator_delegates_authentication(operator: Permissions) -> None:
    # The aggregated Snapshot API: system:auth-delegator (tokenreviews and subjectaccessreviews
    # create) and the API server's authentication configuration in kube-system.
    assert operator.builtin == {"system:auth-delegator", "extension-apiserver-authentication-reader"}
    rb = rendered_variant("default").get("RoleBinding", "stash-operator-auth-reader")
    assert rb["metadata"]["namespace"] == "kube-system"
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                             "name": "extension-apiserver-authentication-reader"}


def test_with_cert_manager_the_operator_touches_no_certificate_objects() -> None:
    op = Permissions(rendered_variant("cert-manager"), "stash-operator")
    assert not op.can("patch", "validatingwebhookconfigurations", "admissionregistration.k8s.io", name="stash-admission")
    assert not op.can("patch", "apiservices", "apiregistration.k8s.io", name="v1alpha1.repositories.stash.appscode.com")
    assert not op.can("create", "secrets", namespace=NS)


def test_without_webhooks_no_webhook_permissions() -> None:
    op = Permissions(rendered_variant("webhooks-off"), "stash-operator")
    for res in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
        assert not op.can("patch", res, "admissionregistration.k8s.io", name="stash-admission")
    assert op.can("patch", "apiservices", "apiregistration.k8s.io", name="v1alpha1.repositories.stash.appscode.com")


def test_wildcards_only_on_stash_groups() -> None:
    for name in sorted(VARIANTS):
        r = rendered_variant(name)
        for role in r.all("ClusterRole") + r.all("Role"):
            for rule in role["rules"]:
                if "*" in rule["verbs"] or "*" in rule["resources"]:
                    assert set(rule["apiGroups"]) <= {STASH, "appcatalog.appscode.com"}, (name, rule)
                assert "*" not in rule["apiGroups"]
