#!/bin/bash
# Issue 21 run 1 in ONE device call (nvidia-h200-x2): the server on GPU 0, the trainer(s) on GPU 1, against the
# same training co-located (target + trainer) on GPU 1, in the same run, through the real training loop
# (bench/train_throughput.py). EAGLE-3, DFlash, DSpark with the default (exact) encodings at B=16 x 2048 on
# random-weight SmolLM2-135M dims and Llama-3.1-8B dims; 2 and 4 concurrent jobs on GPU 1 against one server
# (135M dims, B=4) and the one-job B=4 numbers they compare with; last, if time is left, the issue-17 layout
# (server and trainer on GPU 1) at B=16 for the same-run comparison. Predictions: bench/results/two_gpus_predictions.md.
# From the repository root, with the grpcio-health-checking / grpcio-reflection 1.84 wheels in WHL:
#   run(command="WHL=.devtmp/i17/whl bash bench/gpu_two_gpus.sh", carry=[".devtmp/i17"],
#       kind="nvidia-h200-x2", timeout_s=600)
# Knobs: BUDGET_S (540: leaves time for the reports) SEQ (2048) RUN_SECONDS (3) RUN_SECONDS_8B (8) JOB_BATCH (4) JOB_SECONDS (4) CAP_X (1: part caps x) PARTS (ABCDEF) ALGOS (one-job parts) TRAINER_DEV
# (cuda:1) SERVER_DEV (cuda:0) TINY=1 (CPU dry run: tiny dims, S 128, B 2, cpu) R (/tmp/two_gpus: work dir). Writes $OUT/{session.log,
# two_gpus.md,results.jsonl,servers.log}.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
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
part() { # part NAME SECONDS CMD...: run with a time cap (x CAP_X; never past the budget)
  local name=$1 cap=$(($2 * ${CAP_X:-1}))
  shift 2
  local l=$(left)
  [ "$cap" -gt "$l" ] && cap=$l
  if [ "$cap" -le 5 ]; then echo "== $name: SKIPPED (budget spent)"; return; fi
  echo "== $name (cap ${cap}s, t=$(($(date +%s) - T0))s)"
  local t=$(date +%s)
  timeout -k 5 "$cap" "$@"
  echo "== $name: rc=$? in $(($(date +%s) - t)) s"
}
PARTS=${PARTS:-ABCDEF}; ALGOS=${ALGOS:-eagle3,dspark,dflash}
SEQ=${SEQ:-2048}; B16=${B16:-16}; JOB_BATCH=${JOB_BATCH:-4}
RS=${RUN_SECONDS:-3}; RS8=${RUN_SECONDS_8B:-8}; JS=${JOB_SECONDS:-4}
SDEV=${SERVER_DEV:-cuda:0}; TDEV=${TRAINER_DEV:-cuda:1}
SMALL=smollm2-135m; BIG=llama-3.1-8b; INIT=$TDEV
if [ -n "${TINY:-}" ]; then # CPU dry run of this script
  SMALL=tiny; BIG=tiny; SEQ=128; B16=2; JOB_BATCH=1; RS=1; RS8=1; JS=1; SDEV=cpu; TDEV=cpu; INIT=cpu; CAP_X=${CAP_X:-3}
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__, 'GPUs', torch.cuda.device_count())"
R=${R:-/tmp/two_gpus}; rm -rf $R; mkdir -p $R/small $R/big
B=bench/train_throughput.py
part "0a random-weight $SMALL target" 60 python3 $B make-target --dir $R/t_small --dims $SMALL --device $INIT
part "0b random-weight $BIG target (init on $INIT)" 200 python3 $B make-target --dir $R/t_big --dims $BIG --device $INIT
# both servers on the server GPU for the whole run (the idle one costs memory only)
python3 -m draftfeed.server.cli serve --model $R/t_small --dtype bfloat16 --device $SDEV --port 0 >$R/server_small.log 2>&1 &
S1=$!
python3 -m draftfeed.server.cli serve --model $R/t_big --dtype bfloat16 --device $SDEV --port 0 >$R/server_big.log 2>&1 &
S2=$!
url() { grep -o "serving on grpc://[0-9.:]*" $1 | head -1 | sed 's/serving on //'; }
for _ in $(seq 1 240); do [ -n "$(url $R/server_small.log)" ] && [ -n "$(url $R/server_big.log)" ] && break; sleep 1; done
U1=$(url $R/server_small.log); U2=$(url $R/server_big.log)
echo "servers: $SMALL at ${U1:-DOWN}, $BIG at ${U2:-DOWN} (t=$(($(date +%s) - T0)) s)"
ON="--server-device $SDEV --trainer-device $TDEV --seq $SEQ"
ONE="--algos $ALGOS"
[[ $PARTS == *A* ]] && [ -n "$U1" ] && part "A $SMALL one job B=$B16: co-located vs remote (server $SDEV, trainer $TDEV)" 100 \
  python3 $B single --target $R/t_small --url $U1 $ON --out $R/small $ONE --batches $B16 --no-compact-at $B16 --seconds $RS
[[ $PARTS == *B* ]] && [ -n "$U2" ] && part "B $BIG one job B=$B16: co-located vs remote" 220 \
  python3 $B single --target $R/t_big --url $U2 $ON --out $R/big $ONE --batches $B16 --no-compact-at $B16 --seconds $RS8
[[ $PARTS == *C* ]] && [ -n "$U1" ] && part "C $SMALL two jobs on $TDEV" 40 \
  python3 $B jobs --target $R/t_small --url $U1 $ON --out $R/small --algos eagle3,dspark --batch $JOB_BATCH --seconds $JS
[[ $PARTS == *D* ]] && [ -n "$U1" ] && part "D $SMALL four jobs on $TDEV" 50 \
  python3 $B jobs --target $R/t_small --url $U1 $ON --out $R/small --algos eagle3,dspark,dflash,eagle3 --batch $JOB_BATCH --seconds $JS
[[ $PARTS == *E* ]] && [ -n "$U1" ] && part "E $SMALL one job B=$JOB_BATCH (what C and D compare with)" 70 \
  python3 $B single --target $R/t_small --url $U1 $ON --out $R/small $ONE --batches $JOB_BATCH --no-compact-at $JOB_BATCH --seconds $RS
kill $S1 $S2 2>/dev/null; wait $S1 $S2 2>/dev/null
# F: the issue-17 layout in the same call: the bench starts a server on the trainer's device itself
[[ $PARTS == *F* ]] && part "F $SMALL one job B=$B16, server and trainer both on $TDEV" 80 \
  python3 $B single --target $R/t_small --server-device $TDEV --trainer-device $TDEV --seq $SEQ --out $R/shared $ONE \
  --batches $B16 --no-compact-at $B16 --seconds $RS
DEV=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); DEV=${DEV:-cpu}
N=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
CMD="bash bench/gpu_two_gpus.sh (SEQ=$SEQ RUN_SECONDS=$RS RUN_SECONDS_8B=$RS8 JOB_BATCH=$JOB_BATCH JOB_SECONDS=$JS PARTS=$PARTS ALGOS=$ALGOS)"
: >"$OUT/two_gpus.md"
for d in small big shared; do
  case $d in
    small) title="$SMALL dims: server on $SDEV, trainers on $TDEV" ;;
    big) title="$BIG dims: server on $SDEV, trainer on $TDEV" ;;
    shared) title="$SMALL dims: server and trainer on the same device ($TDEV), the issue-17 layout" ;;
  esac
  if ls $R/$d/*.jsonl >/dev/null 2>&1; then
    python3 $B report --out $R/$d --device "${N}x $DEV" --command "$CMD" --title "$title" >/dev/null
    cat $R/$d/train_throughput.md >>"$OUT/two_gpus.md"
    for f in $R/$d/*.jsonl; do sed "s/^{/{\"run\": \"$d\", /" $f; done >>"$OUT/results.jsonl"
  fi
done
for f in $R/server_small.log $R/server_big.log $R/shared/server.log; do [ -f $f ] && { echo "=== $f"; tail -40 $f; }; done >"$OUT/servers.log"
for f in $R/small/*jobs_*.log; do [ -f "$f" ] && { echo "=== $f"; tail -3 "$f"; }; done
cat "$OUT/two_gpus.md"
echo "done at t=$(($(date +%s) - T0)) s"
