# syntax=docker/dockerfile:1
#
# The image both binaries run from: the service `session-monitor` (the entrypoint, as the
# Deployments the operator creates expect) and the operator `session-monitor-operator` (the Helm
# chart starts it with `command: [/usr/local/bin/session-monitor-operator]`).
#
#   docker build -t ghcr.io/session-monitor/session-monitor:0.1.0 .
#
# The runtime image is distroless: glibc, CA certificates (MQTT over TLS with system roots) and
# the `nonroot` user (65532), no shell and no package manager. TLS is rustls with ring, so no
# OpenSSL is needed.

# kube 5 and serde-saphyr need Rust 1.89 or newer.
ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build between builds (BuildKit); the binaries are
# copied out of the cached target directory in the same step, without their debug info (the
# release profile keeps line tables for profiling; symbols stay for backtraces).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package session-monitor --package session-monitor-operator \
    && install -D --mode=0755 --target-directory=/out \
        target/release/session-monitor target/release/session-monitor-operator \
    && strip --strip-debug /out/session-monitor /out/session-monitor-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="session-monitor" \
      org.opencontainers.image.description="Active Qlik Sense user tracking (session-monitor) and its Kubernetes operator (session-monitor-operator)" \
      org.opencontainers.image.source="https://github.com/session-monitor/session-monitor" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/session-monitor /out/session-monitor-operator /usr/local/bin/
USER 65532:65532
# UDP ingest and HTTP (/metrics, probes, API) of the service; HTTP of the operator.
EXPOSE 9997/udp 9842/tcp 8080/tcp
ENTRYPOINT ["/usr/local/bin/session-monitor"]
