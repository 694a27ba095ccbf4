"""The draft vocabulary: which target token ids the draft predicts (docs/architecture.md, token map).

Order: the special ids (bos, eos, pad, unk; deduplicated, in range), then ids by descending count
of supervised tokens (`input_ids[loss_mask]`), ties by id, then the lowest unseen ids to fill Vd.
A draft vocab as large as the target's is the identity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import InvalidArgument

__all__ = ["TokenCounter", "build_token_map", "d2t_t2d"]


class TokenCounter:
    """Counts supervised tokens over a stream of batches."""

    def __init__(self, vocab_size: int):
        self.counts = torch.zeros(vocab_size, dtype=torch.int64)

    def update(self, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> None:
        ids = input_ids[loss_mask.bool()].flatten().cpu().long()
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= len(self.counts)):
            raise InvalidArgument(f"token id outside the vocab [0, {len(self.counts)}) in the counted batch")
        self.counts += torch.bincount(ids, minlength=len(self.counts))


def build_token_map(
    counts: torch.Tensor, draft_vocab_size: int, special_ids: Iterable[int | None] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`selected_token_ids` int64 [Vd], `selected_token_mask` bool [V]) from per-id counts [V]."""
    vocab_size = len(counts)
    if draft_vocab_size < 1:
        raise InvalidArgument(f"draft_vocab_size must be >= 1, got {draft_vocab_size}")
    if draft_vocab_size >= vocab_size:
        return torch.arange(vocab_size, dtype=torch.int64), torch.ones(vocab_size, dtype=torch.bool)
    chosen: list[int] = []
    taken = torch.zeros(vocab_size, dtype=torch.bool)
    for i in special_ids:
        if (
            i is not None
            and 0 <= int(i) < vocab_size
            and not taken[int(i)]
            and len(chosen) < draft_vocab_size
        ):
            chosen.append(int(i))
            taken[int(i)] = True
    # descending count, ties by ascending id: a stable sort over ids already in ascending order
    order = torch.sort(counts.to(torch.int64), descending=True, stable=True).indices
    seen = order[(counts[order] > 0) & ~taken[order]]
    need = draft_vocab_size - len(chosen)
    picked = seen[:need].tolist()
    chosen += picked
    taken[picked] = True
    if len(chosen) < draft_vocab_size:
        chosen += (~taken).nonzero().flatten()[: draft_vocab_size - len(chosen)].tolist()
    ids = torch.tensor(chosen, dtype=torch.int64)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def d2t_t2d(selected_token_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The EAGLE-3 draft's buffers: `d2t` int64 [Vd] (target id = i + d2t[i]) and `t2d` bool [V]."""
    d2t = selected_token_ids - torch.arange(len(selected_token_ids), dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[selected_token_ids] = True
    return d2t, t2d
