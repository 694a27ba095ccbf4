"""The server process's configuration: one dataclass, parsed and validated once in `cli.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from draftfeed.client.errors import InvalidArgument

from .checks import Limits

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    model: str | None = None  # a local HF checkpoint; None = the built-in default target
    host: str = "127.0.0.1"
    port: int = 50051
    admin_port: int | None = None  # fastapi /healthz /readyz /metrics /sessions; None = off
    device: str = "auto"
    dtype: str = "auto"
    limits: Limits = field(default_factory=Limits)
    max_chunk_bytes: int = 1 << 20
    max_batch_tokens: int = 16384
    max_queue: int = 256
    max_queued_per_session: int = 32
    grpc_workers: int = 32
    grace_seconds: float = 30.0

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise InvalidArgument(f"--port {self.port} is not a TCP port (0..65535; 0 picks a free one)")
        if self.max_chunk_bytes < 1024:
            raise InvalidArgument(f"--max-chunk-bytes {self.max_chunk_bytes} is too small; use at least 1024")
        if self.max_batch_tokens < 1:
            raise InvalidArgument("--max-batch-tokens must be >= 1")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
