#!/usr/bin/env bash
# `make demo-agent`: the node agent's data path on this machine, no cluster needed. Generates a
# sample volume, backs it up with the standalone agent in both read modes into a local
# repository, lists the snapshots with stock restic, restores each into a new directory,
# checks the copies are identical, and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PATH"
cargo build -q --release --locked -p stash-node-agent
agent="$PWD/target/release/stash-node-agent"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RESTIC_PASSWORD="demo-$RANDOM" STASH_RESTIC="$(command -v restic)"
repo="$work/repository"
volume="$work/volume"

echo "== a sample volume: 64 MiB of large files and 2,000 small ones, links, odd names"
mkdir -p "$volume/db" "$volume/uploads"
for i in 1 2; do head -c $((32 << 20)) /dev/urandom >"$volume/db/segment-$i"; done
python3 - "$volume/uploads" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(2000):
    d = os.path.join(root, f"{i // 100:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file-{i}.txt"), "wb") as f:
        f.write(os.urandom(2048))
PY
ln -s db/segment-1 "$volume/current"
ln "$volume/db/segment-2" "$volume/db/segment-2.hardlink"
printf 'latin-1 name' >"$volume/$(printf 'caf\xe9')"
du -sh "$volume" | sed 's/^/   /'

summary() {
  python3 - "$1" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
print(f"   snapshot {s['snapshot_id'][:8]}  {s.get('bytes', 0) / 1048576:.1f} MiB  "
      f"{s.get('files', 0)} files  {s['duration_seconds']:.2f} s  unchanged={s.get('unchanged', False)}")
PY
}
for mode in stream direct; do
  # The IO budget paces the agent's own reader in stream mode, and restic's reads (in a
  # cgroup of its own) in direct mode.
  budget=(--io-budget 200Mi)
  echo "== backup, $mode mode (IO budget 200 MiB/s)"
  out=$("$agent" backup --repo "$repo" --path "$volume" --mode "$mode" "${budget[@]}" --host host-0 --key demo/app/data)
  summary "$out"
  eval "id_$mode=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["snapshot_id"])' "$out")"
  echo "== again, nothing changed"
  summary "$("$agent" backup --repo "$repo" --path "$volume" --mode "$mode" --host host-0 --key demo/app/data)"
done

echo "== stock restic lists the snapshots"
restic -r "$repo" --no-cache snapshots | sed 's/^/   /'

for mode in stream direct; do
  id_var="id_$mode"
  target="$work/restored-$mode"
  echo "== restore the $mode snapshot into a new directory"
  summary "$("$agent" restore --repo "$repo" --snapshot "${!id_var}" --target "$target" --owners)"
  if diff -r --no-dereference "$volume" "$target" >/dev/null; then
    echo "   identical to the volume"
  else
    echo "   DIFFERENT from the volume" >&2
    exit 1
  fi
done
restic -r "$repo" --no-cache check -q && echo "== restic check: no errors"
echo "== demo complete"
