# One image with every coordkit service binary and coordctl; docker-compose
# picks the one to run. Stripped release binaries on an empty base (`scratch`,
# with the libraries they link), run as a non-root user; the dependencies are
# compiled in a layer of their own, so a source change rebuilds only the
# workspace's crates.
#
# Base images: pin them by digest for a reproducible build. Look each digest
# up where you can pull (`docker pull IMAGE && docker inspect --format
# '{{index .RepoDigests 0}}' IMAGE`) and pass it, e.g.
#   docker build --build-arg RUST_IMAGE=rust:1.95-bookworm@sha256:<digest> .
# digest: rust:1.95-bookworm@sha256:<to be pinned; not verified here>
# The runtime stage is `scratch`, which is not pulled and has no digest.
ARG RUST_IMAGE=rust:1.95-bookworm

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
    mkdir -p /out/usr/local/bin /out/etc/ssl/certs /out/tmp; chmod 1777 /out/tmp; \
    for bin in coord-orchestrator coord-allocator coord-synchronizer coord-monitor coordctl; do \
        strip -o "/out/usr/local/bin/$bin" "target/release/$bin"; \
        ldd "target/release/$bin" | grep -o '/[^ ]*' | while read -r lib; do \
            mkdir -p "/out$(dirname "$lib")"; cp -L "$lib" "/out$lib"; \
        done; \
    done; \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/; \
    printf 'nonroot:x:65532:65532::/tmp:/sbin/nologin\n' > /out/etc/passwd; \
    printf 'hosts: files dns\n' > /out/etc/nsswitch.conf

# The runtime: nothing but the binaries, the C libraries they link (from the
# build image, so they match), CA certificates for TLS to NATS, and a user.
FROM scratch
COPY --from=build /out/ /
USER 65532:65532
# One image runs every service: the check asks the service this container
# runs (its first process) for a ping, and passes in any other container.
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["coordctl", "healthcheck"]
CMD ["coordctl", "--help"]
