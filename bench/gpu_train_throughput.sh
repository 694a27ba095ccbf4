#!/bin/bash
# Issue 17 in ONE device call (H200): draft-step profile (reference vs fast), end-to-end training tok/s remote vs
# co-located for EAGLE-3 / DFlash / DSpark at B=16,4,1 (S=2048) with the default (exact) and compact encodings,
# 2 and 4 concurrent jobs, and the bf16 difference of exact vs raw EAGLE-3 probabilities. Random-weight
# SmolLM2-135M dims (no GGUF to carry). From main's root, with the worktree rsynced to .wt/i17 and the
# grpcio-health-checking / grpcio-reflection wheels in .devtmp/i17/whl:
#   run(command="cd .wt/i17 && WHL=../../.devtmp/i17/whl bash bench/gpu_train_throughput.sh",
#       carry=[".wt/i17", ".devtmp/i17"], timeout_s=340)
# The draft steps alone (reference / fast eager / fast compiled rows for EAGLE-3, DFlash, DSpark; no server):
#   run(command="cd .wt/i17step && PARTS=1 FIDELITY=0 STEPS_CAP=220 BUDGET_S=235 WHL=../../.devtmp/i17/whl bash bench/gpu_train_throughput.sh",
#       carry=[".wt/i17step", ".devtmp/i17"], timeout_s=300)
# Knobs: BUDGET_S SEQ RUN_SECONDS REPEATS (part 2: each co-located / remote pair N times, interleaved) PREFETCH (part 2: e.g. 2,4: a remote exact row at each depth) PACKED=1 (parts 1-2: rows of packed documents, as real data trains) CUDA_CHECK=0 (part 1 without the step's CUDA tests) PROFILE_LOOP=N (part 2: N more steps of each run profiled, host time by op and function, in profiles.txt) BATCHES SINGLE_ALGOS (part 2: e.g. eagle3) NO_COMPACT_AT (batch sizes without the compact rows) SINGLE_CAP JOBS2_CAP JOBS4_CAP (seconds of parts 2-4, each jobs run) JOB_BATCHES ("1 4": jobs runs per batch size) PARTS (default 1234: which parts run) FIDELITY (1: exact vs raw, needs the
# server) STEPS_CAP IMPLS STEP_ALGOS STEPS GPU_TESTS (pytest args: GPU tests first). Writes $OUT/{session.log,train_throughput.md,profiles.txt,results.jsonl,server.log}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-320}
SEQ=${SEQ:-2048}; BATCHES=${BATCHES:-16,4,1}; TINY=${TINY:-}
SECONDS_PER_RUN=${RUN_SECONDS:-2.5}  # not $SECONDS: bash counts the shell's seconds in it
# WHL (a folder of wheels carried with the call), this checkout importable as `draftfeed`, left / part
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__)"
R=/tmp/ttr; rm -rf $R; mkdir -p $R
TGT=/tmp/tt_target
B=bench/train_throughput.py
part "0 random-weight target" 60 python3 $B make-target --dir $TGT $TINY
PORT=${PORT:-50051}
URL=grpc://127.0.0.1:$PORT
SERVER=
FIDELITY=${FIDELITY:-1}  # PARTS=1 FIDELITY=0: the draft steps alone, no server
if [[ ${PARTS:-1234} == *[234]* || $FIDELITY == 1 ]]; then
  # the admin port (the server's load over each remote run) where fastapi / uvicorn import (WHL carries them)
  ADMIN=$(python3 -c "import fastapi, uvicorn" 2>/dev/null && echo "--admin-port $((PORT + 1))")
  python3 -m draftfeed.server.cli serve --model $TGT --dtype bfloat16 --port $PORT $ADMIN >$R/server.log 2>&1 &
  SERVER=$!
  for _ in $(seq 1 90); do grep -q "serving on" $R/server.log && break; sleep 1; done
  echo "server up at t=$(($(date +%s) - T0)) s"
fi
STEP_URL=$([ "$FIDELITY" == 1 ] && echo "--url $URL")
if [[ ${PARTS:-1234} == *1* ]] && [ "${CUDA_CHECK:-1}" = 1 ] && python3 -c "import pytest" 2>/dev/null; then  # the CUDA kernels against the reference step
  part "1a sink-attention CUDA check" 40 python3 -m pytest -q -p no:cacheprovider tests/test_fast_step.py -k cuda
fi
# GPU_TESTS="tests/test_graphs.py -k cuda_client": GPU tests to run first (the server is up, but they start their own)
[ -n "${GPU_TESTS:-}" ] && part "gpu tests" ${GPU_TESTS_CAP:-90} python3 -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS
[[ ${PARTS:-1234} == *1* ]] && part "1 draft steps + profile" ${STEPS_CAP:-80} python3 $B steps --target $TGT $STEP_URL --out $R --batch ${STEP_BATCH:-16} --seq $SEQ --steps ${STEPS:-4} --impls ${IMPLS:-reference,fast,compiled} --algos ${STEP_ALGOS:-eagle3,dspark,dflash} ${PACKED:+--packed}
[[ ${PARTS:-1234} == *2* ]] && part "2 one job: co-located vs remote" ${SINGLE_CAP:-150} python3 $B single --target $TGT --url $URL ${ADMIN:+--admin-url http://127.0.0.1:$((PORT + 1))} --out $R ${SINGLE_ALGOS:+--algos $SINGLE_ALGOS} --batches $BATCHES --no-compact-at ${NO_COMPACT_AT:-1} --seq $SEQ --seconds $SECONDS_PER_RUN --repeats ${REPEATS:-1} --prefetch ${PREFETCH:-2} ${PACKED:+--packed} --profile-loop ${PROFILE_LOOP:-0}
for JB in ${JOB_BATCHES:-4}; do  # e.g. JOB_BATCHES="1 4": the jobs runs at each batch size (alone rows come from part 2)
  [[ ${PARTS:-1234} == *3* ]] && part "3 two jobs B=$JB" ${JOBS2_CAP:-35} python3 $B jobs --target $TGT --url $URL --out $R --algos eagle3,dspark --batch $JB --seq $SEQ --seconds 4
  [[ ${PARTS:-1234} == *4* ]] && part "4 four jobs B=$JB" ${JOBS4_CAP:-45} python3 $B jobs --target $TGT --url $URL --out $R --algos eagle3,dspark,dflash,eagle3 --batch $JB --seq $SEQ --seconds 4
done
# EVAL_SMOKE=1: bench/gpu_smoke.py after the server stops (the evaluator's graphed loops on a random model of the same dims)
[ -n "$SERVER" ] && [ "${EVAL_SMOKE:-0}" = 1 ] && { kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; SERVER=; }
[ "${EVAL_SMOKE:-0}" = 1 ] && part "5 eval loops smoke" ${SMOKE_CAP:-80} python3 bench/gpu_smoke.py --out "$OUT" --regen-batches 512x256
[ -n "$SERVER" ] && { kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; }
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); DEV=${DEV:-cpu}
python3 $B report --out $R --device "$DEV" --command "bash bench/gpu_train_throughput.sh (SEQ=$SEQ RUN_SECONDS=$SECONDS_PER_RUN BATCHES=$BATCHES)"
cp $R/train_throughput.md "$OUT/"
cat $R/*.jsonl >"$OUT/results.jsonl" 2>/dev/null
for f in $R/profile_*.txt; do [ -f "$f" ] && { echo "=== $(basename $f)"; cat "$f"; echo; }; done >"$OUT/profiles.txt"
[ -f $R/server.log ] && tail -200 $R/server.log >"$OUT/server.log"
for f in $R/*jobs_*.log; do [ -f "$f" ] && { echo "=== $f"; tail -5 "$f"; }; done
echo "done at t=$(($(date +%s) - T0)) s"
