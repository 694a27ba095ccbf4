"""Block-drafting math shared by DFlash and DSpark: anchors, masks, packing, slot conventions, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from draftfeed.trainer.block_drafting import (
    Blocks,
    NoValidAnchors,
    accept_lengths,
    anchor_candidates,
    block_attention_mask,
    decay_weights,
    dflash_objective,
    dflash_targets,
    document_ids,
    dspark_objective,
    dspark_targets,
    make_blocks,
    sample_anchors,
    tau_train,
)
from draftfeed.trainer.models.dspark import MarkovHead


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and does not fight the other tests for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_mask(anchors, keep, seq_len, bs, doc=None):
    b_sz, n = anchors.shape
    m = torch.zeros(b_sz, 1, n * bs, seq_len + n * bs, dtype=torch.bool)
    for b in range(b_sz):
        for i in range(n):
            a = int(anchors[b, i])
            for k in range(bs):
                q = i * bs + k
                for j in range(seq_len):
                    same_doc = doc is None or doc[b, j] == doc[b, a]
                    m[b, 0, q, j] = bool(keep[b, i]) and j < a and bool(same_doc)
                for k2 in range(bs):
                    m[b, 0, q, seq_len + i * bs + k2] = True
    return m


def naive_candidates(loss_mask, bs, algorithm, doc=None):
    b_sz, s = loss_mask.shape
    out = torch.zeros(b_sz, s, dtype=torch.bool)
    for b in range(b_sz):
        for a in range(s):
            if algorithm == "dflash":
                ok = a <= s - bs and loss_mask[b, a] == 1
                ok = ok and (doc is None or doc[b, a + bs - 1] == doc[b, a])
            else:
                ok = a <= s - 2 and loss_mask[b, a] == 1 and loss_mask[b, a + 1] == 1
                ok = ok and (doc is None or doc[b, a + 1] == doc[b, a])
            out[b, a] = bool(ok)
    return out


def packed_docs():
    # row 0: docs of 5, 7, 4 tokens; row 1: 9, 7
    seq_lens = torch.tensor([[5, 7, 4], [9, 7, 0]])
    position_ids = torch.cat([torch.cat([torch.arange(int(n)) for n in row if n]) for row in seq_lens]).view(
        2, 16
    )
    doc = document_ids(2, 16, seq_lens=seq_lens)
    return seq_lens, position_ids, doc


def test_document_ids_agree_across_sources():
    seq_lens, position_ids, doc = packed_docs()
    assert doc.tolist()[0] == [0] * 5 + [1] * 7 + [2] * 4
    assert doc.tolist()[1] == [0] * 9 + [1] * 7
    assert torch.equal(document_ids(2, 16, position_ids=position_ids), doc)
    remaining = torch.zeros(2, 16, dtype=torch.long)
    for b in range(2):
        for t in range(16):
            remaining[b, t] = int((doc[b] == doc[b, t]).nonzero().max()) - t
    assert torch.equal(document_ids(2, 16, doc_remaining=remaining), doc)
    assert document_ids(2, 16) is None
    with pytest.raises(ValueError, match="sum to the sequence length"):
        document_ids(2, 16, seq_lens=torch.tensor([[5, 7], [9, 6]]))


@pytest.mark.parametrize("packed", [False, True])
def test_mask_equals_naive_reference(packed):
    g = torch.Generator().manual_seed(1)
    s, bs = 16, 3
    loss_mask = (torch.rand(2, s, generator=g) > 0.2).long()
    doc = packed_docs()[2] if packed else None
    anchors, keep = sample_anchors(anchor_candidates(loss_mask, bs, "dflash", doc), 5, g)
    keep[1, -1] = False  # force a pad block
    anchors[1, -1] = 0
    got = block_attention_mask(anchors, keep, s, bs, doc)
    assert got.shape == (2, 1, anchors.shape[1] * bs, s + anchors.shape[1] * bs)
    assert torch.equal(got, naive_mask(anchors, keep, s, bs, doc))


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
@pytest.mark.parametrize("packed", [False, True])
def test_anchor_candidates_follow_the_rules(algorithm, packed):
    g = torch.Generator().manual_seed(2)
    loss_mask = (torch.rand(2, 16, generator=g) > 0.3).long()
    doc = packed_docs()[2] if packed else None
    for bs in (1, 2, 4, 7) if algorithm == "dspark" else (2, 4, 7):
        got = anchor_candidates(loss_mask, bs, algorithm, doc)
        assert torch.equal(got, naive_candidates(loss_mask, bs, algorithm, doc)), (bs, algorithm)


def test_sample_anchors_distinct_sorted_valid_padded_and_seeded():
    cand = torch.zeros(3, 20, dtype=torch.bool)
    cand[0, [1, 4, 5, 9, 11, 17]] = True
    cand[1, [3, 8]] = True
    cand[2, 2:19] = True
    for num in (4, 50):
        anchors, keep = sample_anchors(cand, num, torch.Generator().manual_seed(0))
        n = min(num, 17)
        assert anchors.shape == keep.shape == (3, n)
        for b in range(3):
            k = int(keep[b].sum())
            assert k == min(n, int(cand[b].sum()))
            assert keep[b, :k].all() and not keep[b, k:].any()
            chosen = anchors[b, :k].tolist()
            assert chosen == sorted(set(chosen))
            assert all(cand[b, a] for a in chosen)
            assert (anchors[b, k:] == 0).all()
    a1, _ = sample_anchors(cand, 4, torch.Generator().manual_seed(7))
    a2, _ = sample_anchors(cand, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2)
    draws = {
        tuple(sample_anchors(cand, 4, torch.Generator().manual_seed(s))[0][2].tolist()) for s in range(10)
    }
    assert len(draws) > 1
    with pytest.raises(NoValidAnchors):
        sample_anchors(torch.zeros(2, 5, dtype=torch.bool), 4)


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_packed_blocks_never_cross_documents(algorithm):
    seq_lens, position_ids, doc = packed_docs()
    input_ids = torch.arange(32).view(2, 16)
    loss_mask = torch.ones(2, 16, dtype=torch.long)
    bs = 4
    for seed in range(5):
        blocks = make_blocks(
            input_ids, loss_mask, algorithm=algorithm, block_size=bs, num_anchors=16, seq_lens=seq_lens,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        for b in range(2):
            for a, kept in zip(blocks.anchors[b].tolist(), blocks.keep[b].tolist(), strict=True):
                if kept:
                    reach = bs - 1 if algorithm == "dflash" else 1
                    assert doc[b, a + reach] == doc[b, a]
        if algorithm == "dflash":
            _, m = dflash_targets(blocks, input_ids, loss_mask)
        else:
            _, _, m = dspark_targets(blocks, input_ids, loss_mask)
        shift = 0 if algorithm == "dflash" else 1
        idx = blocks.anchors[:, :, None] + torch.arange(bs) + shift
        for b, i, k in (m > 0).nonzero().tolist():
            assert doc[b, idx[b, i, k]] == doc[b, blocks.anchors[b, i]]
        # positions restart with each document: slot k of an anchor at a sits at position_ids[a] + k
        pos = blocks.block_positions().view(2, -1, bs)
        assert torch.equal(pos, position_ids.gather(1, blocks.anchors)[:, :, None] + torch.arange(bs))
        assert torch.equal(blocks.context_positions, position_ids)


def test_block_input_ids_and_unpacked_positions():
    input_ids = torch.arange(100, 120).view(1, 20)
    blocks = Blocks(
        torch.tensor([[2, 9, 0]]), torch.tensor([[True, True, False]]), 4, torch.arange(20).view(1, 20)
    )
    ids = blocks.input_ids(input_ids, mask_token_id=7).view(3, 4)
    assert ids.tolist() == [[102, 7, 7, 7], [109, 7, 7, 7], [7, 7, 7, 7]]
    assert blocks.block_positions().view(3, 4).tolist() == [[2, 3, 4, 5], [9, 10, 11, 12], [0, 1, 2, 3]]


def test_dflash_mask_has_no_prefix_product_but_dspark_does():
    input_ids = torch.arange(12).view(1, 12)
    loss_mask = torch.ones(1, 12, dtype=torch.long)
    loss_mask[0, 4] = 0
    blocks = Blocks(torch.tensor([[1]]), torch.tensor([[True]]), 5, torch.arange(12).view(1, 12))
    labels, m = dflash_targets(blocks, input_ids, loss_mask)
    assert labels[0, 0].tolist() == [1, 2, 3, 4, 5]
    assert m[0, 0].tolist() == [0, 1, 1, 0, 1]  # slot 0 unsupervised; the hole at x_4 only
    labels, prev, e = dspark_targets(blocks, input_ids, loss_mask)
    assert labels[0, 0].tolist() == [2, 3, 4, 5, 6]
    assert prev[0, 0].tolist() == [1, 2, 3, 4, 5]
    assert e[0, 0].tolist() == [1, 1, 0, 0, 0]  # cumprod stops at the hole
    # past the end of the row
    blocks = Blocks(torch.tensor([[9]]), torch.tensor([[True]]), 4, torch.arange(12).view(1, 12))
    assert dflash_targets(blocks, input_ids, torch.ones(1, 12))[1][0, 0].tolist() == [0, 1, 1, 0]
    assert dspark_targets(blocks, input_ids, torch.ones(1, 12))[2][0, 0].tolist() == [1, 1, 0, 0]


def test_decay_weights_first_supervised_slot_is_one():
    w = decay_weights(5, 7.0, 1)
    assert w[1].item() == 1.0 and math.isclose(w[2].item(), math.exp(-1 / 7), rel_tol=1e-6)
    w = decay_weights(5, 4.0, 0)
    assert w[0].item() == 1.0 and math.isclose(w[3].item(), math.exp(-3 / 4), rel_tol=1e-6)
    assert torch.equal(decay_weights(5, None, 0), torch.ones(5))


def one_hot_rows(tokens: torch.Tensor, vocab: int, scale: float = 30.0) -> torch.Tensor:
    return F.one_hot(tokens, vocab).float() * scale


def test_slot_conventions_dflash_x_a_plus_k_dspark_x_a_plus_k_plus_1():
    vocab, s, bs = 16, 14, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randperm(vocab, generator=g)[:s].view(1, s)  # distinct tokens: every shift is distinguishable
    loss_mask = torch.ones(1, s, dtype=torch.long)
    eye = torch.eye(vocab)  # lm_head = identity, H = V: hidden one-hot on v -> argmax v
    anchors = torch.tensor([[0, 3, 8]])
    blocks = Blocks(anchors, torch.ones(1, 3, dtype=torch.bool), bs, torch.arange(s).view(1, s))
    idx = anchors[:, :, None] + torch.arange(bs)

    # DFlash: a draft whose slot k outputs x_{a+k} is perfect; one outputting x_{a+k+1} is always wrong
    labels, m = dflash_targets(blocks, x, loss_mask)
    sel = m > 0
    for shift, perfect in ((0, True), (1, False)):
        hidden = one_hot_rows(x[0][(idx + shift).clamp(max=s - 1)], vocab)
        ce, hit = dflash_objective(hidden[sel], labels[sel], eye, chunk_rows=5)
        assert bool(hit.all()) is perfect and bool(hit.any()) is perfect
        assert (ce.max() < 1e-6) if perfect else (ce.min() > 20)
        hits = torch.zeros_like(m)
        hits[sel] = hit.float()
        assert accept_lengths(hits, blocks.keep).tolist() == [[bs if perfect else 1] * 3]

    # DSpark: slot k outputs x_{a+k+1}; the teacher at a+k (a final-norm state predicting x_{a+k+1})
    teacher_all = one_hot_rows(torch.cat([x[0, 1:], x[0, :1]]), vocab)  # row t predicts x_{t+1}
    labels, prev, e = dspark_targets(blocks, x, loss_mask)
    sel = e > 0
    teacher = teacher_all[idx[sel]]
    for shift, perfect in ((1, True), (0, False)):
        hidden = one_hot_rows(x[0][(idx + shift).clamp(max=s - 1)], vocab)
        ce, tv, hit = dspark_objective(hidden[sel], prev[sel], labels[sel], teacher, eye, chunk_rows=4)
        assert bool(hit.all()) is perfect and bool(hit.any()) is perfect
        if perfect:
            assert ce.max() < 1e-6 and tv.max() < 1e-6
        else:
            assert ce.min() > 20 and tv.min() > 1.99
        c_star = torch.zeros_like(e)
        c_star[sel] = (1 - tv / 2).clamp(0, 1)
        tau, valid = tau_train(c_star, e, blocks.keep)
        assert valid.all()
        assert torch.allclose(tau, torch.full((1, 3), bs + 1.0 if perfect else 1.0), atol=1e-5)


def reference_dspark_rows(hidden, prev, labels, teacher, weight, markov, cap):
    z = hidden @ weight.T
    zt = teacher @ weight.T
    if cap is not None:
        z, zt = torch.tanh(z / cap) * cap, torch.tanh(zt / cap) * cap
    if markov is not None:
        z = z + markov(prev)
    logp = torch.log_softmax(z, -1)
    p_t = torch.softmax(zt, -1).detach()
    return F.nll_loss(logp, labels, reduction="none"), (logp.exp() - p_t).abs().sum(-1)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_chunked_teacher_tv_and_ce_equal_unchunked(cap):
    torch.manual_seed(0)
    rows, h, v = 37, 12, 50
    weight = torch.randn(v, h)
    markov = MarkovHead(v, 6)
    hidden = torch.randn(rows, h, requires_grad=True)
    teacher = torch.randn(rows, h) * 2
    prev, labels = torch.randint(0, v, (rows,)), torch.randint(0, v, (rows,))
    w = torch.rand(rows)

    ce, tv, _ = dspark_objective(
        hidden, prev, labels, teacher, weight, markov_head=markov, final_logit_softcapping=cap, chunk_rows=8
    )
    (w * (0.1 * ce + 0.9 * tv)).sum().backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in markov.parameters()]
    hidden.grad = None
    markov.zero_grad()

    ce_ref, tv_ref = reference_dspark_rows(hidden, prev, labels, teacher, weight, markov, cap)
    (w * (0.1 * ce_ref + 0.9 * tv_ref)).sum().backward()
    refs = [hidden.grad] + [p.grad for p in markov.parameters()]
    assert torch.allclose(ce, ce_ref, atol=1e-5) and torch.allclose(tv, tv_ref, atol=1e-5)
    for got, ref in zip(grads, refs, strict=True):
        assert torch.allclose(got, ref, atol=1e-5)

    # DFlash CE: chunked == one shot
    hidden.grad = None
    ce_d, _ = dflash_objective(hidden, labels, weight, chunk_rows=5)
    ce_d.sum().backward()
    g_chunk = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy(hidden @ weight.T, labels, reduction="none")
    ref.sum().backward()
    assert torch.allclose(ce_d, ref, atol=1e-5) and torch.allclose(g_chunk, hidden.grad, atol=1e-5)


class LargestVocabTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows of any [rows, V] tensor an op produces (forward and backward)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("algorithm", ["dflash", "dspark"])
def test_full_vocab_logits_exist_for_one_chunk_of_rows_at_a_time(algorithm):
    """Forward and backward of the block losses build [rows, V] tensors (logits, softmax, their grads)
    for at most `chunk_rows` rows at once; without chunking they span every row (the check can fail)."""
    torch.manual_seed(0)
    rows, h, v, chunk = 64, 8, 211, 8
    weight = torch.randn(v, h)
    markov = MarkovHead(v, 4)
    hidden = torch.randn(rows, h, requires_grad=True)
    teacher, prev, labels = torch.randn(rows, h), torch.randint(0, v, (rows,)), torch.randint(0, v, (rows,))

    def run(chunk_rows):
        with LargestVocabTensor(v) as seen:
            if algorithm == "dspark":
                ce, tv, _ = dspark_objective(
                    hidden, prev, labels, teacher, weight, markov_head=markov, final_logit_softcapping=5.0,
                    chunk_rows=chunk_rows,
                )  # fmt: skip
                (0.1 * ce + 0.9 * tv).sum().backward()
            else:
                dflash_objective(hidden, labels, weight, chunk_rows=chunk_rows)[0].sum().backward()
        return seen.rows

    assert run(chunk) == chunk
    assert run(rows) == rows  # one chunk of every row: the recorder sees the full logits
