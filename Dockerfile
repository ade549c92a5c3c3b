# syntax=docker/dockerfile:1
#
# The two images of Stash in Rust, built by `make image` where a Docker engine (BuildKit) runs:
#
#   --target stash-operator    stash-operator: non-root (uid 65534), distroless, plus restic for
#                              retention (`restic forget --prune` runs in the operator)
#   --target stash-node-agent  stash-node-agent: Debian slim with restic >= 0.17 from Debian's
#                              package (trixie has 0.18; bookworm's 0.14 is too old)
#
# Both binaries are compiled once in the `build` stage. Dependencies are cached between builds
# in BuildKit cache mounts (the cargo registry and the target directory), so a source change
# recompiles only the crates that changed.

ARG RUST_VERSION=1.89
ARG DEBIAN_SUITE=trixie

# --- build -------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_SUITE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p stash-controller -p stash-node-agent \
 && mkdir -p /out \
 && cp target/release/stash-operator target/release/stash-node-agent /out/

# --- restic from Debian's package, checked against the supported floor -------------------------
FROM debian:${DEBIAN_SUITE}-slim AS restic
RUN apt-get update \
 && apt-get install -y --no-install-recommends restic ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/*
RUN restic version | awk '$1 == "restic" { split($2, v, "."); ok = (v[1] > 0 || v[2] >= 17) } \
    END { if (!ok) print "restic >= 0.17 is required" > "/dev/stderr"; exit !ok }'

# --- the operator ------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian13:nonroot AS stash-operator
COPY --from=restic /usr/bin/restic /usr/local/bin/restic
COPY --from=build /out/stash-operator /usr/local/bin/stash-operator
# The chart runs it as 65534 too (STASH-API.md §11); no shell, no package manager.
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/stash-operator"]
CMD ["run"]

# --- the node agent ----------------------------------------------------------------------------
# Root in the DaemonSet (reading other pods' files), with every capability dropped but the
# ones the chart adds. Also the image of injected sidecars and backup/restore Jobs.
FROM restic AS stash-node-agent
COPY --from=build /out/stash-node-agent /usr/local/bin/stash-node-agent
ENTRYPOINT ["/usr/local/bin/stash-node-agent"]
CMD ["run"]
