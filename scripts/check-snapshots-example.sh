#!/usr/bin/env bash
# The native reader's example program must agree with `restic snapshots --json` on a
# repository it has never seen: a fresh one, written by restic here, with several hosts, tags
# and paths. Run by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RESTIC_REPOSITORY="$work/repo" RESTIC_PASSWORD="example $RANDOM" RESTIC_CACHE_DIR="$work/cache"
mkdir -p "$work/a" "$work/b"
head -c 100000 /dev/urandom >"$work/a/file"
echo hello >"$work/b/file"
restic init -q
restic backup -q --host host-0 --tag daily "$work/a"
restic backup -q --host host-1 --tag daily --tag key=ns/app/vol "$work/a" "$work/b"
echo stream | restic backup -q --host db-0 --stdin --stdin-filename dump.sql
restic rewrite -q --new-host renamed --tag daily

cargo build -q --locked -p restic-wrapper --example snapshots
ours=$(target/debug/examples/snapshots --repo "$RESTIC_REPOSITORY")
theirs=$(restic snapshots --json --no-lock)
python3 - "$ours" "$theirs" <<'PY'
import json, sys
ours, theirs = (json.loads(a) for a in sys.argv[1:3])
# restic orders by time and leaves ties (a snapshot and its rewritten copy) in listing order.
key = lambda s: (s["time"], s["id"])
if [s["time"] for s in ours] != [s["time"] for s in theirs]:
    sys.exit("the example orders snapshots differently from restic")
if sorted(ours, key=key) != sorted(theirs, key=key):
    sys.exit(f"the example disagrees with restic:\n ours: {ours}\n restic: {theirs}")
print(f"snapshots example agrees with restic on {len(theirs)} snapshots, field by field")
PY
