"""What the rendered objects must contain: the operator's two containers and its contract with
the binaries (env), the node agent's mounts, privileges and seccomp, the webhooks, the
APIService, certificates, and the main variations of values."""

from __future__ import annotations

import chartlib
import helm_python as helm
import pytest
from conftest import container, env, mounts, render, rendered_variant, volumes

FIELD = {"fieldRef": {"fieldPath": "metadata.namespace"}}
POD_NAME = {"fieldRef": {"fieldPath": "metadata.name"}}
NODE_NAME = {"fieldRef": {"fieldPath": "spec.nodeName"}}
RESTORE_CAPS = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"}


# --- the operator --------------------------------------------------------------------------


def test_operator_runs_the_operator_and_a_pushgateway(default: chartlib.Rendered) -> None:
    dep = default.get("Deployment", "stash-operator")
    spec = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["operator", "pushgateway"]
    assert dep["spec"]["replicas"] == 1
    op = container(dep, "operator")
    assert op["image"] == "ghcr.io/stash-rs/stash-operator:0.1.0"
    assert op["args"] == ["run"]
    pgw = container(dep, "pushgateway")
    assert pgw["image"] == "quay.io/prometheus/pushgateway:v1.11.0"
    # Stash's layout: listen on :56789, persist under an emptyDir at /var/pv.
    assert pgw["args"] == ["--web.listen-address=:56789", "--persistence.file=/var/pv/pushgateway.dat"]
    assert pgw["ports"] == [{"name": "pushgateway", "containerPort": 56789, "protocol": "TCP"}]
    assert mounts(pgw)["data-volume"]["mountPath"] == "/var/pv"
    assert volumes(dep)["data-volume"] == {"name": "data-volume", "emptyDir": {}}
    assert default.maybe("PodDisruptionBudget", "stash-operator") is None


def test_operator_env_is_the_runtime_contract(default: chartlib.Rendered) -> None:
    e = env(container(default.get("Deployment", "stash-operator"), "operator"))
    assert e == {
        "STASH_LOG_LEVEL": "info",
        "STASH_LOG_FORMAT": "text",
        "STASH_NAMESPACE": FIELD,
        "STASH_POD_NAME": POD_NAME,
        "STASH_PUSHGATEWAY_URL": "http://localhost:56789",
        "STASH_SECURE_PORT": "8443",
        "STASH_SNAPSHOT_INDEX_INTERVAL_SECONDS": "300",
        "STASH_METRICS_PORT": "8080",
        "STASH_ENABLE_MUTATING_WEBHOOK": "false",
        "STASH_ENABLE_VALIDATING_WEBHOOK": "false",
        "STASH_WEBHOOK_CONFIG_NAME": "stash-admission",
        "STASH_SERVICE_NAME": "stash",
        "STASH_CERT_DIR": "/var/serving-cert",
        "STASH_CERT_SOURCE": "operator",
        "STASH_CERT_SECRET_NAME": "stash-apiserver-cert",
        # Even with one replica: a rolling update briefly runs two operators.
        "STASH_LEADER_ELECT": "true",
        "STASH_LEADER_ELECTION_LEASE": "stash-operator",
        "STASH_AGENT_IMAGE": "ghcr.io/stash-rs/stash-node-agent:0.1.0",
        "STASH_AGENT_SELECTOR": "app.kubernetes.io/component=node-agent,"
        "app.kubernetes.io/instance=stash,app.kubernetes.io/name=stash",
        "STASH_OPERATOR_IMAGE": "ghcr.io/stash-rs/stash-operator:0.1.0",
        "STASH_IMAGE_PULL_SECRETS": "",
        "STASH_RESTIC": "/usr/local/bin/restic",
        "STASH_STATE_DIR": "/tmp/stash-operator",
        "STASH_TRIGGER_CLUSTER_ROLE": "stash-operator-trigger",
        "HOME": "/tmp",
    }


def test_operator_state_dir_is_on_the_writable_tmp_volume(default: chartlib.Rendered) -> None:
    dep = default.get("Deployment", "stash-operator")
    op = container(dep, "operator")
    assert op["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts(op)["tmp"]["mountPath"] == "/tmp" and volumes(dep)["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert env(op)["STASH_STATE_DIR"].startswith("/tmp/")


def test_operator_agent_selector_selects_the_agent_pods(default: chartlib.Rendered) -> None:
    selector = env(container(default.get("Deployment", "stash-operator"), "operator"))["STASH_AGENT_SELECTOR"]
    wanted = dict(pair.split("=") for pair in selector.split(","))
    labels = default.get("DaemonSet", "stash-node-agent")["spec"]["template"]["metadata"]["labels"]
    assert wanted.items() <= labels.items()
    op_labels = default.get("Deployment", "stash-operator")["spec"]["template"]["metadata"]["labels"]
    assert not wanted.items() <= op_labels.items()


def test_operator_is_non_root_and_locked_down(default: chartlib.Rendered) -> None:
    dep = default.get("Deployment", "stash-operator")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65534
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
    op = container(dep, "operator")
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert op["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in op["ports"]} == {"https": 8443, "metrics": 8080}


def test_serving_certificate_is_never_rendered_by_the_chart(default: chartlib.Rendered) -> None:
    # The operator issues and rotates it; rendering one would replace it on every upgrade.
    assert default.all("Secret") == []
    dep = default.get("Deployment", "stash-operator")
    cert = volumes(dep)["serving-cert"]["secret"]
    assert cert == {"secretName": "stash-apiserver-cert", "defaultMode": 0o440, "optional": True}
    assert mounts(container(dep, "operator"))["serving-cert"] == {
        "name": "serving-cert", "mountPath": "/var/serving-cert", "readOnly": True
    }
    for path, text in default.sources:
        assert "BEGIN CERTIFICATE" not in text and "caBundle" not in text, path


def test_several_replicas_elect_a_leader() -> None:
    r = rendered_variant("replicas")
    dep = r.get("Deployment", "stash-operator")
    assert dep["spec"]["replicas"] == 3
    e = env(container(dep, "operator"))
    assert e["STASH_LEADER_ELECT"] == "true"
    assert e["STASH_LEADER_ELECTION_LEASE"] == "stash-operator"
    anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert "affinity" not in rendered_variant("default").get("Deployment", "stash-operator")["spec"]["template"]["spec"]
    pdb = r.get("PodDisruptionBudget", "stash-operator")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_pushgateway_can_be_external() -> None:
    r = rendered_variant("everything")
    dep = r.get("Deployment", "stash-operator")
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["operator"]
    assert "data-volume" not in volumes(dep)
    e = env(container(dep, "operator"))
    assert e["STASH_PUSHGATEWAY_URL"] == "http://pushgateway.monitoring.svc:9091"
    metrics = r.get("Service", "stash-operator-metrics")
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]


def test_an_external_url_needs_the_builtin_pushgateway_off() -> None:
    with pytest.raises(helm.HelmRenderError, match="set pushgateway.enabled=false to use it"):
        render({"pushgateway": {"url": "http://pgw.monitoring:9091"}})


def test_no_pushgateway_at_all_means_no_url() -> None:
    r = render({"pushgateway": {"enabled": False}})
    e = env(container(r.get("Deployment", "stash-operator"), "operator"))
    assert e["STASH_PUSHGATEWAY_URL"] == ""
    assert "not pushed" in r.notes


# --- the node agent ------------------------------------------------------------------------


def test_agent_mounts_the_kubelet_directories_with_host_to_container(default: chartlib.Rendered) -> None:
    ds = default.get("DaemonSet", "stash-node-agent")
    c = container(ds, "agent")
    m, v = mounts(c), volumes(ds)
    assert m["kubelet-pods"] == {
        "name": "kubelet-pods",
        "mountPath": "/var/lib/kubelet/pods",
        "readOnly": False,  # in-place restore writes into pod volumes (agent.restore.inPlace)
        "mountPropagation": "HostToContainer",
    }
    assert m["kubelet-plugins"] == {
        "name": "kubelet-plugins",
        "mountPath": "/var/lib/kubelet/plugins",
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }
    assert v["kubelet-pods"]["hostPath"] == {"path": "/var/lib/kubelet/pods", "type": "Directory"}
    assert v["kubelet-plugins"]["hostPath"] == {"path": "/var/lib/kubelet/plugins", "type": "DirectoryOrCreate"}
    assert v["state"]["hostPath"] == {"path": "/var/lib/stash-agent", "type": "DirectoryOrCreate"}
    assert m["state"]["mountPath"] == "/var/lib/stash-agent"
    assert "mountPropagation" not in m["state"] and "mountPropagation" not in m["tmp"]
    hostpaths = {x["hostPath"]["path"] for x in v.values() if "hostPath" in x}
    assert hostpaths == {"/var/lib/kubelet/pods", "/var/lib/kubelet/plugins", "/var/lib/stash-agent", "/sys/fs/cgroup"}
    # Direct mode's restic cgroups: the host's cgroup filesystem, writable, where the agent looks.
    assert v["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert m["cgroup"] == {"name": "cgroup", "mountPath": "/host/sys/fs/cgroup"}


def test_agent_env_is_the_runtime_contract(default: chartlib.Rendered) -> None:
    e = env(container(default.get("DaemonSet", "stash-node-agent"), "agent"))
    assert e == {
        "NODE_NAME": NODE_NAME,
        "STASH_POD_NAME": POD_NAME,
        "STASH_NAMESPACE": FIELD,
        "STASH_KUBELET_ROOT": "/var/lib/kubelet",
        "STASH_STATE_DIR": "/var/lib/stash-agent",
        "STASH_IO_BUDGET_BYTES_PER_SECOND": "104857600",
        # iops 0 = unlimited: the variable is left out (the agent treats "unset" as unlimited).
        "STASH_MAX_CONCURRENT_VOLUMES": "2",
        "STASH_READ_MODE": "direct",
        "STASH_IO_URING": "auto",
        "STASH_CGROUP_ROOT": "/host/sys/fs/cgroup",
        "STASH_METRICS_PORT": "9090",
        "STASH_LOG_LEVEL": "info",
        "STASH_LOG_FORMAT": "text",
        "HOME": "/tmp",
    }


def test_agent_privileges_are_no_wider_than_reading_and_restoring(default: chartlib.Rendered) -> None:
    ds = default.get("DaemonSet", "stash-node-agent")
    pod = ds["spec"]["template"]["spec"]
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert pod.get(host, False) is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert len(pod["containers"]) == 1 and "initContainers" not in pod
    sc = container(ds, "agent")["securityContext"]
    assert sc["runAsUser"] == 0
    assert sc.get("privileged", False) is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"DAC_READ_SEARCH"} | RESTORE_CAPS
    # io_uring needs io_uring_setup/enter/register, which RuntimeDefault blocks on containerd.
    assert sc["seccompProfile"] == {"type": "Unconfined"}


def test_local_repository_roots_are_mounted_at_the_same_path_into_agents_and_operator() -> None:
    r = rendered_variant("local-repositories")
    roots = ["/var/lib/stash-repositories", "/srv/backups/"]
    for kind, name, ctr in (("DaemonSet", "stash-node-agent", "agent"), ("Deployment", "stash-operator", "operator")):
        owner = r.get(kind, name)
        c = container(owner, ctr)
        assert env(c)["STASH_LOCAL_REPOSITORY_ROOTS"] == ",".join(roots)
        m, v = mounts(c), volumes(owner)
        for i, root in enumerate(roots):
            vol = f"local-repositories-{i}"
            assert m[vol] == {"name": vol, "mountPath": root}, (kind, m)
            assert v[vol]["hostPath"] == {"path": root, "type": "DirectoryOrCreate"}, (kind, v)
    op = container(r.get("Deployment", "stash-operator"), "operator")
    # The operator knows its node: a hostPath repository is that node's directory.
    assert env(op)["STASH_NODE_NAME"] == NODE_NAME
    # The agents write the repositories as root and restic's files are the owner's only.
    sc = op["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (0, 0, False)
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # The pushgateway beside it stays unprivileged.
    assert "runAsUser" not in container(r.get("Deployment", "stash-operator"), "pushgateway")["securityContext"]


def test_without_local_repositories_nothing_is_mounted_and_the_operator_is_not_root(default: chartlib.Rendered) -> None:
    for kind, name, ctr in (("DaemonSet", "stash-node-agent", "agent"), ("Deployment", "stash-operator", "operator")):
        c = container(default.get(kind, name), ctr)
        assert "STASH_LOCAL_REPOSITORY_ROOTS" not in env(c)
        assert not [m for m in mounts(c) if m.startswith("local-repositories")]
    op = container(default.get("Deployment", "stash-operator"), "operator")
    assert "runAsUser" not in op["securityContext"] and "STASH_NODE_NAME" not in env(op)


def test_agent_without_restore_reads_only() -> None:
    ds = rendered_variant("backup-only-no-io-uring").get("DaemonSet", "stash-node-agent")
    c = container(ds, "agent")
    assert c["securityContext"]["capabilities"]["add"] == ["DAC_READ_SEARCH"]
    assert mounts(c)["kubelet-pods"]["readOnly"] is True
    assert mounts(c)["kubelet-plugins"]["readOnly"] is True


def test_agent_without_io_uring_runs_under_runtime_default() -> None:
    ds = rendered_variant("backup-only-no-io-uring").get("DaemonSet", "stash-node-agent")
    c = container(ds, "agent")
    assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert env(c)["STASH_IO_URING"] == "off"
    # seccompProfile is ignored while io_uring is off, even when it says Unconfined.
    r = render({"agent": {"ioUring": "off", "seccompProfile": {"type": "Unconfined"}}})
    sc = container(r.get("DaemonSet", "stash-node-agent"), "agent")["securityContext"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_agent_localhost_seccomp_profile() -> None:
    ds = rendered_variant("everything").get("DaemonSet", "stash-node-agent")
    assert container(ds, "agent")["securityContext"]["seccompProfile"] == {
        "type": "Localhost", "localhostProfile": "profiles/stash-agent.json"
    }


def test_custom_kubelet_root_moves_every_kubelet_path() -> None:
    ds = rendered_variant("custom-kubelet-root").get("DaemonSet", "stash-node-agent")
    c = container(ds, "agent")
    assert env(c)["STASH_KUBELET_ROOT"] == "/var/lib/k0s/kubelet"
    assert mounts(c)["kubelet-pods"]["mountPath"] == "/var/lib/k0s/kubelet/pods"
    assert mounts(c)["kubelet-plugins"]["mountPath"] == "/var/lib/k0s/kubelet/plugins"
    assert volumes(ds)["kubelet-pods"]["hostPath"]["path"] == "/var/lib/k0s/kubelet/pods"
    assert volumes(ds)["kubelet-plugins"]["hostPath"]["path"] == "/var/lib/k0s/kubelet/plugins"
    assert all("/var/lib/kubelet" not in text for _, text in rendered_variant("custom-kubelet-root").sources)


def test_agent_scheduling_knobs() -> None:
    default_ds = rendered_variant("default").get("DaemonSet", "stash-node-agent")
    assert default_ds["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert default_ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    r = render({
        "agent": {
            "nodeSelector": {"stash.io/backup": "yes"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "system-node-critical",
            "resources": {"requests": {"cpu": "50m"}, "limits": {"memory": "1Gi"}},
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
        }
    })
    pod = r.get("DaemonSet", "stash-node-agent")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"stash.io/backup": "yes"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "system-node-critical"
    # Helm merges maps with the defaults: the memory request stays.
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert "nodeAffinity" in pod["affinity"]
    assert "tolerations" not in rendered_variant("everything").get("DaemonSet", "stash-node-agent")["spec"]["template"]["spec"]


def test_agent_updates_never_run_two_agents_on_a_node() -> None:
    """A new agent removes the locks of restic processes its predecessor on the node started,
    taking them for dead: a surge pod would take a live agent's locks. Other update settings
    stay the user's; a surge is refused (test_schema_and_lint.BAD_VALUES)."""
    def strategy(values: dict) -> dict:
        return render({"agent": {"updateStrategy": values}}).get("DaemonSet", "stash-node-agent")["spec"]["updateStrategy"]

    # Helm merges the user's map with the defaults: the pinned maxSurge stays.
    assert strategy({"rollingUpdate": {"maxUnavailable": "25%"}}) == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": 0}}
    assert strategy({"rollingUpdate": {"maxSurge": "0%"}})["rollingUpdate"]["maxSurge"] == "0%"
    # OnDelete replaces a pod only after it is gone.
    assert strategy({"type": "OnDelete", "rollingUpdate": None}) == {"type": "OnDelete"}
    for surge in (1, "1", "10%", "100%"):
        with pytest.raises(helm.HelmValuesError) as err:
            render({"agent": {"updateStrategy": {"rollingUpdate": {"maxSurge": surge}}}})
        assert "at '/agent/updateStrategy/rollingUpdate/maxSurge': value must be one of 0, '0%'" in str(err.value)


@pytest.mark.parametrize(
    ("given", "env_value"),
    [
        (104857600, "104857600"),
        (10995116277760, "10995116277760"),  # 10 TiB/s: no float formatting (1.1e+13)
        ("100Mi", "100Mi"),
        (0, None),
    ],
)
def test_io_budget_reaches_the_agent_verbatim(given: object, env_value: str | None) -> None:
    r = render({"agent": {"ioBudget": {"bytesPerSecond": given, "iops": 1500}}})
    e = env(container(r.get("DaemonSet", "stash-node-agent"), "agent"))
    assert e.get("STASH_IO_BUDGET_BYTES_PER_SECOND") == env_value
    assert e["STASH_IO_BUDGET_IOPS"] == "1500"


def test_an_adaptive_budget_reaches_the_agent_and_needs_its_ceiling() -> None:
    r = render({"agent": {"ioBudget": {"bytesPerSecond": "50Mi", "adaptive": True}}})
    e = env(container(r.get("DaemonSet", "stash-node-agent"), "agent"))
    assert (e["STASH_IO_BUDGET_BYTES_PER_SECOND"], e["STASH_IO_BUDGET_ADAPTIVE"]) == ("50Mi", "true")
    with pytest.raises(helm.HelmRenderError, match="needs agent.ioBudget.bytesPerSecond"):
        render({"agent": {"ioBudget": {"bytesPerSecond": 0, "adaptive": True}}})


def test_agent_off_removes_every_agent_object() -> None:
    r = rendered_variant("agent-off")
    assert r.all("DaemonSet") == []
    names = [d["metadata"]["name"] for d in r.docs]
    assert not [n for n in names if "node-agent" in n], names
    assert r.get("Deployment", "stash-operator")
    assert "sidecar" in r.notes


# --- webhooks, APIService, certificates ----------------------------------------------------


def test_validating_webhooks(webhooks_on: chartlib.Rendered) -> None:
    cfg = webhooks_on.get("ValidatingWebhookConfiguration", "stash-admission")
    got = {
        wh["clientConfig"]["service"]["path"]: (wh["rules"], wh["failurePolicy"]) for wh in cfg["webhooks"]
    }
    assert set(got) == {"/validate/repositories", "/validate/backupconfigurations", "/validate/restoresessions"}
    for path, (rules, policy) in got.items():
        plural = path.rsplit("/", 1)[1]
        assert policy == "Fail"
        assert rules == [{
            "apiGroups": ["stash.appscode.com"],
            "apiVersions": ["v1alpha1" if plural == "repositories" else "v1beta1"],
            "resources": [plural],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }]
    for wh in cfg["webhooks"]:
        assert wh["sideEffects"] == "None" and wh["admissionReviewVersions"] == ["v1"]
        assert wh["clientConfig"]["service"] | {"path": ""} == {"name": "stash", "namespace": "stash", "port": 443, "path": ""}


def test_mutating_webhooks(webhooks_on: chartlib.Rendered) -> None:
    cfg = webhooks_on.get("MutatingWebhookConfiguration", "stash-admission")
    got = {wh["clientConfig"]["service"]["path"]: wh for wh in cfg["webhooks"]}
    assert set(got) == {"/mutate/deployments", "/mutate/statefulsets", "/mutate/daemonsets", "/mutate/restoresessions"}
    for workload in ("deployments", "statefulsets", "daemonsets"):
        wh = got[f"/mutate/{workload}"]
        # A down operator must never block the users' own workloads.
        assert wh["failurePolicy"] == "Ignore"
        assert wh["rules"][0]["apiGroups"] == ["apps"] and wh["rules"][0]["resources"] == [workload]
    assert got["/mutate/statefulsets"]["rules"][0]["operations"] == ["CREATE"]
    assert got["/mutate/deployments"]["rules"][0]["operations"] == ["CREATE", "UPDATE"]
    rs = got["/mutate/restoresessions"]
    assert rs["failurePolicy"] == "Fail"
    assert rs["rules"][0]["apiGroups"] == ["stash.appscode.com"]


def test_webhooks_never_see_the_release_namespace_or_kube_system(webhooks_on: chartlib.Rendered) -> None:
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for wh in webhooks_on.get(kind, "stash-admission")["webhooks"]:
            assert wh["namespaceSelector"] == {"matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["stash", "kube-system"]
            }]}
    everything = rendered_variant("everything")
    wh = everything.get("ValidatingWebhookConfiguration", "stash-admission")["webhooks"][0]
    assert wh["namespaceSelector"]["matchExpressions"][0]["values"] == ["stash", "kube-system", "flux-system"]
    assert wh["timeoutSeconds"] == 5


def test_failure_policies_are_values() -> None:
    r = render({"webhooks": {"validating": {"enabled": True, "failurePolicy": "Ignore"},
                             "mutating": {"enabled": True, "failurePolicy": "Ignore", "workloadFailurePolicy": "Fail"}}})
    assert {wh["failurePolicy"] for wh in r.get("ValidatingWebhookConfiguration", "stash-admission")["webhooks"]} == {"Ignore"}
    policies = {wh["name"]: wh["failurePolicy"] for wh in r.get("MutatingWebhookConfiguration", "stash-admission")["webhooks"]}
    assert policies == {
        "deployments.mutators.stash.appscode.com": "Fail",
        "statefulsets.mutators.stash.appscode.com": "Fail",
        "daemonsets.mutators.stash.appscode.com": "Fail",
        "restoresessions.mutators.stash.appscode.com": "Ignore",
    }


def webhook_switches(r: chartlib.Rendered) -> tuple[str, str]:
    e = env(container(r.get("Deployment", "stash-operator"), "operator"))
    return e["STASH_ENABLE_VALIDATING_WEBHOOK"], e["STASH_ENABLE_MUTATING_WEBHOOK"]


def test_webhooks_are_off_by_default(default: chartlib.Rendered) -> None:
    # The operator does not serve them yet: a registered Fail webhook would refuse every write.
    assert default.all("ValidatingWebhookConfiguration") == [] and default.all("MutatingWebhookConfiguration") == []
    assert webhook_switches(default) == ("false", "false")
    # The Snapshot API does not depend on the webhooks.
    assert default.get("APIService", "v1alpha1.repositories.stash.appscode.com")
    assert "the validating webhook is off" in default.notes and "the mutating webhook is off" in default.notes
    assert "does not serve admission webhooks" not in default.notes


def test_webhooks_turned_on_render_and_warn(webhooks_on: chartlib.Rendered) -> None:
    assert len(webhooks_on.get("ValidatingWebhookConfiguration", "stash-admission")["webhooks"]) == 3
    assert len(webhooks_on.get("MutatingWebhookConfiguration", "stash-admission")["webhooks"]) == 4
    assert webhook_switches(webhooks_on) == ("true", "true")
    assert "does not serve admission webhooks yet" in webhooks_on.notes
    only = rendered_variant("validating-only")
    assert only.all("MutatingWebhookConfiguration") == []
    assert len(only.get("ValidatingWebhookConfiguration", "stash-admission")["webhooks"]) == 3
    assert webhook_switches(only) == ("true", "false")
    assert "does not serve admission webhooks yet" in only.notes


def test_apiservice(default: chartlib.Rendered) -> None:
    api = default.get("APIService", "v1alpha1.repositories.stash.appscode.com")
    assert api["spec"] == {
        "group": "repositories.stash.appscode.com",
        "version": "v1alpha1",
        "service": {"name": "stash", "namespace": "stash", "port": 443},
        "groupPriorityMinimum": 10000,
        "versionPriority": 15,
    }
    svc = default.get("Service", "stash")
    assert svc["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]
    assert "annotations" not in api["metadata"]


def test_metrics_services(default: chartlib.Rendered) -> None:
    op = default.get("Service", "stash-operator-metrics")
    assert {p["name"]: p["port"] for p in op["spec"]["ports"]} == {"metrics": 8080, "pushgateway": 56789}
    agent = default.get("Service", "stash-node-agent-metrics")
    assert agent["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in agent["spec"]["ports"]} == {"metrics": 9090}
    assert default.all("ServiceMonitor") == []


def test_service_monitor() -> None:
    r = rendered_variant("everything")
    sm = r.get("ServiceMonitor", "stash")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == ["metrics"]
    with_pgw = render({"serviceMonitor": {"enabled": True}})
    eps = {ep["port"]: ep for ep in with_pgw.get("ServiceMonitor", "stash")["spec"]["endpoints"]}
    assert eps["pushgateway"]["honorLabels"] is True and "honorLabels" not in eps["metrics"]


def test_cert_manager_issues_the_serving_certificate() -> None:
    r = rendered_variant("cert-manager")
    cert = r.get("Certificate", "stash-apiserver-cert")
    assert cert["spec"]["secretName"] == "stash-apiserver-cert"
    assert cert["spec"]["dnsNames"] == ["stash", "stash.stash", "stash.stash.svc", "stash.stash.svc.cluster.local"]
    assert cert["spec"]["issuerRef"] == {"name": "stash-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert r.get("Certificate", "stash-ca")["spec"]["isCA"] is True
    assert "selfSigned" in r.get("Issuer", "stash-selfsigned")["spec"]
    assert r.get("Issuer", "stash-ca")["spec"] == {"ca": {"secretName": "stash-ca"}}
    inject = {"cert-manager.io/inject-ca-from": "stash/stash-apiserver-cert"}
    for kind, name in [
        ("APIService", "v1alpha1.repositories.stash.appscode.com"),
        ("MutatingWebhookConfiguration", "stash-admission"),
        ("ValidatingWebhookConfiguration", "stash-admission"),
    ]:
        assert r.get(kind, name)["metadata"]["annotations"] == inject
    dep = r.get("Deployment", "stash-operator")
    assert env(container(dep, "operator"))["STASH_CERT_SOURCE"] == "cert-manager"
    # The pod waits for cert-manager's Secret instead of starting without a certificate.
    assert "optional" not in volumes(dep)["serving-cert"]["secret"]


def test_cert_manager_with_an_existing_issuer() -> None:
    r = rendered_variant("cert-manager-cluster-issuer")
    assert r.all("Issuer") == [] and [c["metadata"]["name"] for c in r.all("Certificate")] == ["stash-apiserver-cert"]
    assert r.get("Certificate", "stash-apiserver-cert")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"
    }


# --- images, names ---------------------------------------------------------------------------


def test_images_and_pull_secrets() -> None:
    r = rendered_variant("everything")
    dep, ds = r.get("Deployment", "stash-operator"), r.get("DaemonSet", "stash-node-agent")
    assert container(dep, "operator")["image"] == "registry.example.com/team/stash-operator:v9.9.9"
    assert container(ds, "agent")["image"] == "registry.example.com/team/stash-node-agent:v9.9.9"
    for w in (dep, ds):
        assert w["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other-cred"}]
    e = env(container(dep, "operator"))
    assert e["STASH_IMAGE_PULL_SECRETS"] == "regcred,other-cred"
    assert e["STASH_AGENT_IMAGE"] == "registry.example.com/team/stash-node-agent:v9.9.9"
    assert e["STASH_OPERATOR_IMAGE"] == "registry.example.com/team/stash-operator:v9.9.9"
    assert e["STASH_LOG_FORMAT"] == "json" and e["STASH_LOG_LEVEL"] == "info,stash_node_agent=debug"
    assert e["RUST_BACKTRACE"] == "1"
    agent_env = env(container(ds, "agent"))
    assert agent_env["STASH_LOG_LEVEL"] == "debug" and agent_env["STASH_LOG_FORMAT"] == "json"
    assert agent_env["STASH_READ_MODE"] == "stream" and agent_env["STASH_MAX_CONCURRENT_VOLUMES"] == "4"
    # No cgroup root: nothing of the host's cgroups is mounted, and the agent looks at its own.
    assert "STASH_CGROUP_ROOT" not in agent_env and "cgroup" not in volumes(ds)
    sa = r.get("ServiceAccount", "stash-operator")
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "stash@p.iam"}
    assert all(d["metadata"]["labels"]["team"] == "storage" for d in r.docs)
    assert "imagePullSecrets" not in rendered_variant("default").get("Deployment", "stash-operator")["spec"]["template"]["spec"]


def test_per_component_image_tags_and_empty_registry() -> None:
    r = render({"image": {"registry": ""}, "operator": {"image": {"tag": "op-1"}}})
    assert container(r.get("Deployment", "stash-operator"), "operator")["image"] == "stash-operator:op-1"
    assert container(r.get("DaemonSet", "stash-node-agent"), "agent")["image"] == "stash-node-agent:0.1.0"


@pytest.mark.parametrize(
    ("release", "overrides", "base"),
    [
        ("stash", {}, "stash"),
        ("backup", {}, "backup-stash"),
        ("my-stash", {}, "my-stash"),
        ("x", {"fullnameOverride": "a" * 42}, "a" * 42),
        ("very-long-release-name-for-the-backup-system-01", {}, None),
    ],
)
def test_object_names(release: str, overrides: dict, base: str | None) -> None:
    r = render(overrides, name=release)
    names = {d["kind"] + "/" + d["metadata"]["name"] for d in r.docs}
    if base is not None:
        assert f"Deployment/{base}-operator" in names
        assert f"DaemonSet/{base}-node-agent" in names
        assert f"Service/{base}" in names
    for svc in r.all("Service"):
        assert len(svc["metadata"]["name"]) <= 63
    e = env(container(r.all("Deployment")[0], "operator"))
    assert e["STASH_SERVICE_NAME"] in {s["metadata"]["name"] for s in r.all("Service")}
