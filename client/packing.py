"""Packed rows as pure tensor functions, one copy for the server and the trainer (docs/architecture.md, Packing).

`seq_lens` [B, max_docs] holds each row's document lengths, zero-padded, each row summing to S;
`position_ids` [B,S] restart at 0 for every document; `doc_remaining` [B,S] holds how many tokens of the
same document follow each slot. `document_ids` reads a row's documents from whichever is given;
`same_document` and `attention_allowed` are the masks built from them; `right_padded` says when a plain causal
mask is the same, and `DocumentSpans` cuts packed rows into documents for a variable-length kernel.
"""

from __future__ import annotations

import torch

__all__ = ["document_ids", "same_document", "attention_allowed", "right_padded", "DocumentSpans"]


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


def right_padded(attention_mask: torch.Tensor, doc_ids: torch.Tensor | None = None) -> bool:
    """Every row of `attention_mask` [B,S] (with `doc_ids`, every document) is ones, then zeros: its real
    slots see only real keys under a plain causal mask. One host sync."""
    m = attention_mask.bool()
    ok = m[:, 1:] <= m[:, :-1]
    if doc_ids is not None:
        ok = ok | (doc_ids[:, 1:] != doc_ids[:, :-1])
    return bool(ok.all())


class DocumentSpans:
    """Packed rows [B,S] as one flat sequence of B*S slots cut into its documents: the layout of flash
    attention's variable-length kernel, which runs each document plainly causal with no mask, no padding and
    no work across documents (about sum(L^2) per document instead of S^2 per row).

    `cu_seqlens` [D+1] int32 holds each document's first flat slot, then B*S; `max_len` is the longest
    document. A row's start always starts a document. Every document must be right-padded (`attention_mask`
    ones, then zeros, within it; a padding segment of its own is a document of zeros): then its real slots see
    only real keys. One host sync per batch (the longest document)."""

    def __init__(self, doc_ids: torch.Tensor):
        bsz, seq_len = doc_ids.shape
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        flat = start.reshape(-1)
        flat_len = torch.full((1,), bsz * seq_len, dtype=torch.long, device=doc_ids.device)
        self.cu_seqlens = torch.cat((torch.nonzero(flat).squeeze(1), flat_len)).to(torch.int32)
        self.max_len = int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())
        self.shape = (bsz, seq_len)

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        """[B,h,S,d] -> [B*S,h,d] (the kernel's layout; a view where the memory already is)."""
        b, h, s, d = x.shape
        return x.transpose(1, 2).reshape(b * s, h, d)

    def unflat(self, y: torch.Tensor) -> torch.Tensor:
        """[B*S,h,d] -> [B,h,S,d] (a view)."""
        b, s = self.shape
        return y.view(b, s, y.shape[1], y.shape[2]).transpose(1, 2)

    def flat_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """Log-normalisers [B,h,S] -> the kernel's [h, B*S]."""
        b, h, s = lse.shape
        return lse.transpose(0, 1).reshape(h, b * s)

    def unflat_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """The kernel's [h, B*S] -> [B,h,S] (a view)."""
        b, s = self.shape
        return lse.view(lse.shape[0], b, s).transpose(0, 1)
