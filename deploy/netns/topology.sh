#!/usr/bin/env bash
# The firewalled topology on one machine, with network namespaces:
#
#   clients --- edge --- router (NAT masquerade) --- workers
#   10.231.1.2  .1.1|.2.1  .2.2 | .3.1                .3.2
#
# The edge has no route to the workers' network, and the workers' input
# policy drops everything but loopback and established/related traffic: a
# worker can dial OUT to the edge (through the NAT) and nothing can dial IN.
#
# usage: topology.sh up|down PREFIX      (PREFIX: up to 8 letters/digits)
set -euo pipefail
cmd=${1:?usage: topology.sh up|down PREFIX}
P=${2:?usage: topology.sh up|down PREFIX}
[[ $P =~ ^[a-z0-9]{1,8}$ ]] || { echo "PREFIX must be 1-8 lowercase letters/digits" >&2; exit 2; }
C=$P-clients E=$P-edge R=$P-router W=$P-workers

down() {
  for ns in "$C" "$E" "$R" "$W"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

up() {
  trap 'echo "setup failed; tearing down" >&2; down' ERR
  for ns in "$C" "$E" "$R" "$W"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  ip link add "${P}ce" netns "$C" type veth peer name "${P}ec" netns "$E"
  ip link add "${P}er" netns "$E" type veth peer name "${P}re" netns "$R"
  ip link add "${P}rw" netns "$R" type veth peer name "${P}wr" netns "$W"
  ip -n "$C" addr add 10.231.1.2/24 dev "${P}ce"
  ip -n "$E" addr add 10.231.1.1/24 dev "${P}ec"
  ip -n "$E" addr add 10.231.2.1/24 dev "${P}er"
  ip -n "$R" addr add 10.231.2.2/24 dev "${P}re"
  ip -n "$R" addr add 10.231.3.1/24 dev "${P}rw"
  ip -n "$W" addr add 10.231.3.2/24 dev "${P}wr"
  for pair in "$C:${P}ce" "$E:${P}ec" "$E:${P}er" "$R:${P}re" "$R:${P}rw" "$W:${P}wr"; do
    ip -n "${pair%%:*}" link set "${pair#*:}" up
  done
  # Workers reach the world only through the router; the edge knows nothing
  # of 10.231.3.0/24.
  ip -n "$W" route add default via 10.231.3.1
  ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$R" nft -f - <<NFT
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "${P}re" masquerade
  }
}
NFT
  ip netns exec "$W" nft -f - <<NFT
table inet firewall {
  chain input {
    type filter hook input priority filter; policy drop;
    iifname "lo" accept
    ct state established,related accept
  }
}
NFT
  trap - ERR
}

case $cmd in
  up) up ;;
  down) down ;;
  *) echo "usage: topology.sh up|down PREFIX" >&2; exit 2 ;;
esac
