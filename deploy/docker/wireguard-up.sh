#!/bin/sh
# Bring a wg-quick file up with userspace WireGuard (wireguard-go) and stay in the
# foreground: the entrypoint of the `wireguard` image, the sidecar that gives an edge
# or a worker container its WireGuard interface (docs/vpn.md). Needs NET_ADMIN and
# /dev/net/tun, nothing else.
#
#   WG_CONF            the wg-quick file (a secret)          default /run/wireguard-config/wg0.conf
#   WG_INTERFACE       the interface name                     default wg0
#   WG_MTU             the interface MTU                      default 1420
#   WG_FIREWALL_PORTS  worker only: TCP ports accepted on the WireGuard interface; when set,
#                      the input policy drops everything else (loaded BEFORE the tunnel, as at
#                      boot, so the edge's packets are replies to the worker's keepalive)
#
# usage: wireguard-up            bring up, then wait for SIGTERM
#        wireguard-up check      exit 0 if the interface is up with its address (HEALTHCHECK)
set -eu
conf=${WG_CONF:-/run/wireguard-config/wg0.conf}
ifname=${WG_INTERFACE:-wg0}
mtu=${WG_MTU:-1420}

if [ "${1:-}" = check ]; then
  ip -o address show dev "$ifname" 2>/dev/null | grep -q ' inet' && wg show "$ifname" >/dev/null
  exit $?
fi
[ -r "$conf" ] || { echo "wireguard-up: cannot read $conf: mount the wg-quick file there (a secret)" >&2; exit 2; }
value() { sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" "$conf" | head -n 1; }
address=$(value Address)
[ -n "$address" ] || { echo "wireguard-up: $conf has no Address (write it with edge-proxy vpn init)" >&2; exit 2; }

if [ -n "${WG_FIREWALL_PORTS:-}" ]; then
  ports=$(echo "$WG_FIREWALL_PORTS" | tr ' ' ',')
  nft -f - <<NFT
table inet worker {
  chain input {
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    iifname "$ifname" tcp dport { $ports } accept
  }
}
NFT
fi

wireguard-go -f "$ifname" &
pid=$!
stopping=0
trap 'stopping=1; kill -TERM "$pid" 2>/dev/null || true' TERM INT
tries=0
while [ ! -S "/var/run/wireguard/$ifname.sock" ]; do
  kill -0 "$pid" 2>/dev/null || { echo "wireguard-up: wireguard-go exited" >&2; exit 1; }
  tries=$((tries + 1))
  [ "$tries" -lt 200 ] || { echo "wireguard-up: wireguard-go made no $ifname in 20 s" >&2; kill "$pid"; exit 1; }
  sleep 0.1
done
for a in $(echo "$address" | tr ',' ' '); do ip address add "$a" dev "$ifname"; done
ip link set "$ifname" mtu "$mtu" up
case $address in  # a host address: one route per AllowedIPs, as wg-quick adds
  */32|*/128) for r in $(value AllowedIPs | tr ',' ' '); do ip route add "$r" dev "$ifname"; done ;;
esac
stripped=$(mktemp)
(umask 077; wg-quick strip "$conf" > "$stripped")
wg setconf "$ifname" "$stripped"  # last: a PersistentKeepalive goes out at once
rm -f "$stripped"
echo "wireguard-up: $ifname up with $address" >&2
status=0
wait "$pid" || status=$?
if [ "$stopping" = 1 ]; then  # asked to stop (docker stop, the pod's end): a clean exit once it is gone
  status=0
  wait "$pid" 2>/dev/null || true
fi
exit "$status"
