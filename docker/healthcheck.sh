#!/bin/sh
# Container HEALTHCHECK: exit 0 when the gRPC health service of the local server answers SERVING.
#   DRAFTFEED_PORT (50051); with TLS (DRAFTFEED_TLS_CERT set): DRAFTFEED_TLS_CA (the CA of the server's
#   certificate), DRAFTFEED_TLS_SERVER_NAME (a name the certificate lists; default localhost), and for
#   mutual TLS DRAFTFEED_HEALTH_CLIENT_CERT / DRAFTFEED_HEALTH_CLIENT_KEY.
set -eu

PY="${DRAFTFEED_PYTHON:-python3}"
PORT="${DRAFTFEED_PORT:-50051}"
if [ -z "${DRAFTFEED_TLS_CERT:-}" ]; then
    exec "$PY" -m draftfeed.server.cli --log-level WARNING health --target "grpc://127.0.0.1:$PORT" --timeout 5
fi
set -- --server-name "${DRAFTFEED_TLS_SERVER_NAME:-localhost}"
[ -n "${DRAFTFEED_TLS_CA:-}" ] && set -- "$@" --ca-file "$DRAFTFEED_TLS_CA"
[ -n "${DRAFTFEED_HEALTH_CLIENT_CERT:-}" ] && set -- "$@" --client-cert "$DRAFTFEED_HEALTH_CLIENT_CERT" --client-key "${DRAFTFEED_HEALTH_CLIENT_KEY:?}"
exec "$PY" -m draftfeed.server.cli --log-level WARNING health --target "grpcs://127.0.0.1:$PORT" --timeout 5 "$@"
