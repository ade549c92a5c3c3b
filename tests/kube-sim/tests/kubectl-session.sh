#!/usr/bin/env bash
# A kubectl session as a user would type it, against a running kube-sim.
# Needs KUBECONFIG pointing at the server and REPO_ROOT at the repository; every step must
# succeed or the script fails. Run by tests/kubectl.rs (so `cargo test` runs it).
set -euo pipefail

: "${KUBECONFIG:?KUBECONFIG must point at kube-sim}"
ROOT="${REPO_ROOT:?REPO_ROOT must be the repository root}"
# A private discovery cache: CRDs appear during the session.
export KUBECACHEDIR="${KUBECACHEDIR:-$(mktemp -d)}"
NS=session

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }
expect() { # expect <description> <needle> <haystack>
  grep -qF -- "$2" <<<"$3" || fail "$1: expected to find '$2' in:\n$3"
}

step "create a namespace"
kubectl create namespace "$NS"
kubectl label namespace "$NS" purpose=session
kubectl get namespace "$NS" -o jsonpath='{.status.phase}' | grep -qx Active || fail "namespace not Active"

step "apply the CRDs (client-side apply: the largest CRD's last-applied annotation is ~218 KB, under the 256 KiB limit)"
kubectl apply -f "$ROOT/charts/stash/crds/"
kubectl wait --for=condition=Established crd --all --timeout=30s

step "api-resources lists the Stash kinds"
res=$(kubectl api-resources --api-group=stash.appscode.com)
for k in BackupConfiguration BackupSession RestoreSession Repository Function Task BackupBlueprint BackupBatch RestoreBatch; do
  expect "api-resources" "$k" "$res"
done

step "apply the examples, then again: the second apply changes nothing"
kubectl apply -f "$ROOT/deploy/examples/"
second=$(kubectl apply -f "$ROOT/deploy/examples/")
echo "$second"
# Secrets written with stringData always report "configured" on a real server too: the
# server converts stringData into data, so kubectl's three-way patch is never empty.
changed=$(grep -v ' unchanged$' <<<"$second" | grep -v '^secret/' || true)
[ -z "$changed" ] || fail "second apply changed: $changed"

step "get with printer columns"
out=$(kubectl get backupconfigurations -n demo)
echo "$out"
expect "printer columns" "SCHEDULE" "$out"
expect "printer columns" "*/5 * * * *" "$out"
out=$(kubectl get repositories -n demo -o wide)

step "-o yaml and -o jsonpath"
kubectl get repository s3-repo -n demo -o yaml | grep -q 'kind: Repository' || fail "-o yaml"
[ "$(kubectl get deploy stash-demo -n demo -o jsonpath='{.spec.template.spec.containers[0].image}')" = busybox:1.36 ] || fail "jsonpath"

step "label and annotate, then select with -l and --field-selector"
kubectl apply -n "$NS" -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  mode: fast
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: other
data:
  mode: slow
YAML
kubectl label configmap settings -n "$NS" tier=backend
kubectl annotate configmap settings -n "$NS" owner=team-a
[ "$(kubectl get cm -n "$NS" -l tier=backend -o name)" = configmap/settings ] || fail "label selector"
[ "$(kubectl get cm -n "$NS" --field-selector metadata.name=other -o name)" = configmap/other ] || fail "field selector"
[ "$(kubectl get cm settings -n "$NS" -o jsonpath='{.metadata.annotations.owner}')" = team-a ] || fail "annotate"

step "patch: merge, json and strategic"
kubectl patch configmap settings -n "$NS" --type merge -p '{"data":{"mode":"faster"}}'
kubectl patch configmap settings -n "$NS" --type json -p '[{"op":"add","path":"/data/extra","value":"1"}]'
[ "$(kubectl get cm settings -n "$NS" -o jsonpath='{.data.mode}/{.data.extra}')" = faster/1 ] || fail "merge/json patch"
kubectl patch deployment stash-demo -n demo --type strategic -p '{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.36"}]}}}}'
[ "$(kubectl get deploy stash-demo -n demo -o jsonpath='{.spec.template.spec.containers[*].name}')" = "busybox sidecar" ] || fail "strategic merge keeps both containers"
gen=$(kubectl get deploy stash-demo -n demo -o jsonpath='{.metadata.generation}')
[ "$gen" = 2 ] || fail "generation should be 2 after a spec change, got $gen"

step "edit-style replace"
kubectl get configmap other -n "$NS" -o yaml | sed 's/mode: slow/mode: edited/' | kubectl replace -f -
[ "$(kubectl get cm other -n "$NS" -o jsonpath='{.data.mode}')" = edited ] || fail "replace"

step "scale"
kubectl scale deployment stash-demo -n demo --replicas=3
[ "$(kubectl get deploy stash-demo -n demo -o jsonpath='{.spec.replicas}')" = 3 ] || fail "scale"

step "get -w prints a change made by another kubectl"
watch_out=$(mktemp)
kubectl get configmap other -n "$NS" -w --output-watch-events >"$watch_out" 2>&1 &
watch_pid=$!
for _ in $(seq 50); do grep -q 'ADDED' "$watch_out" && break; sleep 0.1; done
kubectl label configmap other -n "$NS" seen=yes
for _ in $(seq 50); do grep -q 'MODIFIED' "$watch_out" && break; sleep 0.1; done
kill "$watch_pid" 2>/dev/null || true; wait "$watch_pid" 2>/dev/null || true
cat "$watch_out"
grep -q 'MODIFIED' "$watch_out" || fail "get -w did not print the change"
rm -f "$watch_out"

step "delete of an object with a finalizer waits until the finalizer is removed"
kubectl apply -n "$NS" -f - <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: guarded
  finalizers: [example.com/guard]
YAML
kubectl delete configmap guarded -n "$NS" --timeout=30s >/tmp/kube-sim-delete.$$ 2>&1 &
delete_pid=$!
sleep 1
kill -0 "$delete_pid" 2>/dev/null || fail "delete returned while a finalizer was still set"
kubectl get cm guarded -n "$NS" -o jsonpath='{.metadata.deletionTimestamp}' | grep -q T || fail "no deletionTimestamp"
kubectl patch configmap guarded -n "$NS" --type json -p '[{"op":"remove","path":"/metadata/finalizers"}]'
wait "$delete_pid" || fail "delete failed: $(cat /tmp/kube-sim-delete.$$)"
rm -f /tmp/kube-sim-delete.$$
if kubectl get cm guarded -n "$NS" >/dev/null 2>&1; then fail "object still there"; fi

step "wait --for=condition on a status written by another client"
kubectl patch backupsession deployment-backup-1732550400 -n demo --subresource=status --type merge \
  -p '{"status":{"phase":"Succeeded","conditions":[{"type":"BackupDone","status":"True","reason":"Done","lastTransitionTime":"2024-01-01T00:00:00Z"}]}}' >/dev/null
kubectl wait --for=condition=BackupDone backupsession/deployment-backup-1732550400 -n demo --timeout=30s

step "explain a CRD field"
out=$(kubectl explain backupconfiguration.spec.retentionPolicy)
expect "explain" "keepLast" "$out"

step "bad input gets the real server's answers"
out=$(kubectl create -n "$NS" -f - 2>&1 <<YAML || true
apiVersion: v1
kind: ConfigMap
metadata:
  name: Bad_Name
YAML
)
expect "invalid name" 'is invalid: metadata.name: Invalid value: "Bad_Name"' "$out"
out=$(kubectl apply -n demo -f - 2>&1 <<YAML || true
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata:
  name: two-backends
spec:
  backend:
    storageSecretName: s
    local: {mountPath: /data}
    s3: {bucket: b, endpoint: e}
YAML
)
expect "CEL rule" "exactly one backend" "$out"
out=$(kubectl apply -n demo -f - 2>&1 <<YAML || true
apiVersion: stash.appscode.com/v1beta1
kind: BackupConfiguration
metadata:
  name: bad-type
spec:
  repository: {name: r}
  paused: "yes"
YAML
)
expect "schema type" "spec.paused" "$out"
out=$(kubectl get configmap settings -n nowhere 2>&1 || true)
expect "not found" 'NotFound' "$out"

step "delete the namespace: its content goes with it"
kubectl delete namespace "$NS" --timeout=30s
if kubectl get namespace "$NS" >/dev/null 2>&1; then fail "namespace still there"; fi

echo
echo "kubectl session: all steps passed"
