"""The draft-vocab token map: special ids first, frequency order (ties by id), backfill, identity."""

from __future__ import annotations

import torch

from draftfeed.client.vocab import TokenCounter, build_token_map, d2t_t2d


def test_order_special_then_frequency_then_backfill():
    counter = TokenCounter(20)
    ids = torch.tensor([[5, 5, 5, 7, 7, 9, 9, 3, 12, 12]])
    loss = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])  # 12 is not supervised
    counter.update(ids, loss)
    sel, mask = build_token_map(counter.counts, 8, special_ids=[1, 2, 2, None, 99])
    # specials (deduped, in range) | 5 (x3) | 7, 9 (x2, ties by id) | 3 | lowest unseen: 0, 4
    assert sel.tolist() == [1, 2, 5, 7, 9, 3, 0, 4]
    assert sel.dtype == torch.int64 and mask.dtype == torch.bool and mask.shape == (20,)
    assert mask.nonzero().flatten().tolist() == sorted(sel.tolist())


def test_special_already_frequent_is_not_repeated():
    counts = torch.zeros(10, dtype=torch.int64)
    counts[[2, 4]] = torch.tensor([10, 3])
    sel, _ = build_token_map(counts, 4, special_ids=[2])
    assert sel.tolist() == [2, 4, 0, 1]


def test_identity_when_draft_vocab_covers_target():
    counts = torch.randint(0, 5, (30,))
    for vd in (30, 64):
        sel, mask = build_token_map(counts, vd, special_ids=[3])
        assert sel.tolist() == list(range(30)) and bool(mask.all())


def test_d2t_t2d():
    sel = torch.tensor([4, 0, 7])
    d2t, t2d = d2t_t2d(sel, 10)
    assert (torch.arange(3) + d2t).tolist() == [4, 0, 7]
    assert t2d.nonzero().flatten().tolist() == [0, 4, 7]
