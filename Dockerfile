# CyberMesh validator image (multi-stage; the runtime runs as a non-root user).
#   docker build -t cybermesh .
#   docker run --rm -v /srv/cybermesh:/var/lib/cybermesh \
#     -e CYBERMESH_CONFIG=/var/lib/cybermesh/validator.toml cybermesh
# The config's data_dir and key_file should point under /var/lib/cybermesh.

FROM rust:1.95-bookworm AS build
# rdkafka builds librdkafka with OpenSSL (libssl-dev, pkg-config, make, gcc).
RUN apt-get update && apt-get install -y --no-install-recommends libssl-dev pkg-config make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cybermesh --bin cybermesh \
    && strip target/release/cybermesh

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/cybermesh --create-home --shell /usr/sbin/nologin cybermesh
COPY --from=build /src/target/release/cybermesh /usr/local/bin/cybermesh
USER cybermesh
# Docker's default seccomp profile refuses io_uring, which the glommio verify
# shards need; the plain-thread runtime works everywhere. To use glommio,
# run with a profile that allows io_uring and `--ulimit memlock=…` (shards
# × RUNTIME_IO_MEMORY_BYTES), and `-e RUNTIME_EXECUTOR=glommio`.
ENV RUNTIME_EXECUTOR=threads
WORKDIR /var/lib/cybermesh
VOLUME ["/var/lib/cybermesh"]
# P2P (QUIC, UDP), direct source (loopback by default), HTTP API.
EXPOSE 8001/udp 8443/tcp
ENTRYPOINT ["cybermesh"]
CMD ["run"]
