# syntax=docker/dockerfile:1
# Userspace WireGuard (wireguard-go) as a sidecar: it owns a network namespace that
# the edge or an inference server joins (compose `network_mode: service:wireguard`,
# or the same pod in Kubernetes), and brings the wg-quick file mounted at WG_CONF up
# (deploy/docker/wireguard-up.sh). No kernel module needed, so it runs where
# containers may not load one. Build from the repository root:
#   docker build -f deploy/docker/wireguard.Dockerfile -t edge-inference/wireguard .
#
# It runs as root, the one image here that does: creating a TUN interface, its
# addresses, routes and the worker's nftables rules is what CAP_NET_ADMIN allows,
# and only root holds it without file capabilities. Run it with every capability
# dropped but NET_ADMIN, and /dev/net/tun (deploy/vpn/*.compose.yml, deploy/k8s/vpn-*).

ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      wireguard-tools wireguard-go iproute2 nftables \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/wireguard /run/wireguard-config
COPY deploy/docker/wireguard-up.sh /usr/local/bin/wireguard-up
ENV WG_CONF=/run/wireguard-config/wg0.conf \
    WG_INTERFACE=wg0 \
    LOG_LEVEL=error
# Control sockets of wireguard-go (writable even with a read-only root file system).
VOLUME ["/run/wireguard"]
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/wireguard-up", "check"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wireguard-up"]
