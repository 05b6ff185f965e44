#!/bin/sh
# Generate the two Kubernetes Secrets the manifests mount (edge-credentials and
# worker-credentials) into OUTDIR/secrets.yaml, outside the repository, never committed.
#
#   deploy/k8s/make-secrets.sh OUTDIR [--namespace NS] [--replicas N] [--host NAME ...]
#
# --host       extra names clients use for the edge (repeat); the certificate always
#              covers edge-tunnel (base) and edge-0..N-1.edge-peers (scale-out).
# --replicas   number of edges in the scale-out StatefulSet (default 3).
# Needs `edge-proxy` on PATH (pip install the project). Re-running reuses OUTDIR's CA and
# existing tokens, and re-issues the edge certificate.
set -eu

usage() { echo "usage: $0 OUTDIR [--namespace NS] [--replicas N] [--host NAME ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
namespace=edge-inference
replicas=3
extra_hosts=""
while [ $# -gt 0 ]; do
    case $1 in
        --namespace) [ $# -ge 2 ] || usage; namespace=$2; shift 2 ;;
        --replicas) [ $# -ge 2 ] || usage; replicas=$2; shift 2 ;;
        --host) [ $# -ge 2 ] || usage; extra_hosts="$extra_hosts $2"; shift 2 ;;
        *) usage ;;
    esac
done
case $replicas in ''|*[!0-9]*) echo "error: --replicas must be a number, got '$replicas'" >&2; exit 2 ;; esac
command -v edge-proxy >/dev/null 2>&1 || {
    echo "error: edge-proxy not found on PATH; install the project (pip install .) or activate its venv" >&2; exit 2; }

umask 077
mkdir -p "$out/pki"

# Every name an agent or a client may dial: short, namespaced and fully-qualified forms.
set --
for h in $extra_hosts edge-tunnel "edge-tunnel.$namespace.svc" "edge-tunnel.$namespace.svc.cluster.local"; do
    set -- "$@" --host "$h"
done
i=0
while [ "$i" -lt "$replicas" ]; do
    for h in "edge-$i.edge-peers" "edge-$i.edge-peers.$namespace.svc" "edge-$i.edge-peers.$namespace.svc.cluster.local"; do
        set -- "$@" --host "$h"
    done
    i=$((i + 1))
done
edge-proxy certs --out "$out/pki" "$@"

if [ ! -s "$out/client-key" ]; then
    edge-proxy keys create --file "$out/client-keys.json" --name k8s-admin --admin > "$out/client-key"
fi
for w in opencv tf-gpu; do
    if [ ! -s "$out/$w.token" ]; then
        edge-proxy tokens create --file "$out/worker-tokens.json" --name "worker-$w" > "$out/$w.token"
    fi
done

b64() { base64 < "$1" | tr -d '\n'; }
cat > "$out/secrets.yaml" <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: edge-credentials
  namespace: $namespace
type: Opaque
data:
  ca.pem: $(b64 "$out/pki/ca.pem")
  edge.pem: $(b64 "$out/pki/edge.pem")
  edge-key.pem: $(b64 "$out/pki/edge-key.pem")
  client-keys.json: $(b64 "$out/client-keys.json")
  worker-tokens.json: $(b64 "$out/worker-tokens.json")
---
apiVersion: v1
kind: Secret
metadata:
  name: worker-credentials
  namespace: $namespace
type: Opaque
data:
  ca.pem: $(b64 "$out/pki/ca.pem")
  opencv.token: $(b64 "$out/opencv.token")
  tf-gpu.token: $(b64 "$out/tf-gpu.token")
YAML
echo "wrote $out/secrets.yaml; apply it with: kubectl apply -f $out/secrets.yaml" >&2
echo "client API key: $out/client-key; CA for clients: $out/pki/ca.pem" >&2
