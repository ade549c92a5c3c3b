"""Least privilege: what the operator and the node agent may and may not do, evaluated with
Kubernetes' RBAC matching over the rendered roles and bindings."""

from __future__ import annotations

import pytest

import chartlib
from conftest import VARIANTS, container, env, rendered_variant
from rbac import Permissions, grants

STASH = "stash.appscode.com"
RBAC = "rbac.authorization.k8s.io"
ADMISSION = "admissionregistration.k8s.io"
WEBHOOK_CONFIGS = ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"]
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


# What the operator does today, one entry a job: (verbs, resource, group, namespace asked
# about); namespace None means a cluster-wide grant.
OPERATOR_DOES = {
    "pods in every namespace (targets)": (["get", "list", "watch"], "pods", "", None),
    "the node agents' pods in the release namespace": (["get", "list", "watch"], "pods", "", NS),
    "PersistentVolumes of target claims": (["get"], "persistentvolumes", "", None),
    "Events": (["create", "patch"], "events", "", "app"),
    "trigger CronJobs by server-side apply": (["create", "patch"], "cronjobs", "batch", "app"),
    "trigger ServiceAccounts by server-side apply": (["create", "patch"], "serviceaccounts", "", "app"),
    "trigger RoleBindings by server-side apply": (["create", "patch"], "rolebindings", RBAC, "app"),
    "BackupAssignments": (["create", "list", "watch", "patch", "delete"], "backupassignments", STASH, None),
    "BackupSessions": (["create", "list", "watch", "patch", "delete"], "backupsessions", STASH, None),
    "Repository status": (["patch"], "repositories/status", STASH, None),
    "BackupConfiguration status": (["patch"], "backupconfigurations/status", STASH, None),
    "BackupSession status": (["patch"], "backupsessions/status", STASH, None),
    "the leader-election Lease": (["get", "create", "update", "delete"], "leases", "coordination.k8s.io", NS),
}


@pytest.mark.parametrize("job", list(OPERATOR_DOES))
def test_operator_may_do_what_it_does(job: str) -> None:
    verbs, resource, group, namespace = OPERATOR_DOES[job]
    for name in sorted(VARIANTS):
        op = Permissions(rendered_variant(name), "stash-operator")
        lacking = [v for v in verbs if not op.can(v, resource, group, namespace=namespace)]
        assert lacking == [], (name, resource, lacking)


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
    for verb in ("get", "create", "update", "delete"):
        assert operator.can(verb, "leases", "coordination.k8s.io", namespace=NS, name="stash-operator")
        assert not operator.can(verb, "leases", "coordination.k8s.io", namespace="default", name="stash-operator")


def test_operator_patches_only_its_own_webhooks() -> None:
    operator = Permissions(rendered_variant("webhooks-on"), "stash-operator")
    for res in WEBHOOK_CONFIGS:
        assert operator.can("patch", res, ADMISSION, name="stash-admission")
        assert not operator.can("patch", res, ADMISSION, name="someone-elses")
        assert not operator.can("patch", res, ADMISSION)
        assert not operator.can("create", res, ADMISSION) and not operator.can("delete", res, ADMISSION, name="stash-admission")


def test_operator_patches_only_its_own_apiservice_and_certificate(operator: Permissions) -> None:
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
    r = rendered_variant("cert-manager")
    assert r.all("ValidatingWebhookConfiguration") and r.all("MutatingWebhookConfiguration")
    op = Permissions(r, "stash-operator")
    for res in WEBHOOK_CONFIGS:
        assert not op.can("patch", res, ADMISSION, name="stash-admission")
    assert not op.can("patch", "apiservices", "apiregistration.k8s.io", name="v1alpha1.repositories.stash.appscode.com")
    assert not op.can("create", "secrets", namespace=NS)


def test_without_webhooks_no_webhook_permissions(operator: Permissions) -> None:
    # The default: the webhooks are off, and the operator may not touch any webhook configuration.
    for res in WEBHOOK_CONFIGS:
        for verb in ("get", "list", "watch", "update", "patch"):
            assert not operator.can(verb, res, ADMISSION, name="stash-admission"), (verb, res)
    assert [r for r in operator.all_rules() if ADMISSION in r["apiGroups"]] == []
    assert operator.can("patch", "apiservices", "apiregistration.k8s.io", name="v1alpha1.repositories.stash.appscode.com")
    only = Permissions(rendered_variant("validating-only"), "stash-operator")
    assert only.can("patch", "validatingwebhookconfigurations", ADMISSION, name="stash-admission")
    assert not only.can("get", "mutatingwebhookconfigurations", ADMISSION, name="stash-admission")


# --- the trigger CronJobs' role -------------------------------------------------------------


def trigger_role(r: chartlib.Rendered) -> dict:
    """The ClusterRole the operator is told to bind the trigger ServiceAccounts to."""
    name = env(container(r.get("Deployment", "stash-operator"), "operator"))["STASH_TRIGGER_CLUSTER_ROLE"]
    return r.get("ClusterRole", name)


def test_trigger_role_reads_a_backupconfiguration_and_creates_sessions_only() -> None:
    r = rendered_variant("default")
    role = trigger_role(r)
    assert role["metadata"]["name"] == "stash-operator-trigger"
    assert grants(role["rules"]) == {
        (STASH, "backupconfigurations", "get", None),
        (STASH, "backupsessions", "create", None),
    }
    assert "aggregationRule" not in role
    # The operator binds it, per BackupConfiguration; the chart binds nothing to it.
    bindings = r.all("ClusterRoleBinding") + r.all("RoleBinding")
    assert [b["metadata"]["name"] for b in bindings if b["roleRef"]["name"] == role["metadata"]["name"]] == []


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_operator_may_bind_the_trigger_role_in_any_namespace(name: str) -> None:
    r = rendered_variant(name)
    role = trigger_role(r)
    op = Permissions(r, "stash-operator")
    for ns in ("app", NS):
        # Escalation prevention: the operator must hold every permission of the role there.
        assert op.missing(role["rules"], namespace=ns) == [], ns
        assert op.can("create", "rolebindings", RBAC, namespace=ns) and op.can("create", "serviceaccounts", namespace=ns)
    # ...by holding them, not by `bind`, which would let it grant the role whatever its rules.
    assert not op.can("bind", "clusterroles", RBAC, name=role["metadata"]["name"])
    # The check is not vacuous: the agent holds neither permission and could not bind the role.
    assert Permissions(r, "stash-node-agent").missing(role["rules"], namespace="app") == sorted(grants(role["rules"]), key=str)


def test_wildcards_only_on_stash_groups() -> None:
    for name in sorted(VARIANTS):
        r = rendered_variant(name)
        for role in r.all("ClusterRole") + r.all("Role"):
            for rule in role["rules"]:
                if "*" in rule["verbs"] or "*" in rule["resources"]:
                    assert set(rule["apiGroups"]) <= {STASH, "appcatalog.appscode.com"}, (name, rule)
                assert "*" not in rule["apiGroups"]
