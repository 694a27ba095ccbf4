"""Packed rows as pure tensor functions, one copy for the server and the trainer (docs/architecture.md, Packing).

`seq_lens` [B, max_docs] holds each row's document lengths, zero-padded, each row summing to S;
`position_ids` [B,S] restart at 0 for every document; `doc_remaining` [B,S] holds how many tokens of the
same document follow each slot. `document_ids` reads a row's documents from whichever is given;
`same_document` and `attention_allowed` are the masks built from them.
"""

from __future__ import annotations

import torch

__all__ = ["document_ids", "same_document", "attention_allowed"]


def document_ids(
    seq_len: int,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Document index [B,S] (int64) of each slot of packed rows, or None when the batch is not packed.

    From `seq_lens` [B,D] (zero-padded, rows summing to S; a binary search, no [B,S,D] tensor) when given,
    else from `position_ids` (a document starts wherever the position is not the previous one plus one),
    else from `doc_remaining` (a document ends where it is 0). On the device of the tensor it reads.
    """
    if seq_lens is not None:
        ends = seq_lens.long().cumsum(-1)  # [B, D], nondecreasing
        slots = torch.arange(seq_len, device=seq_lens.device).expand(seq_lens.shape[0], seq_len).contiguous()
        return torch.searchsorted(ends, slots, right=True)
    if position_ids is not None:
        restart = torch.ones_like(position_ids, dtype=torch.bool)
        restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        return restart.long().cumsum(-1) - 1
    if doc_remaining is not None:
        restart = torch.ones_like(doc_remaining, dtype=torch.bool)
        restart[:, 1:] = doc_remaining[:, :-1] == 0
        return restart.long().cumsum(-1) - 1
    return None


def same_document(query_docs: torch.Tensor, key_docs: torch.Tensor) -> torch.Tensor:
    """Bool [B,Q,K]: query slot q and key slot k are in the same document (ids [B,Q] and [B,K])."""
    return query_docs[:, :, None] == key_docs[:, None, :]


def attention_allowed(
    attention_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Bool [B,1,S,S]: query i may see key j iff j <= i, key j is not padding (`attention_mask` [B,S]),
    i and j are in the same document (`doc_ids` [B,S]) and, with `sliding_window` given, i - j < it.
    At least one of `attention_mask` and `doc_ids` is given (it sets B and S)."""
    ref = attention_mask if attention_mask is not None else doc_ids
    seq_len = ref.shape[1]
    idx = torch.arange(seq_len, device=ref.device)
    allowed = (idx.view(seq_len, 1) >= idx.view(1, seq_len))[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    if doc_ids is not None:
        allowed = allowed & same_document(doc_ids, doc_ids)
    if sliding_window is not None:
        allowed = allowed & ((idx.view(seq_len, 1) - idx.view(1, seq_len)) < sliding_window)[None]
    return allowed[:, None]
