"""The server process's configuration: one dataclass whose fields name their `draftfeed serve` flags,
parsed and validated once in `cli.py`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from draftfeed.client.config_flags import flag
from draftfeed.client.errors import InvalidArgument
from draftfeed.target.limits import Limits

__all__ = ["ServeConfig", "Limits", "layer_ids"]


def layer_ids(text: str) -> list[int]:
    """`1,2,3` (or `1 2 3`) -> [1, 2, 3]; argparse reports anything else as a bad value."""
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer ids (e.g. 1,2,3)"
        ) from None


@dataclass
class ServeConfig:
    """`draftfeed serve`: each field that has a flag names it and its help (server/cli.py builds the
    parser from them, client/config_flags.py)."""

    model: str | None = flag("--model", "local HF checkpoint (default: built-in SmolLM2-135M-Instruct)", None)
    host: str = flag("--host", "address to bind; 0.0.0.0 binds all interfaces", "127.0.0.1")
    port: int = flag("--port", "the gRPC port (0: a free one)", 50051)
    admin_port: int | None = flag(
        "--admin-port", "HTTP /healthz /readyz /metrics /sessions and the status page (default: off)", None
    )
    nemo_http_port: int | None = flag(
        "--nemo-http-port",
        "also serve NeMo AutoModel's remote-target HTTP protocol (remote_urls: [http://HOST:PORT]) "
        "(default: off)",
        None,
    )
    # TCP data plane for reply payloads (server/dataplane.py), on `host`: 0 = a free port, None = off
    data_port: int | None = flag(
        "--data-port",
        "TCP data plane for reply payloads, offered to sessions (on --host; 0: a free port)",
        0,
        off=(
            "--no-data-plane",
            "offer no data plane: every reply goes on gRPC (e.g. when only the gRPC port is reachable)",
        ),
    )
    device: str = flag("--device", "cpu, cuda, cuda:N (auto: cuda when available)", "auto")
    dtype: str = flag("--dtype", "auto, bfloat16, float16, float32", "auto")
    limits: Limits = field(default_factory=Limits)
    max_chunk_bytes: int = flag("--max-chunk-bytes", "reply chunk size", 1 << 20)
    # the scheduler's token budget of one batched forward (not a per-request limit: see Limits)
    max_forward_tokens: int = flag(
        "--max-batch-tokens", "token budget of one batched forward", 16384, metavar="TOKENS"
    )
    max_queue: int = flag("--max-queue", "requests waiting for the GPU, all jobs", 256)
    max_queued_per_session: int = flag(
        "--max-queued-per-job", "requests waiting, per session", 32, metavar="N"
    )
    cuda_graphs: bool = flag(  # on a GPU without tensor parallel: replay repeated batch shapes (graphs.py)
        "--no-cuda-graphs",
        "run every target forward eagerly (default on a GPU: replay a CUDA graph for repeated batch shapes)",
        True,
        action="store_false",
    )
    grpc_workers: int = flag(
        "--grpc-workers",
        "gRPC worker threads; a quarter (at least 4) is kept for health checks and other short calls",
        128,
    )
    max_streams_per_job: int = flag(  # call_slots.py
        "--max-streams-per-job",
        "Generate/GenerateStream calls a job (without --token-file: a client connection) may have open "
        "at once; each holds a worker thread",
        32,
    )
    # EAGLE-3 aux layer ids for sessions that name none (NeMo's HTTP clients); None: [1, N//2-1, N-4]
    aux_layer_ids: list[int] | None = flag(
        "--aux-layer-ids",
        "EAGLE-3 aux layer ids (3 distinct, e.g. 1,2,3) for sessions that name none, such as NeMo HTTP "
        "clients (default: [1, N//2-1, N-4], which needs N >= 7 decoder layers)",
        None,
        type=layer_ids,
    )
    session_ttl_s: float = flag(
        "--session-ttl",
        "seconds a session may go without a request before it is closed and freed (its client "
        "re-opens it on its next request); 0: never",
        900.0,
        metavar="SECONDS",
    )
    grace_seconds: float = flag("--grace-seconds", "drain time on SIGTERM", 30.0)
    # security: TLS on the gRPC and admin ports, mutual TLS with a client CA, per-job tokens
    tls_cert: str | None = flag("--tls-cert", "PEM certificate chain: TLS on the gRPC and admin ports", None)
    tls_key: str | None = flag("--tls-key", "PEM private key of --tls-cert", None)
    tls_client_ca: str | None = flag(
        "--tls-client-ca", "PEM CA: require client certificates it signed (mutual TLS)", None
    )
    token_file: str | None = flag(
        "--token-file",
        "YAML/JSON job name -> token (and quotas); clients send 'authorization: Bearer <token>'",
        None,
    )
    insecure_allow_remote: bool = flag(
        "--insecure-allow-remote",
        "without --token-file, answer clients beyond loopback too (trusted networks only)",
        False,
        action="store_true",
    )
    # tensor parallel under torchrun (cli.py reads WORLD_SIZE / LOCAL_RANK): no flags
    tensor_parallel: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise InvalidArgument(f"--port {self.port} is not a TCP port (0..65535; 0 picks a free one)")
        if self.nemo_http_port is not None and not 0 <= self.nemo_http_port < 65536:
            raise InvalidArgument(f"--nemo-http-port {self.nemo_http_port} is not a TCP port")
        if self.data_port is not None and not 0 <= self.data_port < 65536:
            raise InvalidArgument(
                f"--data-port {self.data_port} is not a TCP port (0..65535; 0 picks a free one; "
                "--no-data-plane turns it off)"
            )
        if self.max_chunk_bytes < 1024:
            raise InvalidArgument(f"--max-chunk-bytes {self.max_chunk_bytes} is too small; use at least 1024")
        if self.max_forward_tokens < 1:
            raise InvalidArgument("--max-batch-tokens must be >= 1")
        if self.grace_seconds < 0:
            raise InvalidArgument(f"--grace-seconds {self.grace_seconds} must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidArgument("--tls-cert and --tls-key go together (the certificate chain and its key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        for name, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--token-file", self.token_file),
        ):
            if path is not None and not Path(path).is_file():
                raise InvalidArgument(f"{name} {path!r} is not a readable file")
        if self.grpc_workers < 8:
            raise InvalidArgument(f"--grpc-workers {self.grpc_workers} is too few; use at least 8")
        if self.max_streams_per_job < 1:
            raise InvalidArgument(f"--max-streams-per-job {self.max_streams_per_job} must be >= 1")
        if self.session_ttl_s < 0:
            raise InvalidArgument(
                f"--session-ttl {self.session_ttl_s} must be >= 0 (0: sessions never expire)"
            )
        if self.tensor_parallel < 1:
            raise InvalidArgument(f"tensor parallel size {self.tensor_parallel} must be >= 1")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
