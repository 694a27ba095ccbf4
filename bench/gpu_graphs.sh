#!/bin/bash
# CUDA graphs of the target forward (issues 5 and 6) in ONE device call (H100), written under $OUT:
#   1. every GPU-marked test (graph replays equal the eager forward bit for bit; no sync after the forward)
#   2. serving with the server's graphs off and on in the same run: SmolLM2-135M dims and Llama-3.2-1B dims,
#      S=1024 and 4096, 1 and 4 jobs, latent+fp8 over the data plane; plain forward eager and replayed from a graph
#   3. the same for Llama-3.1-8B dims at S=1024 (graphs should not matter there: GPU-bound)
#   4. py-spy of the server and its client jobs while 1 and 4 jobs stream (135M dims, S=1024, graphs on),
#      summarised by bench/pyspy_summary.py
#
#   run(command="bash bench/gpu_graphs.sh", carry=[".devtmp/eagle3/whl", ".devtmp/web"], timeout_s=590)
# .devtmp/web holds wheels the GPU machine lacks: fastapi, uvicorn and their pure-Python dependencies,
# opentelemetry-api, pydantic-core for CPython 3.12, py-spy.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/graphs_session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-500}
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, grpc; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grpcio', grpc.__version__)"


part "1a GPU graph tests" 120 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_graphs.py
part "1b other GPU tests" 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/test_graphs.py
part "2 serving, graphs off/on" 240 python3 bench/serving.py --targets smollm2-135m-dims,llama-3.2-1b-dims \
  --seqs 1024,4096 --jobs 1,4 --lock-jobs "" --encodings latent+fp8 --graphs off,on --tokens-per-job 131072 --tag=-graphs --out "$OUT"
part "3 serving 8B dims, graphs off/on" 120 python3 bench/serving.py --targets llama-3.1-8b-dims --seqs 1024 \
  --jobs 1,4 --lock-jobs "" --encodings latent+fp8 --graphs off,on --tokens-per-job 65536 --tag=-graphs-8b --out "$OUT"
profile() { # profile JOBS TOKENS_PER_JOB: attach to the bench's process once its timed runs stream
  local log=$OUT/prof$1.log
  python3 bench/serving.py --targets smollm2-135m-dims --seqs 1024 --jobs $1 --lock-jobs "" --encodings latent+fp8 \
    --graphs on --tokens-per-job $2 --out /tmp/prof$1 >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 60); do grep -q "built in" "$log" && break; sleep 1; done
  sleep 10 # plain forwards and the warm-up run
  /tmp/site/bin/py-spy record -r 200 --threads --subprocesses --nonblocking -f raw -o /tmp/prof$1.txt \
    --pid $pid --duration 12
  kill $pid 2>/dev/null
  wait $pid 2>/dev/null
  python3 bench/pyspy_summary.py /tmp/prof$1.txt --top 40 >"$OUT/profile-$1job-summary.txt"
  head -20 "$OUT/profile-$1job-summary.txt"
}
[ "$(left)" -gt 60 ] && profile 1 1048576
[ "$(left)" -gt 40 ] && profile 4 1048576
rm -f "$OUT"/*.json "$OUT"/prof*.log
echo "total $(($(date +%s) - T0)) s"
