#!/usr/bin/env bash
# scripts/render-chart.sh — the chart's generated files, written by Helm's own engine:
#   deploy/stash.yaml          the chart rendered with default values (release and namespace
#                              "stash"), after its Namespace and the CRDs, for kubectl users
#   charts/stash/README.md     the values table, from the "# --" comments of values.yaml
#
#   scripts/render-chart.sh           rewrite them (`make generate`)
#   scripts/render-chart.sh --check   fail, with a diff, if either is stale
#
# Needs .tools/bin/python-helm (helm-python-sdk, from `make setup`); no helm binary.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.tools/bin/python-helm
[[ -x $python ]] || { echo "render-chart: $python is missing: run 'make setup'" >&2; exit 1; }

case "${1:-}" in
    "") exec "$python" charts/stash/tests/chartlib.py write ;;
    --check) exec "$python" charts/stash/tests/chartlib.py check ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
