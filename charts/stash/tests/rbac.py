"""What a ServiceAccount may do according to the rendered RBAC objects (Kubernetes' rules:
wildcards, resourceNames, subresources, RoleBindings limited to their namespace)."""

from __future__ import annotations

from typing import Any

import chartlib

# Roles the chart binds to but does not create: they come with every cluster.
BUILTIN_CLUSTER_ROLES = {"system:auth-delegator"}
BUILTIN_ROLES = {("kube-system", "extension-apiserver-authentication-reader")}


def _matches(rule: dict[str, Any], group: str, resource: str, verb: str, name: str | None) -> bool:
    if not ({group, "*"} & set(rule.get("apiGroups", []))):
        return False
    resources = set(rule.get("resources", []))
    if not ({resource, "*"} & resources):
        return False
    if not ({verb, "*"} & set(rule.get("verbs", []))):
        return False
    names = rule.get("resourceNames")
    return not names or (name is not None and name in names)


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str | None]]:
    """Every (apiGroup, resource, verb, resourceName or None) the rules name; wildcards stay "*"."""
    out: set[tuple[str, str, str, str | None]] = set()
    for rule in rules:
        assert not rule.get("nonResourceURLs"), f"nonResourceURLs are not modelled: {rule}"
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    for name in rule.get("resourceNames") or [None]:
                        out.add((group, resource, verb, name))
    return out


def _bound(binding: dict[str, Any], namespace: str, sa: str) -> bool:
    return any(
        s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == namespace
        for s in binding.get("subjects", [])
    )


class Permissions:
    """The rules granted to one ServiceAccount by the chart's own roles."""

    def __init__(self, rendered: chartlib.Rendered, sa: str, namespace: str = chartlib.NAMESPACE):
        self.cluster: list[dict[str, Any]] = []
        self.namespaced: dict[str, list[dict[str, Any]]] = {}
        self.builtin: set[str] = set()
        for crb in rendered.all("ClusterRoleBinding"):
            if not _bound(crb, namespace, sa):
                continue
            ref = crb["roleRef"]["name"]
            if ref in BUILTIN_CLUSTER_ROLES:
                self.builtin.add(ref)
            else:
                self.cluster += rendered.get("ClusterRole", ref)["rules"]
        for rb in rendered.all("RoleBinding"):
            if not _bound(rb, namespace, sa):
                continue
            ns, ref = rb["metadata"]["namespace"], rb["roleRef"]
            if (ns, ref["name"]) in BUILTIN_ROLES:
                self.builtin.add(ref["name"])
                continue
            role = rendered.get(ref["kind"], ref["name"])
            self.namespaced.setdefault(ns, []).extend(role["rules"])

    def can(
        self,
        verb: str,
        resource: str,
        group: str = "",
        *,
        namespace: str | None = None,
        name: str | None = None,
    ) -> bool:
        """Whether the verb is allowed; namespace None asks about a cluster-wide grant."""
        rules = list(self.cluster)
        if namespace is not None:
            rules += self.namespaced.get(namespace, [])
        return any(_matches(r, group, resource, verb, name) for r in rules)

    def all_rules(self) -> list[dict[str, Any]]:
        return self.cluster + [r for rules in self.namespaced.values() for r in rules]

    def missing(self, rules: list[dict[str, Any]], namespace: str) -> list[tuple[str, str, str, str | None]]:
        """What of the rules this account does not hold in the namespace. Kubernetes refuses a
        RoleBinding there to a role with these rules unless this is empty (RBAC escalation
        prevention; the account has no `bind` on the role). A "*" in the rules is covered only
        by a "*" of the account's."""
        lacking = [
            (group, res, verb, name) for group, res, verb, name in grants(rules)
            if not self.can(verb, res, group, namespace=namespace, name=name)
        ]
        return sorted(lacking, key=str)
