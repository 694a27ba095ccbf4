"""Request checks that run before any GPU work; each names the field, the value and what was expected."""

from __future__ import annotations

import torch

from draftfeed.client.errors import InvalidArgument, ResourceExhausted

from .limits import Limits
from .packing import check_packing

__all__ = ["Limits", "check_generate_inputs"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
_MASK_DTYPES = (*_INT_DTYPES, torch.bool)


def _check_2d(name: str, t: torch.Tensor, dtypes, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise InvalidArgument(f"{name} must have rank 2 [B,S], got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise InvalidArgument(
            f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; expected one of {names}"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise InvalidArgument(f"{name} has shape {tuple(t.shape)}; expected {list(shape)} to match input_ids")


def check_generate_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
    *,
    vocab_size: int,
    limits: Limits | None = None,
) -> None:
    """Validate one generate request against the target's vocab and the server's limits."""
    _check_2d("input_ids", input_ids, _INT_DTYPES)
    shape = tuple(input_ids.shape)
    _check_2d("attention_mask", attention_mask, _MASK_DTYPES, shape)
    _check_2d("loss_mask", loss_mask, _MASK_DTYPES, shape)
    if position_ids is not None:
        _check_2d("position_ids", position_ids, _INT_DTYPES, shape)
    if doc_remaining is not None:
        _check_2d("doc_remaining", doc_remaining, _INT_DTYPES, shape)
    if seq_lens is not None:
        if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype not in _INT_DTYPES:
            raise InvalidArgument("seq_lens must be an integer tensor [B, max_docs]")
    b, s = shape
    if b == 0 or s == 0:
        raise InvalidArgument(f"input_ids is empty (shape {[b, s]}); send at least one token")
    if input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(
                f"input_ids holds token id {bad}, outside the target vocab [0, {vocab_size})"
            )
    for name, t in (("attention_mask", attention_mask), ("loss_mask", loss_mask)):
        if t.dtype != torch.bool and ((t != 0) & (t != 1)).any():
            raise InvalidArgument(f"{name} must hold only 0 and 1")
    if limits is not None:
        if b > limits.max_batch_size:
            raise ResourceExhausted(
                f"batch size {b} is over this server's limit of {limits.max_batch_size}; split the batch"
            )
        if s > limits.max_seq_len:
            raise ResourceExhausted(
                f"sequence length {s} is over this server's limit of {limits.max_seq_len}"
            )
        if b * s > limits.max_request_tokens:
            raise ResourceExhausted(
                f"{b}x{s} = {b * s} tokens is over this server's per-request limit of {limits.max_request_tokens} tokens"
            )
        packed = position_ids is not None or seq_lens is not None
        cap = limits.max_packed_seq_len
        if packed and b * s * s > cap * cap:
            raise ResourceExhausted(
                f"a packed request of {b}x{s} tokens needs a {b}x{s}x{s} attention mask, over this server's "
                f"limit of {cap}x{cap} entries (--max-packed-seq-len {cap}); send fewer or shorter packed rows"
            )
    check_packing(input_ids, position_ids, seq_lens, doc_remaining)
