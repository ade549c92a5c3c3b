#!/usr/bin/env bash
# `make demo`: the whole product on the simulated cluster. Brings up two simulated nodes
# (kube-sim plus cluster-sim's controllers and kubelets, which run this checkout's binaries
# as the chart's images) and a Garage S3 server, installs the chart with `helm install`,
# applies the Deployment, Repository and BackupConfiguration of deploy/examples/, writes data
# into the running Deployment's volume, backs it up with an instant BackupSession — no
# sidecar, no restart: the pod UIDs are shown before and after — and shows the result with
# kubectl, stock restic and the pushgateway; then damages the volume and restores it in place
# with a RestoreSession, into the same running pod. Everything it started stops when it ends.
# Needs root (network namespaces and bind mounts for the simulated kubelets).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PATH"
root="$PWD"

step() { printf '\n== %s\n' "$*"; }
cargo build -q --locked -p cluster-sim -p stash-node-agent -p stash-controller
bin="${CARGO_TARGET_DIR:-$root/target}/debug"

work=$(mktemp -d /tmp/stash-demo.XXXXXX)
pids=()
cleanup() {
  set +e
  if [[ -f "$work/cluster/cluster-sim.pid" ]]; then kill "$(cat "$work/cluster/cluster-sim.pid")"; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  # cluster-sim undoes its mounts and addresses on the way out.
  for _ in $(seq 1 60); do
    [[ -f "$work/cluster/cluster-sim.pid" ]] || break
    sleep 0.5
  done
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

step "a simulated cluster of two nodes"
"$bin/cluster-sim" up --state "$work/cluster" --nodes 2 \
  --image-binary "stash-node-agent=$bin/stash-node-agent,stash-operator=$bin/stash-operator,pushgateway=$(readlink -f .tools/bin/pushgateway)" \
  --image-file "/usr/local/bin/restic=$(readlink -f .tools/bin/restic)" \
  --run-image busybox >"$work/cluster.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 240); do
  grep -q 'is up' "$work/cluster.log" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$work/cluster.log"; exit 1; }
  sleep 0.5
done
export KUBECONFIG="$work/cluster/kubeconfig"
gateway=$(sed -n 's#.*server: https://\([0-9.]*\):.*#\1#p' "$KUBECONFIG")
kubectl get nodes

step "a Garage S3 server at $gateway, where the pods reach the host"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
s3_port=$(port)
mkdir -p "$work/garage"
cat >"$work/garage/garage.toml" <<EOF
metadata_dir = "$work/garage/meta"
data_dir = "$work/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$(port)"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "$gateway:$s3_port"
root_domain = ".s3.garage"
EOF
garage() { .tools/bin/garage -c "$work/garage/garage.toml" "$@"; }
# Started directly (not through the function), so $! is garage itself and the cleanup stops it.
.tools/bin/garage -c "$work/garage/garage.toml" server >"$work/garage/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do garage node id -q >/dev/null 2>&1 && break; sleep 0.2; done
node_id=$(garage node id -q | cut -d@ -f1)
key_id=GK0123456789abcdef01234567
key_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
garage layout assign -z dc1 -c 1G "$node_id" >/dev/null
garage layout apply --version 1 >/dev/null
garage key import --yes -n demo "$key_id" "$key_secret" >/dev/null
garage bucket create stash-demo-backups >/dev/null
garage bucket allow --read --write --owner stash-demo-backups --key demo >/dev/null
echo "   http://$gateway:$s3_port, bucket stash-demo-backups"

step "helm install stash charts/stash -n stash --create-namespace"
helm install stash charts/stash -n stash --create-namespace | sed -n '1,6p'
kubectl rollout status ds/stash-node-agent -n stash --timeout=180s
kubectl rollout status deploy/stash-operator -n stash --timeout=180s
kubectl get pods -n stash -o wide

step "kubectl apply the examples (namespace, S3 Repository, Deployment and its BackupConfiguration)"
# The examples point at AWS with placeholder keys; the demo points them at its Garage, and
# drops spec.hooks, which this operator does not run yet (it would refuse the configuration).
password="demo-$RANDOM$RANDOM"
.tools/bin/python-helm - "$root/deploy/examples" "$gateway:$s3_port" "$key_id" "$key_secret" "$password" >"$work/examples.yaml" <<'PY'
import sys, yaml
examples, endpoint, key_id, secret, password = sys.argv[1:]
docs = []
for name in ("00-namespace.yaml", "repository-s3.yaml", "backupconfiguration-deployment.yaml"):
    with open(f"{examples}/{name}") as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
for d in docs:
    if d["kind"] == "Secret":
        d["stringData"] = {"RESTIC_PASSWORD": password, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    if d["kind"] == "Repository":
        d["spec"]["backend"]["s3"].update(endpoint=f"http://{endpoint}", region="garage")
    if d["kind"] == "BackupConfiguration":
        d["spec"].pop("hooks", None)
print(yaml.safe_dump_all(docs, sort_keys=False))
PY
kubectl apply -f "$work/examples.yaml"
kubectl rollout status deploy/stash-demo -n demo --timeout=120s
pod_uids() { kubectl get pods -n demo -l app=stash-demo -o jsonpath='{range .items[*]}{.metadata.name} uid={.metadata.uid} restarts={.status.containerStatuses[0].restartCount}{"\n"}{end}'; }
before=$(pod_uids)

step "the workload writes into its volume while it runs"
# What the Deployment's container sees at /source/data is this directory on its node.
pod=$(kubectl get pods -n demo -l app=stash-demo -o jsonpath='{.items[0].metadata.name}')
uid=$(kubectl get pod "$pod" -n demo -o jsonpath='{.metadata.uid}')
node=$(kubectl get pod "$pod" -n demo -o jsonpath='{.spec.nodeName}')
pv=$(kubectl get pvc stash-sample-data -n demo -o jsonpath='{.spec.volumeName}')
volume="$work/cluster/nodes/$node/var/lib/kubelet/pods/$uid/volumes/kubernetes.io~csi/$pv/mount"
mkdir -p "$volume/reports" "$volume/tmp"
for i in $(seq 1 200); do head -c 4096 /dev/urandom >"$volume/reports/report-$i.bin"; done
head -c $((8 << 20)) /dev/urandom >"$volume/db.bin"
echo "scratch" >"$volume/tmp/excluded.txt"
echo "   $pod on $node: $(find "$volume" -type f | wc -l) files, $(du -sh "$volume" | cut -f1)"
(cd "$volume" && find . -type f ! -path './tmp/*' -print0 | sort -z | xargs -0 sha256sum) >"$work/expected.sha256"

step "an instant backup: kubectl create -f deploy/examples/backupsession.yaml"
kubectl create -f deploy/examples/backupsession.yaml
session=deployment-backup-1732550400
phase=""
for _ in $(seq 1 180); do
  phase=$(kubectl get backupsession "$session" -n demo -o jsonpath='{.status.phase}')
  [[ "$phase" == Succeeded || "$phase" == Failed || "$phase" == Skipped ]] && break
  sleep 1
done
kubectl get backupconfiguration,backupsession,backupassignment,repository -n demo
kubectl get backupsession "$session" -n demo -o jsonpath='{range .status.targets[0].stats[*]}   host {.hostname}: {.phase} in {.duration}, snapshot {.snapshots[0].name} ({.snapshots[0].totalSize}){.error}{"\n"}{end}'
after=$(pod_uids)
echo "   pods before: $before"
echo "   pods after:  $after"

step "the snapshot through the Snapshot API (kubectl get snapshots, served from the operator's index)"
# The index lists the repository again once the session has ended; a moment later it is there.
for _ in $(seq 1 60); do
  [[ -n "$(kubectl get snapshots -n demo -o name 2>/dev/null)" ]] && break
  sleep 2
done
kubectl get snapshots -n demo
kubectl get snapshots -n demo -o wide

step "the snapshot, read by stock restic"
export RESTIC_PASSWORD="$password" AWS_ACCESS_KEY_ID="$key_id" AWS_SECRET_ACCESS_KEY="$key_secret"
repo="s3:http://$gateway:$s3_port/stash-demo-backups/demo/deployment/stash-demo"
restic -r "$repo" snapshots --compact
mkdir -p "$work/restored"
# Direct mode (the default) keeps the user's files, not one tar: restic lists and restores them.
restic -r "$repo" ls latest >"$work/ls.txt"
sed -n '2,6p' "$work/ls.txt" | sed 's/^/   /'
restic -r "$repo" restore latest --target "$work/restored" >/dev/null
if (cd "$work/restored" && sha256sum --quiet -c "$work/expected.sha256") && [[ ! -e "$work/restored/tmp/excluded.txt" ]]; then
  identical="identical to the volume (tmp/ excluded, as the configuration asks)"
else
  identical="DIFFERENT from the volume"
fi
echo "   restic restore: $(find "$work/restored" -type f | wc -l) files, $identical"

step "the pushgateway (the operator pod's second container)"
op_ip=$(kubectl get pods -n stash -l app.kubernetes.io/component=operator -o jsonpath='{.items[0].status.podIP}')
python3 - "http://$op_ip:56789/metrics" <<'PY'
import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines():
    if line.startswith(("stash_appscode_com_backupsession_success", "stash_appscode_com_backupsession_duration",
                        "stash_appscode_com_repository_snapshot_count", "stash_appscode_com_backupsession_host_data_size")):
        print("  ", line)
PY

step "a bad deploy damages the running pod's volume"
head -c $((1 << 20)) /dev/urandom | dd of="$volume/db.bin" bs=1M seek=3 conv=notrunc status=none
rm -f "$volume"/reports/report-{1..50}.bin
echo "not in the backup" >"$volume/stray.txt"
damaged=$( (cd "$volume" && sha256sum --quiet -c "$work/expected.sha256" 2>/dev/null | wc -l) || true)
echo "   $damaged files differ from the backup or are gone"

step "an in-place restore: kubectl apply a RestoreSession (deploy/examples/restoresession-deployment.yaml, one rule)"
# The example shows Stash's rule forms; the demo restores the latest snapshot of /source/data,
# and drops spec.hooks, which this operator does not run yet.
.tools/bin/python-helm - "$root/deploy/examples/restoresession-deployment.yaml" >"$work/restore.yaml" <<'PY'
import sys, yaml
rs = yaml.safe_load(open(sys.argv[1]))
rs["spec"].pop("hooks", None)
rs["spec"]["target"]["rules"] = [{"paths": ["/source/data"]}]
print(yaml.safe_dump(rs, sort_keys=False))
PY
kubectl apply -f "$work/restore.yaml"
restored=""
for _ in $(seq 1 180); do
  restored=$(kubectl get restoresession deployment-restore -n demo -o jsonpath='{.status.phase}')
  [[ "$restored" == Succeeded || "$restored" == Failed || "$restored" == Invalid || "$restored" == Unknown ]] && break
  sleep 1
done
kubectl get restoresession,restoreassignment -n demo
kubectl get restoresession deployment-restore -n demo -o jsonpath='{range .status.stats[*]}   host {.hostname}: {.phase} in {.duration}{.error}{"\n"}{end}'
if (cd "$volume" && sha256sum --quiet -c "$work/expected.sha256"); then
  back="back, byte for byte ($(wc -l <"$work/expected.sha256") files; stray.txt left, as restic leaves extra files without --delete)"
else
  back="NOT as backed up"
fi
echo "   the live volume: $back"
after_restore=$(pod_uids)
echo "   pods after the restore: $after_restore"

step "summary"
echo "   BackupSession $session: $phase; RestoreSession deployment-restore: $restored"
if [[ "$before" == "$after" && "$after" == "$after_restore" ]]; then echo "   the workload was not restarted: same pod, same UID, no restart, through backup and restore"; else echo "   the workload CHANGED"; fi
echo "   the snapshot is $identical"
echo "   the data is $back"
[[ "$phase" == Succeeded && "$restored" == Succeeded && "$before" == "$after" && "$after" == "$after_restore" && "$identical" == identical* && "$back" == back* ]]
