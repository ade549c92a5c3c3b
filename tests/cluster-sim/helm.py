"""`helm` on the command line, run by Helm's own engine (helm-python-sdk's Helm v4 SDK).

scripts/setup.sh installs this as .tools/bin/helm. It takes the commands and flags users
type — install, upgrade [--install], uninstall, list, status, template, lint, version;
-n/--namespace, --create-namespace, --set, --set-string, --set-json, -f/--values, --wait,
--timeout, --dry-run, --kubeconfig, --kube-context — and prints what helm prints.
"""

import argparse
import json
import os
import re
import sys

import helm_python as helm
import yaml


def duration(text):
    """Go durations as helm takes them (`5m0s`, `300s`, `90`) in seconds."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    if total == 0 and text not in ("0", "0s"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
    return int(total)


def merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def values_of(args):
    """-f files in order, then the --set flags in the order given (as helm merges them)."""
    vals = {}
    for f in args.values or []:
        with open(f) if f != "-" else sys.stdin as fh:
            merge(vals, yaml.safe_load(fh) or {})
    for kind, expr in args.sets or []:
        parse = {
            "set": helm.parse_set_string,
            "set-string": helm.parse_set_string_values,
            "set-json": helm.parse_set_json,
            "set-file": helm.parse_set_file,
        }[kind]
        merge(vals, parse(expr))
    return vals


class SetAction(argparse.Action):
    def __call__(self, parser, ns, value, option=None):
        items = getattr(ns, "sets", None) or []
        items.append((option.lstrip("-"), value))
        ns.sets = items


def context_namespace(kubeconfig, context):
    try:
        with open(kubeconfig) as fh:
            cfg = yaml.safe_load(fh) or {}
    except OSError:
        return None
    name = context or cfg.get("current-context")
    for c in cfg.get("contexts") or []:
        if c.get("name") == name:
            return (c.get("context") or {}).get("namespace")
    return None


def config(args):
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG", "").split(":")[0] or os.path.expanduser(
        "~/.kube/config"
    )
    ns = args.namespace or context_namespace(kubeconfig, args.kube_context) or "default"
    cfg = helm.Config(kubeconfig_path=kubeconfig, kube_context=args.kube_context, namespace=ns)
    return cfg, ns


def field(rel, *names, default=""):
    for n in names:
        cur = rel
        for part in n.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur not in (None, ""):
            return cur
    return default


def print_release(rel, ns, show_notes=True):
    print(f"NAME: {field(rel, 'name')}")
    print(f"LAST DEPLOYED: {field(rel, 'deployed_at', 'info.last_deployed')}")
    print(f"NAMESPACE: {field(rel, 'namespace', default=ns)}")
    print(f"STATUS: {field(rel, 'info.status', 'status')}")
    print(f"REVISION: {field(rel, 'version', 'revision')}")
    print("TEST SUITE: None")
    notes = field(rel, "info.notes", "notes")
    if show_notes and notes:
        print("NOTES:")
        print(notes.rstrip("\n"))


def wait_mode(args):
    return "watcher" if args.wait else None


def cmd_install(args, upgrade=False):
    cfg, ns = config(args)
    vals = values_of(args)
    common = dict(namespace=ns, timeout=args.timeout, wait=wait_mode(args), dry_run=args.dry_run)
    if upgrade:
        names = {r.get("name") for r in cfg.list(all_states=True)}
        if args.release not in names:
            if not args.install:
                sys.exit(f'Error: UPGRADE FAILED: "{args.release}" has no deployed releases')
            rel = cfg.install(args.chart, args.release, vals, create_namespace=args.create_namespace, **common)
            print(f'Release "{args.release}" does not exist. Installing it now.')
        else:
            rel = cfg.upgrade(args.chart, args.release, vals, reuse_values=args.reuse_values, **common)
            print(f'Release "{args.release}" has been upgraded. Happy Helming!')
    else:
        rel = cfg.install(args.chart, args.release, vals, create_namespace=args.create_namespace, **common)
    print_release(rel, ns)


def cmd_uninstall(args):
    cfg, _ = config(args)
    for name in args.releases:
        cfg.uninstall(name, wait=wait_mode(args), timeout=args.timeout, keep_history=args.keep_history)
        print(f'release "{name}" uninstalled')


def cmd_list(args):
    cfg, ns = config(args)
    rels = cfg.list(all_states=args.all, all_namespaces=args.all_namespaces)
    if not args.all_namespaces:
        rels = [r for r in rels if field(r, "namespace", default=ns) == ns]
    if args.output == "json":
        print(json.dumps(rels))
        return
    rows = [["NAME", "NAMESPACE", "REVISION", "UPDATED", "STATUS", "CHART", "APP VERSION"]]
    for r in rels:
        rows.append(
            [
                str(field(r, "name")),
                str(field(r, "namespace")),
                str(field(r, "version", "revision")),
                str(field(r, "deployed_at", "info.last_deployed")),
                str(field(r, "info.status", "status")),
                f'{field(r, "chart_name")}-{field(r, "chart_version")}',
                str(field(r, "app_version", "appVersion")),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("\t".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_status(args):
    cfg, ns = config(args)
    print_release(cfg.status(args.release), ns)


def cmd_template(args):
    _, ns = config(args) if (args.kubeconfig or os.environ.get("KUBECONFIG")) else (None, args.namespace or "default")
    with helm.Chart.load(args.chart) as chart:
        out = chart.render(values=values_of(args), name=args.release, namespace=ns, is_install=True)
    for path in sorted(out):
        if path.endswith("NOTES.txt") or not out[path].strip():
            continue
        if args.show_only and not any(path.endswith(s) for s in args.show_only):
            continue
        print("---")
        print(f"# Source: {path}")
        print(out[path].strip("\n"))


def cmd_lint(args):
    failed = 0
    for path in args.charts:
        res = helm.lint(path, values_of(args) or None, strict=args.strict or None, namespace=args.namespace)
        messages = res.get("messages") or []
        # Helm's support levels: 1 info, 2 warning, 3 error.
        levels = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
        errors = [m for m in messages if m.get("severity") == 3 or (args.strict and m.get("severity") == 2)]
        print(f"==> Linting {path}")
        for m in messages:
            print(f"[{levels.get(m.get('severity'), 'INFO')}] {m.get('path', '')}: {m.get('error', '')}")
        ok = not errors and not res.get("errors")
        failed += 0 if ok else 1
        print()
    print(f"{len(args.charts)} chart(s) linted, {failed} chart(s) failed")
    if failed:
        sys.exit(1)


def main(argv):
    p = argparse.ArgumentParser(prog="helm", description="Helm (helm-python-sdk's Helm v4 engine)")
    p.add_argument("--kubeconfig")
    p.add_argument("--kube-context")
    p.add_argument("-n", "--namespace")
    sub = p.add_subparsers(dest="command", required=True)

    def values_flags(sp):
        sp.add_argument("-f", "--values", action="append")
        for flag in ("--set", "--set-string", "--set-json", "--set-file"):
            sp.add_argument(flag, action=SetAction, dest="sets")

    def release_flags(sp):
        values_flags(sp)
        sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
        sp.add_argument("--create-namespace", action="store_true")
        sp.add_argument("--wait", action="store_true")
        sp.add_argument("--timeout", type=duration, default=300)
        sp.add_argument("--dry-run", nargs="?", const="client", default=None)
        sp.add_argument("--kubeconfig", default=argparse.SUPPRESS)

    sp = sub.add_parser("install")
    sp.add_argument("release")
    sp.add_argument("chart")
    release_flags(sp)
    sp.set_defaults(run=cmd_install)

    sp = sub.add_parser("upgrade")
    sp.add_argument("release")
    sp.add_argument("chart")
    sp.add_argument("-i", "--install", action="store_true")
    sp.add_argument("--reuse-values", action="store_true")
    release_flags(sp)
    sp.set_defaults(run=lambda a: cmd_install(a, upgrade=True))

    sp = sub.add_parser("uninstall", aliases=["delete", "un", "del"])
    sp.add_argument("releases", nargs="+")
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    sp.add_argument("--wait", action="store_true")
    sp.add_argument("--keep-history", action="store_true")
    sp.add_argument("--timeout", type=duration, default=300)
    sp.set_defaults(run=cmd_uninstall)

    sp = sub.add_parser("list", aliases=["ls"])
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    sp.add_argument("-A", "--all-namespaces", action="store_true")
    sp.add_argument("-a", "--all", action="store_true")
    sp.add_argument("-o", "--output", default="table")
    sp.set_defaults(run=cmd_list)

    sp = sub.add_parser("status")
    sp.add_argument("release")
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    sp.set_defaults(run=cmd_status)

    sp = sub.add_parser("template")
    sp.add_argument("release", nargs="?", default="release-name")
    sp.add_argument("chart", nargs="?")
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    sp.add_argument("-s", "--show-only", action="append")
    values_flags(sp)
    sp.set_defaults(run=cmd_template)

    sp = sub.add_parser("lint")
    sp.add_argument("charts", nargs="*", default=["."])
    sp.add_argument("--strict", action="store_true")
    sp.add_argument("-n", "--namespace", default=argparse.SUPPRESS)
    values_flags(sp)
    sp.set_defaults(run=cmd_lint)

    sp = sub.add_parser("version")
    sp.set_defaults(run=lambda a: print(f'version.BuildInfo{{Version:"{helm.helm_sdk_version()}"}}'))

    args = p.parse_args(argv)
    for attr in ("namespace", "kubeconfig", "sets", "values"):
        if not hasattr(args, attr):
            setattr(args, attr, None)
    if args.command == "template" and args.chart is None:
        args.release, args.chart = "release-name", args.release
    try:
        args.run(args)
    except helm.HelmError as e:
        sys.exit(f"Error: {e}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BrokenPipeError:
        sys.exit(1)
