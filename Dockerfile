# One image with every coordkit service binary and coordctl; docker-compose
# picks the one to run. Stripped release binaries on debian-slim, run as a
# non-root user; the dependencies are compiled in a layer of their own, so a
# source change rebuilds only the workspace's crates.
#
# Base images: pin them by digest for a reproducible build. Look each digest
# up where you can pull (`docker pull IMAGE && docker inspect --format
# '{{index .RepoDigests 0}}' IMAGE`) and pass it, e.g.
#   docker build --build-arg RUST_IMAGE=rust:1.95-bookworm@sha256:<digest> \
#                --build-arg RUNTIME_IMAGE=debian:bookworm-slim@sha256:<digest> .
# digest: rust:1.95-bookworm@sha256:<to be pinned; not verified here>
# digest: debian:bookworm-slim@sha256:<to be pinned; not verified here>
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# The workspace's skeleton: every manifest, the lock file and an empty
# `fn main() {}` at each target root (src/lib.rs, src/main.rs, src/bin/*.rs
# and every `path = "….rs"` a manifest names). It changes only when a
# manifest does, so the dependency layer below stays cached across source edits.
FROM ${RUST_IMAGE} AS skeleton
WORKDIR /src
COPY . .
RUN set -eu; mkdir /skeleton; cp Cargo.toml Cargo.lock /skeleton/; \
    for manifest in */Cargo.toml; do \
        dir=$(dirname "$manifest"); \
        mkdir -p "/skeleton/$dir"; cp "$manifest" "/skeleton/$dir/"; \
        for f in src/lib.rs src/main.rs build.rs \
                 $(cd "$dir" && ls src/bin/*.rs 2>/dev/null) \
                 $(sed -n 's/^path = "\(.*\.rs\)"$/\1/p' "$manifest"); do \
            if [ -f "$dir/$f" ]; then \
                mkdir -p "/skeleton/$dir/$(dirname "$f")"; \
                echo 'fn main() {}' > "/skeleton/$dir/$f"; \
            fi; \
        done; \
    done

FROM ${RUST_IMAGE} AS build
WORKDIR /src
ENV SHIPPED="-p orchestrator -p allocator -p synchronizer -p monitor -p coordkit"
# Dependencies only (the workspace's crates are the empty skeleton here).
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked --bins $SHIPPED
# The sources. Their files may be older than the skeleton's build, so they
# are touched: cargo then rebuilds the workspace's crates, and only them.
COPY . .
RUN set -eu; \
    find . -path ./target -prune -o \( -name '*.rs' -o -name Cargo.toml \) -exec touch {} +; \
    cargo build --release --locked --bins $SHIPPED; \
    mkdir /out; \
    for bin in coord-orchestrator coord-allocator coord-synchronizer coord-monitor coordctl; do \
        strip -o "/out/$bin" "target/release/$bin"; \
    done

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build \
    /out/coord-orchestrator \
    /out/coord-allocator \
    /out/coord-synchronizer \
    /out/coord-monitor \
    /out/coordctl \
    /usr/local/bin/
USER 65532:65532
# A service container checks its own service (`coord-X --healthcheck`, as
# docker-compose.yml does per service); anything else (coordctl) has no check.
HEALTHCHECK --interval=10s --timeout=5s --retries=3 \
    CMD bin="$(tr '\0' '\n' </proc/1/cmdline | head -n1)"; \
        case "${bin##*/}" in coord-*) exec "$bin" --healthcheck ;; *) exit 0 ;; esac
CMD ["coordctl", "--help"]
