"""Packed rows as pure tensor functions, one copy for the server and the trainer (docs/architecture.md, Packing).

`seq_lens` [B, max_docs] holds each row's document lengths, zero-padded, each row summing to S;
`position_ids` [B,S] restart at 0 for every document; `doc_remaining` [B,S] holds how many tokens of the
same document follow each slot. `document_ids` reads a row's documents from whichever is given;
`same_document` and `attention_allowed` are the masks built from them; `right_padded` says when a plain causal
mask is the same, and `DocumentRows` lays packed rows out one document a row so that it is.
"""

from __future__ import annotations

import torch

__all__ = ["document_ids", "same_document", "attention_allowed", "right_padded", "DocumentRows"]


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


class DocumentRows:
    """Packed rows [B,S] re-laid one document a row, right-padded, and back.

    Causal attention within each row of the new layout is the packed rows' block-causal attention: a slot
    sees the earlier slots of its own document and nothing else, so a plain causal kernel (flash) runs it
    without an additive mask over all B x S^2 pairs. Documents go to buckets by length, rounded up to
    `grain` (at most S): one [D_b, L_b] block each, so a batch of one long and many short documents does not
    pad every short one to the long one's length (the cost is about sum(L_b^2) per document instead of S^2
    per row). Places past a document's end hold copies of its last slot; they come after every real slot of
    their row, so causal attention never reads them, and `unpack_heads` drops them (no gradient reaches their
    source either). Every document must be right-padded (`attention_mask` ones, then zeros, within it; a
    padding segment of its own is a document of zeros): then its real slots see only real keys. One host
    sync per batch (the documents' lengths)."""

    grain = 128

    def __init__(self, doc_ids: torch.Tensor, grain: int | None = None):
        grain = grain or self.grain
        bsz, seq_len = doc_ids.shape
        dev = doc_ids.device
        start = torch.ones_like(doc_ids, dtype=torch.bool)
        start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        flat_start = start.reshape(-1)
        doc = flat_start.long().cumsum(0) - 1  # [B*S]: each slot's document, numbered across the batch
        first = torch.nonzero(flat_start).squeeze(1)  # [D]: each document's first flat slot
        offset = torch.arange(bsz * seq_len, device=dev) - first[doc]  # the slot's place in its document
        lengths = torch.bincount(doc, minlength=first.numel())
        by_length: dict[int, list[int]] = {}
        for j, n in enumerate(lengths.tolist()):
            by_length.setdefault(min(seq_len, -(-n // grain) * grain), []).append(j)
        blocks = sorted(by_length.items())
        order = [j for _, docs in blocks for j in docs]  # the documents block by block
        places, at = [], 0  # each document's first place in the flat layout, in `order`
        for length, docs in blocks:
            places += range(at, at + len(docs) * length, length)
            at += len(docs) * length
        # one host-to-device copy of the host-side layout: the documents' order and first places
        order_dev, places_dev = torch.tensor([order, places], dtype=torch.long).to(dev)
        base = torch.empty_like(first).scatter_(0, order_dev, places_dev)
        self.blocks: list[tuple[int, int, torch.Tensor]] = []  # (documents, length, [D_b * L_b] source slots)
        done = 0
        for length, docs in blocks:
            ids = order_dev[done : done + len(docs)]
            cols = torch.arange(length, device=dev)
            index = first[ids, None] + cols.clamp_max(lengths[ids, None] - 1)  # past the end: its last slot
            self.blocks.append((len(docs), length, index.reshape(-1)))
            done += len(docs)
        self.inverse = base[doc] + offset  # [B*S]: where each slot sits in the flat layout
        self.shape = (bsz, seq_len)

    def pack_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B,h,S,d] -> one [D_b,h,L_b,d] block per length bucket."""
        b, h, s, d = x.shape
        flat = x.transpose(1, 2).reshape(b * s, h, d)
        return [
            flat.index_select(0, index).view(n, length, h, d).transpose(1, 2)
            for n, length, index in self.blocks
        ]

    def unpack_heads(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The blocks of `pack_heads`' layout -> [B,h,S,d] (each slot from its place; the places past a
        document's end dropped)."""
        h, d = blocks[0].shape[1], blocks[0].shape[3]
        flat = torch.cat([y.transpose(1, 2).reshape(-1, h, d) for y in blocks])
        b, s = self.shape
        return flat.index_select(0, self.inverse).view(b, s, h, d).transpose(1, 2)
