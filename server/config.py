"""The server process's configuration: one dataclass, parsed and validated once in `cli.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from draftfeed.client.errors import InvalidArgument

from .checks import Limits

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    model: str | None = None  # a local HF checkpoint; None = the built-in default target
    host: str = "127.0.0.1"
    port: int = 50051
    admin_port: int | None = None  # fastapi /healthz /readyz /metrics /sessions; None = off
    nemo_http_port: int | None = None  # NeMo AutoModel's remote-target HTTP protocol; None = off
    # TCP data plane for reply payloads (server/dataplane.py), on `host`: 0 = a free port, None = off
    data_port: int | None = 0
    device: str = "auto"
    dtype: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_chunk_bytes: int = 1 << 20
    max_forward_tokens: int = 16384
    max_queue: int = 256
    max_queued_per_session: int = 32
    cuda_graphs: bool = True  # on a GPU without tensor parallel: replay repeated batch shapes (graphs.py)
    grpc_workers: int = 128  # gRPC's thread pool; a quarter (at least 4) is kept for short calls
    max_streams_per_job: int = 32  # Generate/GenerateStream calls open at once per job (call_slots.py)
    # EAGLE-3 aux layer ids for sessions that name none (NeMo's HTTP clients); None: [1, N//2-1, N-4]
    aux_layer_ids: list[int] | None = None
    session_ttl_s: float = 900.0  # a session unused this long is closed and freed; 0 = never
    grace_seconds: float = 30.0
    # security: TLS on the gRPC and admin ports, mutual TLS with a client CA, per-job tokens
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token_file: str | None = None
    insecure_allow_remote: bool = False  # without a token file: answer clients beyond loopback
    # tensor parallel under torchrun (cli.py reads WORLD_SIZE / LOCAL_RANK)
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
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--token-file", self.token_file),
        ):
            if path is not None and not Path(path).is_file():
                raise InvalidArgument(f"{flag} {path!r} is not a readable file")
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
