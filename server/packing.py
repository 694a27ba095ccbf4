"""Packed rows: several documents in one row, attended block-causally (DESIGN.md, Packing).

`seq_lens` [B, max_docs] holds each row's document lengths, zero-padded, each row summing to S;
`position_ids` [B,S] restart at 0 for every document; `doc_remaining` [B,S] is passed through.
The target sees an additive mask [B,1,S,S]: 0 inside a document's causal triangle, the dtype's
minimum everywhere else, so no document ever sees another.
"""

from __future__ import annotations

import torch

from draftfeed.client.errors import InvalidArgument

__all__ = ["document_ids", "block_causal_mask", "packed_attention_mask", "check_packing"]


def check_packing(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    doc_remaining: torch.Tensor | None,
) -> None:
    """Reject packing metadata that disagrees with the batch; names the field and the rule."""
    b, s = input_ids.shape
    for name, t in (("position_ids", position_ids), ("doc_remaining", doc_remaining)):
        if t is not None and tuple(t.shape) != (b, s):
            raise InvalidArgument(
                f"{name} has shape {tuple(t.shape)}; expected [B,S] = {[b, s]} like input_ids"
            )
    if seq_lens is None:
        if doc_remaining is not None and position_ids is None:
            raise InvalidArgument(
                "doc_remaining was given without position_ids or seq_lens; send the packing metadata"
            )
        return
    if seq_lens.dim() != 2 or seq_lens.shape[0] != b:
        raise InvalidArgument(
            f"seq_lens has shape {tuple(seq_lens.shape)}; expected [B, max_docs] with B={b}"
        )
    if (seq_lens < 0).any():
        raise InvalidArgument("seq_lens holds a negative length; document lengths must be >= 0")
    sums = seq_lens.sum(dim=1)
    bad = (sums != s).nonzero().flatten()
    if len(bad):
        r = int(bad[0])
        raise InvalidArgument(
            f"seq_lens row {r} sums to {int(sums[r])}; each row must sum to the sequence length S={s}"
        )
    if position_ids is not None:
        expected = _positions_from_lens(seq_lens, s)
        if not torch.equal(expected.to(position_ids.device), position_ids.long()):
            raise InvalidArgument("position_ids do not restart at 0 at each document start given by seq_lens")


def _positions_from_lens(seq_lens: torch.Tensor, s: int) -> torch.Tensor:
    doc = document_ids(seq_lens, s)
    starts = torch.cumsum(seq_lens, dim=1) - seq_lens  # start offset of each document
    return torch.arange(s, device=seq_lens.device).expand_as(doc) - torch.gather(starts, 1, doc)


def document_ids(seq_lens: torch.Tensor, s: int) -> torch.Tensor:
    """[B,S] index of the document each position belongs to."""
    ends = torch.cumsum(seq_lens, dim=1)  # [B, D]
    pos = torch.arange(s, device=seq_lens.device)
    return (pos.view(1, s, 1) >= ends.unsqueeze(1)).sum(-1)


def _documents(position_ids: torch.Tensor | None, seq_lens: torch.Tensor | None, s: int) -> torch.Tensor:
    if seq_lens is not None:
        return document_ids(seq_lens, s)
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    return torch.cumsum(starts, dim=1) - 1


def block_causal_mask(
    docs: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive [B,1,S,S] mask from [B,S] document ids: 0 where query i may see key j (same document,
    j <= i, and within `sliding_window` when given), the dtype's minimum elsewhere."""
    s = docs.shape[1]
    idx = torch.arange(s, device=docs.device)
    allowed = (docs.unsqueeze(2) == docs.unsqueeze(1)) & (idx.view(1, s, 1) >= idx.view(1, 1, s))
    if sliding_window is not None:
        allowed &= (idx.view(1, s, 1) - idx.view(1, 1, s)) < sliding_window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=docs.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def packed_attention_mask(
    config, position_ids: torch.Tensor | None, seq_lens: torch.Tensor | None, s: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask to hand the HF forward for a packed batch.

    Models that mix full and sliding-window layers (`config.layer_types`) get a dict with one mask
    per layer type, so the sliding layers keep their window inside each document.
    """
    docs = _documents(position_ids, seq_lens, s)
    full = block_causal_mask(docs, dtype)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" not in layer_types:
        return full
    window = getattr(config, "sliding_window", None)
    return {"full_attention": full, "sliding_attention": block_causal_mask(docs, dtype, window)}
