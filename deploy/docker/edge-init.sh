#!/bin/sh
# One-shot credential setup for docker compose (the `init` service): a local CA, the
# edge certificate, a client API key and one worker token per worker, written into volumes.
#
# Idempotent: what exists is kept, so `docker compose up` never rotates a secret by
# accident; the edge certificate is re-issued only when INIT_HOSTS changes.
#   INIT_PRIVATE_DIR  CA key and the client API key (only this service mounts it)
#   INIT_EDGE_DIR     what the edge reads: edge.pem, edge-key.pem, ca.pem, client-keys.json, worker-tokens.json
#   INIT_WORKERS_DIR  what workers read: ca.pem and NAME.token per worker
#   INIT_HOSTS        names the edge certificate covers (space-separated)
#   INIT_WORKERS      worker names; each gets a token NAME.token (space-separated)
#   INIT_CLIENT_NAME  name of the client API key
set -eu

private_dir=${INIT_PRIVATE_DIR:-/var/lib/edge-init/private}
edge_dir=${INIT_EDGE_DIR:-/var/lib/edge-proxy}
workers_dir=${INIT_WORKERS_DIR:-/var/lib/edge-init/workers}
hosts=${INIT_HOSTS:-localhost edge}
workers=${INIT_WORKERS:-opencv tf-gpu}
client_name=${INIT_CLIENT_NAME:-compose-admin}

# Secrets are created readable by their owner only; the edge and the workers run as
# the same unprivileged uid as this service.
umask 077
mkdir -p "$private_dir" "$edge_dir" "$workers_dir"

if [ ! -s "$edge_dir/edge.pem" ] || [ "$(cat "$edge_dir/.hosts" 2>/dev/null || true)" != "$hosts" ]; then
    set --
    for h in $hosts; do set -- "$@" --host "$h"; done
    # `certs` reuses the CA already in $private_dir, so workers' ca.pem stays valid.
    edge-proxy certs --out "$private_dir" "$@"
    cp "$private_dir/edge.pem" "$private_dir/edge-key.pem" "$private_dir/ca.pem" "$edge_dir/"
    printf '%s' "$hosts" > "$edge_dir/.hosts"
    echo "edge-init: edge certificate for: $hosts" >&2
fi
cp "$private_dir/ca.pem" "$workers_dir/ca.pem"

if [ ! -s "$private_dir/client-key" ]; then
    # A lost secret cannot be recovered from its hash: replace it under the same name.
    if grep -qF "\"$client_name\"" "$edge_dir/client-keys.json" 2>/dev/null; then
        edge-proxy keys revoke --file "$edge_dir/client-keys.json" --name "$client_name" >/dev/null
    fi
    edge-proxy keys create --file "$edge_dir/client-keys.json" --name "$client_name" --admin > "$private_dir/client-key.tmp"
    mv "$private_dir/client-key.tmp" "$private_dir/client-key"
    echo "edge-init: client API key '$client_name' written to $private_dir/client-key" >&2
fi

for w in $workers; do
    if [ ! -s "$workers_dir/$w.token" ]; then
        if grep -qF "\"worker-$w\"" "$edge_dir/worker-tokens.json" 2>/dev/null; then
            edge-proxy tokens revoke --file "$edge_dir/worker-tokens.json" --name "worker-$w" >/dev/null
        fi
        edge-proxy tokens create --file "$edge_dir/worker-tokens.json" --name "worker-$w" > "$workers_dir/$w.token.tmp"
        mv "$workers_dir/$w.token.tmp" "$workers_dir/$w.token"
        echo "edge-init: worker token 'worker-$w' written to $workers_dir/$w.token" >&2
    fi
done
echo "edge-init: credentials ready" >&2
