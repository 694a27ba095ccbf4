"""Packed rows: several documents in one row, attended block-causally (docs/architecture.md, Packing).

`seq_lens` [B, max_docs] holds each row's document lengths, zero-padded, each row summing to S;
`position_ids` [B,S] restart at 0 for every document; `doc_remaining` [B,S] is passed through.
The target sees an additive mask [B,1,S,S]: 0 inside a document's causal triangle, the dtype's
minimum everywhere else, so no document ever sees another.

A request may send any of the three (`doc_remaining` only beside one of the others); `check_packing`
validates all of them before the request may join a batch, and `stack_packed` gives a batch of
requests with different subsets each request's own documents and positions (those it gets served
alone: documents from `seq_lens`, else from the restarts of `position_ids`; positions from
`position_ids`, else 0..S-1), so one job's choice never changes another's answer.
"""

from __future__ import annotations

import torch

from draftfeed.client.errors import InvalidArgument
from draftfeed.client.packing import attention_allowed, document_ids

__all__ = [
    "block_causal_mask",
    "packed_attention_mask",
    "check_packing",
    "stack_packed",
]


def check_packing(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    seq_lens: torch.Tensor | None,
    doc_remaining: torch.Tensor | None,
) -> None:
    """Reject packing metadata that disagrees with the batch; names the field and the rule.

    Checked on the host before the request is queued, so that nothing a batch builds from it (the
    document ids, the [B,1,S,S] mask, the forward's positions) can fail or grow for another job:
    `seq_lens` is [B, D] with D <= S, lengths in [0, S], each row summing to S; `position_ids` restart
    at 0 and count up by one inside a document (and agree with `seq_lens` when both are sent);
    `doc_remaining` holds values in [0, S].
    """
    b, s = input_ids.shape
    for name, t in (("position_ids", position_ids), ("doc_remaining", doc_remaining)):
        if t is not None and tuple(t.shape) != (b, s):
            raise InvalidArgument(
                f"{name} has shape {tuple(t.shape)}; expected [B,S] = {[b, s]} like input_ids"
            )
    if doc_remaining is not None:
        if position_ids is None and seq_lens is None:
            raise InvalidArgument(
                "doc_remaining was given without position_ids or seq_lens; send the packing metadata"
            )
        if bool((doc_remaining < 0).any()) or bool((doc_remaining > s).any()):
            raise InvalidArgument(f"doc_remaining holds a value outside [0, S={s}]")
    if position_ids is not None:
        pos = position_ids.long()
        if bool((pos < 0).any()) or bool((pos >= s).any()):
            raise InvalidArgument(
                f"position_ids hold a value outside [0, S={s}); positions restart per document"
            )
        steps = pos[:, 1:]
        if bool((pos[:, 0] != 0).any()) or bool(((steps != 0) & (steps != pos[:, :-1] + 1)).any()):
            raise InvalidArgument(
                "position_ids must start each row at 0 and, inside a document, count up by one "
                "(restarting at 0 where a document starts)"
            )
    if seq_lens is None:
        return
    if seq_lens.dim() != 2 or seq_lens.shape[0] != b:
        raise InvalidArgument(
            f"seq_lens has shape {tuple(seq_lens.shape)}; expected [B, max_docs] with B={b}"
        )
    if not 1 <= seq_lens.shape[1] <= s:
        raise InvalidArgument(
            f"seq_lens has {seq_lens.shape[1]} document slots per row; a row of S={s} tokens holds "
            f"between 1 and {s} documents (the limit is S)"
        )
    if bool((seq_lens < 0).any()) or bool((seq_lens > s).any()):
        raise InvalidArgument(f"seq_lens holds a length outside [0, S={s}]; document lengths must be >= 0")
    sums = seq_lens.long().sum(dim=1)
    bad = (sums != s).nonzero().flatten()
    if len(bad):
        r = int(bad[0])
        raise InvalidArgument(
            f"seq_lens row {r} sums to {int(sums[r])}; each row must sum to the sequence length S={s}"
        )
    if position_ids is not None:
        expected = _positions_from_lens(seq_lens.long(), s)
        if not torch.equal(expected.to(position_ids.device), position_ids.long()):
            raise InvalidArgument("position_ids do not restart at 0 at each document start given by seq_lens")


def stack_packed(tbs) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_lens [B,S], position_ids [B,S]) for a batch of packed requests (`TokenBatch`es of one
    length S), each row's documents and positions as serving its request alone reads them: no host
    sync, fixed shapes (a row's `seq_lens` rebuilt from its document ids, zero-padded to S)."""
    lens, positions = [], []
    for tb in tbs:
        b, s = tb.input_ids.shape
        docs = document_ids(s, tb.position_ids, tb.seq_lens)
        counts = torch.zeros(b, s, dtype=torch.long, device=docs.device)
        lens.append(counts.scatter_add_(1, docs, torch.ones_like(docs)))
        if tb.position_ids is not None:
            positions.append(tb.position_ids.long())
        else:
            positions.append(torch.arange(s, device=docs.device).expand(b, s))
    return torch.cat(lens), torch.cat(positions)


def _positions_from_lens(seq_lens: torch.Tensor, s: int) -> torch.Tensor:
    doc = document_ids(s, seq_lens=seq_lens)
    starts = torch.cumsum(seq_lens, dim=1) - seq_lens  # start offset of each document
    return torch.arange(s, device=seq_lens.device).expand_as(doc) - torch.gather(starts, 1, doc)


def block_causal_mask(
    docs: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None
) -> torch.Tensor:
    """Additive [B,1,S,S] mask from [B,S] document ids: 0 where query i may see key j (same document,
    j <= i, and within `sliding_window` when given), the dtype's minimum elsewhere."""
    allowed = attention_allowed(None, docs, sliding_window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=docs.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_attention_mask(
    config, position_ids: torch.Tensor | None, seq_lens: torch.Tensor | None, s: int, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask to hand the HF forward for a packed batch.

    Models that mix full and sliding-window layers (`config.layer_types`) get a dict with one mask
    per layer type, so the sliding layers keep their window inside each document.
    """
    docs = document_ids(s, position_ids, seq_lens)
    full = block_causal_mask(docs, dtype)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" not in layer_types:
        return full
    window = getattr(config, "sliding_window", None)
    return {"full_attention": full, "sliding_attention": block_causal_mask(docs, dtype, window)}
