#!/bin/sh
# Server container entrypoint: `draftfeed serve` on all interfaces, configured by DRAFTFEED_* variables;
# any arguments are passed on to `draftfeed serve` (they win over the variables).
#   DRAFTFEED_MODEL        model directory (default: /models/target when it holds a config.json, else the
#                          built-in default target)
#   DRAFTFEED_HOST/PORT/ADMIN_PORT   bind address, gRPC port (50051), admin HTTP port (8080; "off" disables)
#   DRAFTFEED_DATA_PORT    TCP data plane for reply payloads (50052, fixed so that it can be published and
#                          let through firewalls; clients connect to the gRPC URL's host on this port);
#                          "off" = --no-data-plane: every reply goes on gRPC
#   DRAFTFEED_TOKEN_FILE   job tokens (default: /run/secrets/draftfeed-tokens.yaml when present)
#   DRAFTFEED_TLS_CERT, DRAFTFEED_TLS_KEY, DRAFTFEED_TLS_CLIENT_CA   TLS / mutual TLS
#   DRAFTFEED_INSECURE_ALLOW_REMOTE=1   no tokens and still answer other hosts (trusted networks only)
#   DRAFTFEED_GRACE_SECONDS  drain time on SIGTERM (30; keep it below the stop timeout of docker/k8s)
#   DRAFTFEED_TP           tensor-parallel size: K > 1 runs under `torchrun --nproc-per-node K`
#   DRAFTFEED_PYTHON       python that runs draftfeed (default: python3)
set -eu

PY="${DRAFTFEED_PYTHON:-python3}"
MODEL="${DRAFTFEED_MODEL:-}"
if [ -z "$MODEL" ] && [ -f /models/target/config.json ]; then
    MODEL=/models/target
fi
TOKENS="${DRAFTFEED_TOKEN_FILE:-}"
if [ -z "$TOKENS" ] && [ -f /run/secrets/draftfeed-tokens.yaml ]; then
    TOKENS=/run/secrets/draftfeed-tokens.yaml
fi

# options first, then "$@" so explicit arguments override them
opts="--host ${DRAFTFEED_HOST:-0.0.0.0} --port ${DRAFTFEED_PORT:-50051} --grace-seconds ${DRAFTFEED_GRACE_SECONDS:-30}"
if [ "${DRAFTFEED_ADMIN_PORT:-8080}" != "off" ]; then
    opts="$opts --admin-port ${DRAFTFEED_ADMIN_PORT:-8080}"
fi
if [ "${DRAFTFEED_DATA_PORT:-50052}" = "off" ]; then
    opts="$opts --no-data-plane"
else
    opts="$opts --data-port ${DRAFTFEED_DATA_PORT:-50052}"
fi
set -- $opts "$@"
[ -n "$MODEL" ] && set -- --model "$MODEL" "$@"
[ -n "$TOKENS" ] && set -- --token-file "$TOKENS" "$@"
[ -n "${DRAFTFEED_TLS_CERT:-}" ] && set -- --tls-cert "$DRAFTFEED_TLS_CERT" --tls-key "${DRAFTFEED_TLS_KEY:?DRAFTFEED_TLS_KEY must go with DRAFTFEED_TLS_CERT}" "$@"
[ -n "${DRAFTFEED_TLS_CLIENT_CA:-}" ] && set -- --tls-client-ca "$DRAFTFEED_TLS_CLIENT_CA" "$@"
[ "${DRAFTFEED_INSECURE_ALLOW_REMOTE:-0}" = "1" ] && set -- --insecure-allow-remote "$@"

TP="${DRAFTFEED_TP:-1}"
if [ "$TP" -gt 1 ]; then
    # torchrun forwards SIGTERM to every rank; rank 0 drains, the others wait for its release
    exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$TP" -m draftfeed.server.cli serve "$@"
fi
exec "$PY" -m draftfeed.server.cli serve "$@"
