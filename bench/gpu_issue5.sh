#!/bin/bash
# The issue-5 serving table with the server's defaults (CUDA graphs on), every GPU-marked test, and the data-plane
# transport at 16 and 64 MiB (issue 4, after the header-first change), in ONE device call (H100), under $OUT:
#
#   run(command="bash bench/gpu_issue5.sh", carry=[".devtmp/eagle3/whl", ".devtmp/web"], timeout_s=590)
# TRANSPORT=0 skips the transport runs.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/issue5_session.log") 2>&1
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part "1 GPU tests" 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests
part "2 serving, issue 5 table" 240 python3 bench/serving.py --targets smollm2-135m-dims,llama-3.2-1b-dims \
  --seqs 1024,4096 --jobs 1,2,4,8 --lock-jobs 4 --encodings latent+fp8 --tokens-per-job 65536 \
  --tag=-issue5-graphs --out "$OUT"
for i in $([ "${TRANSPORT:-1}" = 1 ] && echo 1 2); do
  part "3 transport run $i" 60 python3 bench/transport.py --sizes 16,64 --chunks 1024 --windows bdp --no-drain \
    --out "$OUT/transport$i"
done
rm -f "$OUT"/*.json
echo "total $(($(date +%s) - T0)) s"
