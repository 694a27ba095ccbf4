# Source on the GPU machine: makes this checkout importable as `draftfeed` and installs carried wheels.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
mkdir -p /tmp/dfsrc/draftfeed
for d in client server trainer bench; do ln -sfn "$PWD/$d" /tmp/dfsrc/draftfeed/$d; done
export PYTHONPATH=/tmp/dfsrc:/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1
