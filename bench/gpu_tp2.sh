#!/bin/bash
# Issue 21 run 2 in ONE device call (nvidia-h200-x2): `draftfeed serve` under torchrun with TP=2 on a random-weight
# Llama-3.1-8B-dims target against TP=1 (GPU 0) in the same run (bench/tp_check.py): the served answers compared
# (EAGLE-3, DFlash full logits, DSpark; bf16), tokens/s of TP=2 vs TP=1 (EAGLE-3 and DSpark, default encodings,
# 4 requests in flight), and a short EAGLE-3 training job (the real loop, trainer on GPU 1) through the TP=2 server
# and then the TP=1 server. Predictions: bench/results/tp2_predictions.md.
# From the repository root, with the grpcio-health-checking / grpcio-reflection 1.84 wheels in WHL:
#   run(command="WHL=.devtmp/i17/whl bash bench/gpu_tp2.sh", carry=[".devtmp/i17"],
#       kind="nvidia-h200-x2", timeout_s=600)
# Knobs: BUDGET_S (570) DIMS (llama-3.1-8b) BATCH (4) SEQ (2048) CMP_BATCH (2) CMP_SEQ (1024) TP_SECONDS (10)
# TRAIN_SECONDS (12) TRAIN_BATCH (4) ALGOS (eagle3,dspark) TINY=1 (CPU dry run: tiny dims, gloo, fp32)
# R (/tmp/tp2: work dir). Writes $OUT/{session.log,tp2.md,servers.log}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
# NVLink multicast stays off (the device machine's rule; kept for every process started here)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -n "${WHL:-}" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
fi
SRC=${SRC:-/tmp/dfsrc_i21} # this checkout importable as `draftfeed`
mkdir -p $SRC/draftfeed
for d in client target server trainer bench; do ln -sfn "$PWD/$d" $SRC/draftfeed/$d; done
touch $SRC/draftfeed/__init__.py
export PYTHONPATH=$SRC:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
part() { # part NAME SECONDS CMD...: run with a time cap (never past the budget)
  local name=$1 cap=$2
  shift 2
  local l=$(left)
  [ "$cap" -gt "$l" ] && cap=$l
  if [ "$cap" -le 5 ]; then echo "== $name: SKIPPED (budget spent)"; return; fi
  echo "== $name (cap ${cap}s, t=$(($(date +%s) - T0))s)"
  local t=$(date +%s)
  timeout -s INT -k 20 "$cap" "$@" # INT: tp_check stops both servers and writes its report
  echo "== $name: rc=$? in $(($(date +%s) - t)) s"
}
DIMS=${DIMS:-llama-3.1-8b}; BATCH=${BATCH:-4}; SEQ=${SEQ:-2048}; CMP_BATCH=${CMP_BATCH:-2}; CMP_SEQ=${CMP_SEQ:-1024}
TP_SECONDS=${TP_SECONDS:-10}; TRAIN_SECONDS=${TRAIN_SECONDS:-12}; TRAIN_BATCH=${TRAIN_BATCH:-4}; ALGOS=${ALGOS:-eagle3,dspark}
DEVICE=auto; DTYPE=bfloat16; INIT=cuda:0; TDEV=cuda:1
if [ -n "${TINY:-}" ]; then # CPU dry run of this script: gloo, fp32
  DIMS=tiny; BATCH=2; SEQ=64; CMP_BATCH=2; CMP_SEQ=64; TP_SECONDS=2; TRAIN_SECONDS=2; TRAIN_BATCH=2
  DEVICE=cpu; DTYPE=float32; INIT=cpu; TDEV=cpu
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__, 'GPUs', torch.cuda.device_count())"
R=${R:-/tmp/tp2}; rm -rf $R; mkdir -p $R
part "0 random-weight $DIMS target (init on $INIT)" 200 python3 bench/train_throughput.py make-target --dir $R/target --dims $DIMS --device $INIT
part "1 TP=2 vs TP=1: answers, tokens/s, a training job" 480 python3 bench/tp_check.py --model $R/target --tp 2 \
  --device $DEVICE --dtype $DTYPE --batch $BATCH --seq $SEQ --compare-batch $CMP_BATCH --compare-seq $CMP_SEQ \
  --seconds $TP_SECONDS --throughput-algos $ALGOS --train-seconds $TRAIN_SECONDS --train-batch $TRAIN_BATCH \
  --trainer-device $TDEV --logs $R --out "$OUT/tp2.md"
for f in $R/tp1.log $R/tpk.log; do [ -f $f ] && { echo "=== $f"; grep -v "it/s]" $f | tail -40; }; done >"$OUT/servers.log"
nvidia-smi --query-gpu=index,memory.used --format=csv,noheader 2>/dev/null
echo "done at t=$(($(date +%s) - T0)) s"
