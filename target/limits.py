"""The per-request limits a target enforces: checked before any GPU work (target/checks.py), set by
`draftfeed serve`'s flags (server/config.py) and sent to clients in the model info. Torch-free, so the
command-line parser can build its flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from draftfeed.client.config_flags import flag

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Per-request limits a server enforces (sent to clients in the model info)."""

    max_batch_size: int = flag("--max-batch-size", "per-request limit on B", 256)
    max_seq_len: int = flag("--max-seq-len", "per-request limit on S", 32768)
    max_request_tokens: int = flag("--max-request-tokens", "per-request limit on B*S", 262144)
    # packed rows attend through a [B,1,S,S] mask in the model dtype: a packed request's B*S*S may be
    # at most max_packed_seq_len**2 (one row of that length; 8192: 256 MiB in fp32)
    max_packed_seq_len: int = flag(
        "--max-packed-seq-len",
        "packed requests: B*S*S (their attention mask) at most this squared (one row of this length)",
        8192,
    )
