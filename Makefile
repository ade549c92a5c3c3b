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

## demo: back up and restore a sample volume with the node agent, in both read modes
demo: setup
	bash scripts/demo.sh

## generate: rewrite generated files (CRDs in charts/stash/crds/)
generate:
	$(CARGO) run --quiet -p stash-api --bin crdgen -- charts/stash/crds

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
	fi; echo "generated files are current"

## unit: the Rust tests of the whole workspace
unit:
	@if command -v cargo-nextest >/dev/null; then \
	  $(CARGO) nextest run --workspace --locked --no-fail-fast; \
	  $(CARGO) test --workspace --locked --doc; \
	else $(CARGO) test --workspace --locked --no-fail-fast; fi

## check-examples: example programs agree with the real tools
.PHONY: check-examples
check-examples:
	bash scripts/check-snapshots-example.sh

## test: everything CI runs
test: setup lint check-generated unit check-examples

## bench: benchmarks (ours and the baseline alternately), figures to bench/results/latest.json
.PHONY: bench
bench: setup
	$(CARGO) build --release --locked -p stash-node-agent
	$(CARGO) run --release --locked -p stash-bench -- $(SCENARIOS)
