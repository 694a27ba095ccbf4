"""A packed row gives, for each document, what running that document alone gives."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.packing import document_ids
from draftfeed.target.backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from draftfeed.target.packing import block_causal_mask, check_packing

LENS = [[5, 9, 4], [10, 8, 0]]  # two rows of S=18, zero-padded
S = 18


def packed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 150, (2, S), generator=g)
    seq_lens = torch.tensor(LENS)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row if n]) for row in LENS]).view(2, S)
    remaining = torch.cat([torch.cat([torch.arange(n - 1, -1, -1) for n in row if n]) for row in LENS]).view(
        2, S
    )
    loss = (torch.rand(2, S, generator=g) > 0.3).long()
    return ids, torch.ones(2, S, dtype=torch.long), loss, pos, seq_lens, remaining


def docs(seq_lens):
    for r, row in enumerate(seq_lens.tolist()):
        start = 0
        for n in row:
            if n:
                yield r, start, n
            start += n


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_documents_alone(tiny_model, family):
    model = tiny_model(family)
    ids, attn, loss, pos, seq_lens, rem = packed_inputs()
    eagle = HFEagle3TargetModel(model)
    dflash = HFDFlashTargetModel(model, capture_logits=True)
    dspark = HFDSparkTargetModel(model, [0, 3, 6])
    projected = HFEagle3TargetModel(model)  # draft-vocab supervision: target_probs + position_mask
    sel = torch.arange(0, model.get_output_embeddings().weight.shape[0], 3)
    mask = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    mask[sel] = True
    projected.set_vocab_mapping(sel, mask)
    pe = eagle.generate_batch(ids, attn, loss, pos, seq_lens, rem)
    pp = projected.generate_batch(ids, attn, loss, pos, seq_lens, rem)
    pf = dflash.generate_batch(ids, attn, loss, pos, seq_lens, rem)
    ps = dspark.generate_batch(ids, attn, loss, pos, seq_lens, rem)
    for name in ("position_ids", "seq_lens", "doc_remaining"):  # packing metadata is returned unshifted
        for b in (pe, pp, pf, ps):
            assert torch.equal(
                getattr(b, name), {"position_ids": pos, "seq_lens": seq_lens, "doc_remaining": rem}[name]
            )
    for r, a, n in docs(seq_lens):
        sl = slice(a, a + n)
        args = tuple(t[r : r + 1, sl] for t in (ids, attn, loss))
        ae, af, as_ = eagle.generate_batch(*args), dflash.generate_batch(*args), dspark.generate_batch(*args)
        ap = projected.generate_batch(*args)
        torch.testing.assert_close(
            pe.aux_hidden_states[r : r + 1, sl], ae.aux_hidden_states, atol=1e-5, rtol=0
        )
        # shifted fields: inside the document, position t carries token t+1 of the same document
        torch.testing.assert_close(
            pe.logits[r : r + 1, a : a + n - 1], ae.logits[:, : n - 1], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            pp.target_probs[r : r + 1, a : a + n - 1], ap.target_probs[:, : n - 1], atol=1e-5, rtol=0
        )
        assert torch.equal(pp.position_mask[r : r + 1, a : a + n - 1], ap.position_mask[:, : n - 1])
        assert torch.equal(pp.aux_hidden_states, pe.aux_hidden_states)
        torch.testing.assert_close(pf.hidden_states[r : r + 1, sl], af.hidden_states, atol=1e-5, rtol=0)
        torch.testing.assert_close(pf.logits[r : r + 1, sl], af.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ps.target_hidden_states[r : r + 1, sl], as_.target_hidden_states, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            ps.target_last_hidden_states[r : r + 1, sl], as_.target_last_hidden_states, atol=1e-5, rtol=0
        )


def test_block_causal_mask_is_exact():
    seq_lens = torch.tensor([[2, 3]])
    m = block_causal_mask(document_ids(5, seq_lens=seq_lens), torch.float32)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert m.min() == torch.finfo(torch.float32).min


def test_bad_packing_metadata():
    ids, _, _, pos, seq_lens, rem = packed_inputs()
    with pytest.raises(InvalidArgument, match="seq_lens row 0 sums to 17"):
        check_packing(ids, pos, torch.tensor([[5, 8, 4], [10, 8, 0]]), rem)
    with pytest.raises(InvalidArgument, match="do not restart at 0"):
        check_packing(ids, torch.arange(S).expand(2, S), seq_lens, rem)
    with pytest.raises(InvalidArgument, match="position_ids has shape"):
        check_packing(ids, pos[:, :4], seq_lens, rem)


def test_packing_metadata_is_validated_completely_before_a_batch():
    """Issue 16.1/16.6: every value a batch builds from is checked on the host, alone or in any subset."""
    ids, _, _, pos, seq_lens, rem = packed_inputs()
    for subset in ((pos, None, None), (None, seq_lens, None), (pos, seq_lens, rem), (None, seq_lens, rem)):
        check_packing(ids, *subset)
    cases = [
        ((pos + 1, None, None), "position_ids must start each row at 0"),
        ((pos * 2, None, None), "outside \\[0, S=18\\)"),
        ((torch.full_like(pos, -1), None, None), "outside \\[0, S=18\\)"),
        ((None, None, rem), "doc_remaining was given without"),
        ((pos, None, rem + S), "doc_remaining holds a value outside \\[0, S=18\\]"),
        ((None, torch.tensor([[S + 4, -4], [S, 0]]), None), "outside \\[0, S=18\\]"),
        ((None, torch.zeros(2, 0, dtype=torch.long), None), "between 1 and 18 documents"),
        # 1M document slots for a row of 18 tokens: refused before any [B,S,D] or mask is built
        ((None, torch.zeros(2, 1 << 20, dtype=torch.int16), None), "1048576 document slots per row"),
        # lengths that wrap around int64 to sum to S
        ((None, torch.tensor([[2**62] * 4 + [S], [S, 0, 0, 0, 0]]), None), "outside \\[0, S=18\\]"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            check_packing(ids, *args)


def test_document_ids_need_no_batch_by_documents_tensor():
    """A [B,S] binary search: the same ids as comparing every position with every document end."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(0, 5, (3, 40), generator=g)
    lens[:, -1] = 0
    s = int(lens.sum(1).max())
    lens[:, -1] = s - lens.sum(1)
    ends = torch.cumsum(lens, 1)
    naive = (torch.arange(s).view(1, s, 1) >= ends.unsqueeze(1)).sum(-1)
    assert torch.equal(document_ids(s, seq_lens=lens), naive)
