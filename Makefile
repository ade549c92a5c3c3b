# Entry points. `make test` is what CI runs (.ci/run); every target installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: setup demo test generate lint fmt check-generated unit

## setup: install restic, the pushgateway, Garage (S3), kubectl and Helm's engine into .tools/
setup:
	bash scripts/setup.sh

## demo: the whole product on the simulated cluster (needs root): helm install, a backup of a running
## pod without a restart, kubectl and stock restic showing the result
demo: setup
	bash scripts/demo.sh

## demo-agent: the node agent alone, no cluster: a sample volume backed up and restored in both read modes
.PHONY: demo-agent
demo-agent: setup
	bash scripts/demo-agent.sh

## generate: rewrite generated files (CRDs, then deploy/stash.yaml and the chart README's values table)
generate:
	$(CARGO) run --quiet -p stash-api --bin crdgen -- charts/stash/crds
	bash scripts/render-chart.sh

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## check-generated: fail if a generated file differs from what its generator writes
check-generated:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CARGO) run --quiet --locked -p stash-api --bin crdgen -- "$$tmp" >/dev/null; \
	if ! diff -r -q "$$tmp" charts/stash/crds; then \
	  echo "charts/stash/crds is stale: run 'make generate' and commit the result" >&2; exit 1; \
	fi; echo "generated CRDs are current"
	bash scripts/render-chart.sh --check

## unit: the Rust tests of the whole workspace
unit:
	@if command -v cargo-nextest >/dev/null; then \
	  $(CARGO) nextest run --workspace --locked --no-fail-fast; \
	else $(CARGO) test --workspace --locked --no-fail-fast; fi

## check-examples: example programs agree with the real tools
.PHONY: check-examples
check-examples:
	bash scripts/check-snapshots-example.sh

## chart: the Helm chart's tests (Helm's engine; installs into kube-sim)
.PHONY: chart
chart: setup
	$(CARGO) build --quiet --locked -p kube-sim
	STASH_REQUIRE_KUBE_SIM=1 KUBE_SIM_BIN=$${CARGO_TARGET_DIR:-target}/debug/kube-sim .tools/bin/python-helm -m pytest charts/stash/tests -q

## test: everything CI runs
test: setup lint check-generated unit check-examples chart

## image: the operator and node-agent images (needs a Docker engine with BuildKit; none runs on
## the development machines, so the Dockerfile is kept simple enough to check by eye)
REGISTRY ?= ghcr.io/stash-rs
TAG ?= $(shell sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/stash/Chart.yaml)
.PHONY: image
image:
	DOCKER_BUILDKIT=1 docker build --target stash-operator -t $(REGISTRY)/stash-operator:$(TAG) .
	DOCKER_BUILDKIT=1 docker build --target stash-node-agent -t $(REGISTRY)/stash-node-agent:$(TAG) .

## cluster: a simulated cluster (kube-sim, NODES nodes whose kubelets run this checkout's
## images as processes, a pushgateway) until Ctrl-C or `make cluster-down`; needs root
NODES ?= 2
CLUSTER_STATE ?= target/cluster
PUSHGATEWAY_ADDR ?= 127.0.0.1:9091
.PHONY: cluster cluster-down
cluster: setup
	$(CARGO) build --quiet --locked -p cluster-sim -p stash-node-agent -p stash-controller
	@bin=$${CARGO_TARGET_DIR:-target}/debug; mkdir -p $(CLUSTER_STATE); \
	.tools/bin/pushgateway --web.listen-address=$(PUSHGATEWAY_ADDR) \
	  --persistence.file=$(CLUSTER_STATE)/pushgateway.dat >$(CLUSTER_STATE)/pushgateway.log 2>&1 & pg=$$!; \
	trap 'kill $$pg 2>/dev/null' EXIT; \
	echo "pushgateway: http://$(PUSHGATEWAY_ADDR) (log $(CLUSTER_STATE)/pushgateway.log)"; \
	"$$bin/cluster-sim" up --state $(CLUSTER_STATE) --nodes $(NODES) \
	  --image-binary stash-node-agent=$$bin/stash-node-agent,stash-operator=$$bin/stash-operator,pushgateway=.tools/bin/pushgateway \
	  --image-file /usr/local/bin/restic=.tools/bin/restic --run-image busybox

## cluster-down: stop the cluster `make cluster` started
cluster-down:
	@if [[ -f $(CLUSTER_STATE)/cluster-sim.pid ]]; then kill "$$(cat $(CLUSTER_STATE)/cluster-sim.pid)" && echo "stopping the cluster"; \
	else echo "no cluster is running (no $(CLUSTER_STATE)/cluster-sim.pid)"; fi

## bench: benchmarks (ours and the baseline alternately), figures to bench/results/latest.json
.PHONY: bench
bench: setup
	$(CARGO) build --release --locked -p stash-node-agent -p stash-controller
	$(CARGO) run --release --locked -p stash-bench -- $(SCENARIOS)
