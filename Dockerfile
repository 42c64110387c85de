# One image with every coordkit binary; docker-compose picks the one to run.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build \
    /src/target/release/coord-orchestrator \
    /src/target/release/coord-allocator \
    /src/target/release/coord-synchronizer \
    /src/target/release/coord-monitor \
    /src/target/release/coordctl \
    /usr/local/bin/
USER 65532:65532
CMD ["coordctl", "--help"]
