"""`helm install` through Helm's own engine into kube-sim (tests/kube-sim, an in-memory
Kubernetes API server): every object is accepted and stored as rendered, the CRDs are
established, and `helm uninstall` removes everything but the CRDs (Helm keeps those). The same
for deploy/stash.yaml through `kubectl apply --server-side`, as a user without Helm would.

kube-sim is found at $KUBE_SIM_BIN, else $CARGO_TARGET_DIR/debug/kube-sim, else
target/debug/kube-sim. When it is missing the tests are skipped with the reason printed,
unless STASH_REQUIRE_KUBE_SIM=1 (set by `make test`), which makes a missing binary a failure.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

import chartlib
from conftest import WEBHOOKS_ON

CRD_COUNT = 12


def kube_sim_binary() -> Path | None:
    candidates = []
    if os.environ.get("KUBE_SIM_BIN"):
        candidates.append(Path(os.environ["KUBE_SIM_BIN"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "kube-sim")
    candidates.append(chartlib.REPO / "target" / "debug" / "kube-sim")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh kube-sim per test."""
    binary = kube_sim_binary()
    if binary is None:
        reason = (
            "kube-sim binary not found (looked at $KUBE_SIM_BIN, $CARGO_TARGET_DIR/debug/kube-sim, "
            "target/debug/kube-sim): build it with `cargo build -p kube-sim`"
        )
        if os.environ.get("STASH_REQUIRE_KUBE_SIM") == "1":
            pytest.fail(reason + " (STASH_REQUIRE_KUBE_SIM=1)")
        pytest.skip(reason)
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH (make setup installs it)")
    work = tmp_path_factory.mktemp("kube-sim")
    kc = work / "kubeconfig"
    log = (work / "kube-sim.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "serve", "--addr", "127.0.0.1:0", "--kubeconfig-out", str(kc)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not kc.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"kube-sim did not start: {(work / 'kube-sim.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield kc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_kubectl(kc: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KUBECONFIG=str(kc), KUBECACHEDIR=str(kc.parent / "cache"))
    return subprocess.run(["kubectl", *args], env=env, input=input, capture_output=True, text=True, timeout=60)


def kubectl(kc: Path, *args: str, input: str | None = None) -> str:
    done = run_kubectl(kc, *args, input=input)
    assert done.returncode == 0, f"kubectl {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def contains(stored: Any, rendered: Any, path: str = "") -> list[str]:
    """Where the stored object lacks or changed something the chart rendered."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [f"{path}: stored {stored!r}"]
        out: list[str] = []
        for k, v in rendered.items():
            if k not in stored:
                out.append(f"{path}.{k}: missing")
            else:
                out += contains(stored[k], v, f"{path}.{k}")
        return out
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [f"{path}: stored {stored!r}, rendered {rendered!r}"]
        return [d for i, (s, r) in enumerate(zip(stored, rendered)) for d in contains(s, r, f"{path}[{i}]")]
    return [] if stored == rendered else [f"{path}: stored {stored!r}, rendered {rendered!r}"]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


INSTALLS = {
    "default": {},
    # Several replicas, no agent restore, another kubelet root, pull secrets, both webhooks
    # (off by default: the operator does not serve them yet).
    "variant": {
        "operator": {"replicas": 2},
        "agent": {"kubeletRoot": "/var/lib/k0s/kubelet", "restore": {"inPlace": False}, "ioUring": "off"},
        "imagePullSecrets": ["regcred"],
        "webhooks": WEBHOOKS_ON,
    },
}


@pytest.mark.parametrize("name", list(INSTALLS))
def test_install_into_kube_sim_and_uninstall(kubeconfig: Path, name: str) -> None:
    values = copy.deepcopy(INSTALLS[name])
    with helm.Config(kubeconfig_path=kubeconfig, namespace=chartlib.NAMESPACE) as cfg:
        release = cfg.install(
            str(chartlib.CHART), chartlib.RELEASE, values,
            namespace=chartlib.NAMESPACE, create_namespace=True, timeout=120,
        )
        try:
            assert release["status"] == "deployed", release
            manifest = release["manifest"]
            rendered = [d for d in yaml.safe_load_all(manifest) if d]
            assert sorted(map(key, rendered)) == sorted(map(key, chartlib.render(copy.deepcopy(values)).docs))

            crds = json.loads(kubectl(kubeconfig, "get", "crd", "-o", "json"))["items"]
            stash_crds = [c for c in crds if c["spec"]["group"] in ("stash.appscode.com", "appcatalog.appscode.com")]
            assert len(stash_crds) == CRD_COUNT
            for c in stash_crds:
                conds = {x["type"]: x["status"] for x in c.get("status", {}).get("conditions", [])}
                assert conds.get("Established") == "True", c["metadata"]["name"]

            # Every object the release rendered is stored, with every rendered field intact.
            stored = json.loads(kubectl(kubeconfig, "get", "-f", "-", "-o", "json", input=manifest))["items"]
            assert len(stored) == len(rendered)
            for want, got in zip(rendered, stored):
                assert (got["kind"], got["metadata"]["name"]) == (want["kind"], want["metadata"]["name"])
                diffs = contains(got, want)
                assert diffs == [], f"{want['kind']}/{want['metadata']['name']}: {diffs}"

            assert [(r["name"], r["status"]) for r in cfg.list()] == [(chartlib.RELEASE, "deployed")]
        finally:
            cfg.uninstall(chartlib.RELEASE, timeout=60)

    left = kubectl(kubeconfig, "get", "-f", "-", "--ignore-not-found", "-o", "name", input=manifest)
    assert left.strip() == "", f"left after uninstall:\n{left}"
    # Helm never deletes CRDs (and with them every backup definition).
    crds = json.loads(kubectl(kubeconfig, "get", "crd", "-o", "json"))["items"]
    assert len([c for c in crds if c["spec"]["group"].endswith("appscode.com")]) == CRD_COUNT


def test_deploy_manifest_applies_with_kubectl(kubeconfig: Path) -> None:
    manifest = chartlib.DEPLOY_MANIFEST.read_text()
    out = kubectl(kubeconfig, "apply", "--server-side", "-f", str(chartlib.DEPLOY_MANIFEST))
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    assert len(out.strip().splitlines()) == len(docs), out
    kubectl(kubeconfig, "wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    stored = json.loads(kubectl(kubeconfig, "get", "-f", str(chartlib.DEPLOY_MANIFEST), "-o", "json"))["items"]
    assert [key(s) for s in stored] == [key(d) for d in docs]
    for want, got in zip(docs, stored):
        if want["kind"] == "CustomResourceDefinition":
            continue  # the server adds defaults inside the schemas; kube-sim's own tests cover CRDs
        assert contains(got, want) == [], key(want)
    # A second apply is accepted as well (what `kubectl apply` after an update does).
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(chartlib.DEPLOY_MANIFEST))
    # Deleting the namespace first takes its objects with it, hence --ignore-not-found.
    kubectl(kubeconfig, "delete", "-f", str(chartlib.DEPLOY_MANIFEST), "--ignore-not-found", "--wait=false")
    left = kubectl(kubeconfig, "get", "-f", str(chartlib.DEPLOY_MANIFEST), "--ignore-not-found", "-o", "name")
    assert left.strip() == "", f"left after kubectl delete:\n{left}"


def can_i(kc: Path, user: str, verb: str, resource: str, namespace: str) -> bool:
    """`kubectl auth can-i` as the user, answered by kube-sim's RBAC (exit status 1 is "no")."""
    done = run_kubectl(kc, "auth", "can-i", verb, resource, "-n", namespace, "--as", user)
    assert done.returncode in (0, 1) and done.stdout.strip() in ("yes", "no"), done.stderr
    return done.stdout.strip() == "yes"


def test_operator_binds_a_trigger_service_account_to_the_trigger_role(kubeconfig: Path) -> None:
    """What the operator does per BackupConfiguration, as the operator: a ServiceAccount and a
    RoleBinding of it to the trigger ClusterRole, by server-side apply; the trigger pods may then
    do exactly what the role says, there and nowhere else."""
    kubectl(kubeconfig, "apply", "--server-side", "-f", str(chartlib.DEPLOY_MANIFEST))
    kubectl(kubeconfig, "create", "namespace", "app")
    operator = f"system:serviceaccount:{chartlib.NAMESPACE}:stash-operator"
    trigger = "system:serviceaccount:app:stash-trigger-nightly"
    role = "stash-operator-trigger"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "stash-trigger-nightly", "namespace": "app"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "stash-trigger-nightly", "namespace": "app"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
         "subjects": [{"kind": "ServiceAccount", "name": "stash-trigger-nightly", "namespace": "app"}]},
    ]
    assert not can_i(kubeconfig, trigger, "create", "backupsessions.stash.appscode.com", "app")  # not yet bound
    kubectl(kubeconfig, "apply", "--server-side", "--field-manager=stash-operator", "--as", operator,
            "-f", "-", input=yaml.safe_dump_all(objects))
    bcs, sessions = "backupconfigurations.stash.appscode.com", "backupsessions.stash.appscode.com"
    for verb, resource in [("get", bcs), ("create", sessions)]:
        # Kubernetes lets the operator bind the role only because it holds these itself.
        assert can_i(kubeconfig, operator, verb, resource, "app"), (verb, resource)
        assert can_i(kubeconfig, trigger, verb, resource, "app"), (verb, resource)
        assert not can_i(kubeconfig, trigger, verb, resource, "other"), (verb, resource)
    for verb, resource in [("list", bcs), ("update", bcs), ("delete", sessions), ("get", "secrets"), ("create", "pods")]:
        assert not can_i(kubeconfig, trigger, verb, resource, "app"), (verb, resource)
