"""Pieces the draft models share (math only): activations, RMSNorm, rotary embeddings, packed documents.

EAGLE-3 (`eagle3.py`) and the block drafts (`dflash.py`, `dspark.py`) import these; none of them keeps
its own copy. RoPE is rotate-half (Llama / Qwen layout) with angles in fp32 whatever the model dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "RMSNorm",
    "rope_inv_freq",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "document_ids",
    "tokens_left_in_document",
    "text_config_dict",
]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    """Llama RMSNorm: computed in fp32, weight applied in the input dtype."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32): default, linear or llama3 rope scaling."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r}: expected None, 'linear' or 'llama3'")
    # llama3: long wavelengths divided by factor, short ones kept, a smooth blend in between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B,S,head_dim] for integer `positions` [B,S] (angles in fp32, times `scaling`)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    if scaling == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B,heads,S,d] with cos/sin [B,S,d] (broadcast over heads)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def document_ids(
    seq_len: int, position_ids: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Document index [B,S] of each slot in a packed batch, or None when the batch is not packed.

    From `seq_lens` [B,D] (zero-padded, rows summing to S) when given, else from `position_ids`: a
    new document starts wherever the position is not the previous one plus one.
    """
    if seq_lens is not None:
        bounds = seq_lens.long().cumsum(-1)
        slots = torch.arange(seq_len, device=seq_lens.device).expand(seq_lens.shape[0], seq_len).contiguous()
        return torch.searchsorted(bounds, slots, right=True)
    if position_ids is not None:
        restart = torch.ones_like(position_ids, dtype=torch.bool)
        restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return restart.long().cumsum(-1)
    return None


def tokens_left_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_remaining [B,S] from document ids [B,S]: how many slots of the same document follow each slot."""
    slots = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    last = torch.zeros(doc_ids.shape[0], int(doc_ids.max()) + 1, dtype=torch.long, device=doc_ids.device)
    last = last.scatter_reduce(1, doc_ids, slots, reduce="amax")
    return last.gather(1, doc_ids) - slots


def text_config_dict(config: Any) -> dict:
    """The target's text config as a plain dict (a nested `text_config` is unwrapped)."""
    if isinstance(config, dict):
        d = dict(config)
        return dict(d["text_config"]) if isinstance(d.get("text_config"), dict) else d
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config.to_dict()
