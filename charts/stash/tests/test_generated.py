"""Generated and hand-kept files agree with the chart: deploy/stash.yaml, the README's values
table, the CRDs, Chart.yaml's version, and the Dockerfile the images come from."""

from __future__ import annotations

import re
import tomllib

import yaml

import chartlib
from conftest import container, env


def test_deploy_manifest_is_current() -> None:
    assert chartlib.DEPLOY_MANIFEST.exists(), "deploy/stash.yaml is missing: run 'make generate'"
    assert chartlib.DEPLOY_MANIFEST.read_text() == chartlib.deploy_manifest(), (
        "deploy/stash.yaml is stale: run 'make generate' (scripts/render-chart.sh)"
    )


def test_deploy_manifest_holds_the_namespace_crds_and_every_object() -> None:
    docs = [d for d in yaml.safe_load_all(chartlib.DEPLOY_MANIFEST.read_text()) if d]
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == chartlib.NAMESPACE
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    assert len(crds) == len(list((chartlib.CHART / "crds").glob("*.yaml"))) == 12
    rest = [d for d in docs if d["kind"] not in ("Namespace", "CustomResourceDefinition")]
    assert rest == chartlib.render().docs


def test_readme_values_table_is_current() -> None:
    readme = chartlib.README.read_text()
    assert readme == chartlib.readme_with_table(readme), (
        "the values table in charts/stash/README.md is stale: run 'make generate'"
    )


def test_every_value_is_documented() -> None:
    values = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())
    documented = {d.key for d in chartlib.documented_values()}
    for leaf in chartlib.leaf_keys(values):
        parts = leaf.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        assert prefixes & documented, f"values.yaml key {leaf} has no '# --' description"
    schema_props = set()

    def walk(node: dict, prefix: str = "") -> None:
        for k, v in node.get("properties", {}).items():
            path = f"{prefix}.{k}" if prefix else k
            schema_props.add(path)
            walk(v, path)

    import json

    walk(json.loads((chartlib.CHART / "values.schema.json").read_text()))
    for key in documented:
        assert key in schema_props, f"{key} is documented but not in values.schema.json"


def test_chart_version_follows_the_workspace() -> None:
    chart = yaml.safe_load((chartlib.CHART / "Chart.yaml").read_text())
    cargo = tomllib.loads((chartlib.REPO / "Cargo.toml").read_text())
    assert chart["appVersion"] == cargo["workspace"]["package"]["version"]


def test_crds_are_the_generated_ones() -> None:
    for crd in sorted((chartlib.CHART / "crds").glob("*.yaml")):
        doc = yaml.safe_load(crd.read_text())
        assert doc["kind"] == "CustomResourceDefinition"
        assert crd.name == f"{doc['spec']['group']}_{doc['spec']['names']['plural']}.yaml"
    assert not (chartlib.CHART / "templates" / "crds").exists()


def test_dockerfile_builds_the_images_the_chart_runs() -> None:
    text = (chartlib.REPO / "Dockerfile").read_text()
    stages = re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", text)
    values = yaml.safe_load((chartlib.CHART / "values.yaml").read_text())
    # `make image` tags the targets with the chart's repository names.
    assert values["operator"]["image"]["repository"] in stages
    assert values["agent"]["image"]["repository"] in stages
    operator = text.split("AS stash-operator", 1)[1].split("\nFROM ", 1)[0]
    agent = text.split("AS stash-node-agent", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"(?m)^USER 65534", operator), "the operator image runs as non-root"
    assert 'ENTRYPOINT ["/usr/local/bin/stash-operator"]' in operator
    assert 'ENTRYPOINT ["/usr/local/bin/stash-node-agent"]' in agent
    # The agent image is the stage that installed Debian's restic package and checked its version.
    assert re.search(r"(?m)^FROM restic AS stash-node-agent$", text)
    restic_stage = text.split("AS restic\n", 1)[1].split("\nFROM ", 1)[0]
    assert "apt-get install -y --no-install-recommends restic" in restic_stage
    assert "restic >= 0.17 is required" in restic_stage
    # ...at the path the chart tells the operator (STASH_RESTIC).
    restic = env(container(chartlib.render().get("Deployment", "stash-operator"), "operator"))["STASH_RESTIC"]
    assert f"COPY --from=restic /usr/bin/restic {restic}\n" in operator
    ignored = (chartlib.REPO / ".dockerignore").read_text().split()
    assert "target" in ignored or "/target" in ignored
