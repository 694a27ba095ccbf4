"""One copy of each formula the client, the server and the trainer share (issue 18, item 2).

Each shared implementation is compared, bit for bit in fp32 on random inputs, with a straightforward
inline reference written as the copies it replaced computed it; and the old call sites are shown to
use the shared one (the same function object, not a copy).
"""

from __future__ import annotations

import math

import pytest
import torch

from draftfeed.client import dtypes, packing, supervision

# ---------------------------------------------------------------- references (the replaced copies' math)


def ref_shift_left(t):
    return torch.cat((t[:, 1:], torch.zeros_like(t[:, :1])), dim=1)


def ref_project(shifted_logits, shifted_loss_mask, ids, mask):
    top = shifted_logits.argmax(dim=-1)
    pmask = (mask[top] & shifted_loss_mask.bool()).unsqueeze(-1)
    return torch.softmax(shifted_logits[..., ids].float(), dim=-1), pmask


def ref_document_ids_from_lens(seq_lens, s):
    ends = torch.cumsum(seq_lens.long(), 1)
    return (torch.arange(s).view(1, s, 1) >= ends.unsqueeze(1)).sum(-1)


def ref_document_ids_from_positions(position_ids):
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return torch.cat([torch.zeros(position_ids.shape[0], 1, dtype=torch.long), starts.long().cumsum(-1)], -1)


def ref_allowed(attention_mask, docs, window=None):
    s = (attention_mask if attention_mask is not None else docs).shape[1]
    b = (attention_mask if attention_mask is not None else docs).shape[0]
    out = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                ok = j <= i
                if attention_mask is not None:
                    ok = ok and bool(attention_mask[r, j])
                if docs is not None:
                    ok = ok and bool(docs[r, i] == docs[r, j])
                if window is not None:
                    ok = ok and i - j < window
                out[r, 0, i, j] = ok
    return out


def ref_llama3_inv_freq(head_dim, theta, scaling):
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _mapping(v=50, vd=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(v, generator=g)[:vd].sort().values
    mask = torch.zeros(v, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


def _packed(b=3, s=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        left, d = s, 0
        while left:
            n = int(torch.randint(1, left + 1, (1,), generator=g))
            lens[r, d], left, d = n, left - n, d + 1
    pos = torch.cat([torch.cat([torch.arange(int(n)) for n in row if n]) for row in lens]).view(b, s)
    return lens, pos


# ---------------------------------------------------------------- supervision


def test_shift_left_and_projection_equal_the_reference_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    ids, mask = _mapping()
    logits = torch.randn(2, 9, 50, generator=g)
    logits[0, 3] = 0  # a tie row: argmax id 0
    loss_mask = torch.randint(0, 2, (2, 9), generator=g)
    assert torch.equal(supervision.shift_left(logits), ref_shift_left(logits))
    probs, pmask = supervision.project_supervision(
        ref_shift_left(logits), ref_shift_left(loss_mask), ids, mask
    )
    rp, rm = ref_project(ref_shift_left(logits), ref_shift_left(loss_mask), ids, mask)
    assert probs.dtype == torch.float32 and torch.equal(probs, rp) and torch.equal(pmask, rm)
    # the unshifted route the server takes gives the shifted reference, tail row included
    probs, pmask = supervision.draft_supervision(logits, loss_mask, ids, mask)
    assert torch.equal(probs, rp) and torch.equal(pmask, rm)
    assert torch.equal(supervision.draft_position_mask(logits, loss_mask, mask), rm)
    # the trainer's full-vocab route and its projected route
    p, m = supervision.target_distribution(logits, loss_mask)
    assert torch.equal(p, torch.softmax(logits.float(), -1)) and torch.equal(m, loss_mask.bool())
    p, m = supervision.target_distribution(logits, loss_mask, ids, mask)
    rp, rm = ref_project(logits, loss_mask, ids, mask)
    assert torch.equal(p, rp) and torch.equal(m, rm.squeeze(-1))


def test_latent_probs_use_the_shared_softmax():
    from draftfeed.client.encodings import latent_target_probs

    g = torch.Generator().manual_seed(2)
    ids, _ = _mapping()
    head = torch.randn(50, 8, generator=g)
    h = torch.randn(2, 5, 8, generator=g)
    logits = torch.nn.functional.linear(h.reshape(-1, 8), head[ids]).reshape(2, 5, -1)
    expected = torch.softmax(logits.float(), dim=-1)
    assert torch.equal(latent_target_probs(h, head[ids]), expected)
    assert torch.equal(supervision.draft_probs(logits), expected)
    out = torch.empty_like(expected)
    assert supervision.draft_probs(logits, out=out) is out and torch.equal(out, expected)
    rows = h.reshape(-1, 8)  # in chunks of 3 rows (each its own matmul), each written in place
    chunked = torch.cat([torch.softmax(torch.nn.functional.linear(rows[i : i + 3], head[ids]).float(), -1)
                         for i in range(0, 10, 3)]).reshape(2, 5, -1)  # fmt: skip
    assert torch.equal(latent_target_probs(h, head[ids], chunk_rows=3), chunked)


def test_old_supervision_call_sites_use_the_shared_functions():
    from draftfeed import target
    from draftfeed.target.algorithms import eagle3 as served_eagle3
    from draftfeed.trainer import losses
    from draftfeed.trainer.models import eagle3

    assert target.shift_left is supervision.shift_left
    assert target.project_supervision is supervision.project_supervision
    assert served_eagle3.shift_left is supervision.shift_left
    assert served_eagle3.draft_supervision is supervision.draft_supervision
    assert eagle3.shift_left is supervision.shift_left
    assert losses.target_distribution is supervision.target_distribution


# ---------------------------------------------------------------- packing


def test_document_ids_equal_the_references():
    lens, pos = _packed()
    s = pos.shape[1]
    expected = ref_document_ids_from_lens(lens, s)
    assert torch.equal(packing.document_ids(s, seq_lens=lens), expected)
    assert torch.equal(ref_document_ids_from_positions(pos), expected)
    assert torch.equal(packing.document_ids(s, position_ids=pos), expected)
    remaining = torch.zeros_like(pos)
    for r in range(pos.shape[0]):
        for t in range(s):
            remaining[r, t] = int(((expected[r] == expected[r, t]) & (torch.arange(s) > t)).sum())
    assert torch.equal(packing.document_ids(s, doc_remaining=remaining), expected)
    assert packing.document_ids(s) is None


def test_masks_equal_the_reference():
    lens, pos = _packed(seed=3)
    s = pos.shape[1]
    docs = packing.document_ids(s, seq_lens=lens)
    am = torch.ones_like(pos)
    am[0, :2] = 0
    assert torch.equal(packing.attention_allowed(am, docs), ref_allowed(am, docs))
    assert torch.equal(packing.attention_allowed(am), ref_allowed(am, None))
    assert torch.equal(packing.attention_allowed(None, docs, 3), ref_allowed(None, docs, 3))
    anchors = torch.tensor([[0, 5], [2, 9], [1, 16]])
    anchor_docs = docs.gather(1, anchors)
    assert torch.equal(packing.same_document(anchor_docs, docs), docs[:, None, :] == anchor_docs[:, :, None])


def test_old_packing_call_sites_use_the_shared_functions():
    from draftfeed.target import packing as target_packing
    from draftfeed.target.packing import block_causal_mask, packed_attention_mask
    from draftfeed.trainer import block_drafting
    from draftfeed.trainer.models import common, eagle3

    assert common.document_ids is packing.document_ids
    assert eagle3.attention_allowed is packing.attention_allowed
    assert target_packing.document_ids is packing.document_ids
    assert block_drafting.packed_document_ids is packing.document_ids
    lens, pos = _packed(seed=4)
    s = pos.shape[1]
    docs = packing.document_ids(s, seq_lens=lens)
    assert torch.equal(block_drafting.document_ids(3, s, seq_lens=lens), docs)
    additive = block_causal_mask(docs, torch.float32)
    assert torch.equal(additive == 0, ref_allowed(None, docs))
    assert torch.equal(packed_attention_mask(object(), pos, None, s, torch.float32), additive)


# ---------------------------------------------------------------- RoPE


def test_rope_through_hf_equals_the_former_formulas():
    from draftfeed.trainer.models.common import rope_init, rope_inv_freq

    d, theta = 16, 500000.0
    default = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    assert torch.equal(rope_inv_freq(d, theta), default)
    assert torch.equal(rope_inv_freq(d, theta, {"rope_type": "linear", "factor": 4.0}), default / 4.0)
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    llama3["original_max_position_embeddings"] = 64
    assert torch.equal(rope_inv_freq(d, theta, llama3), ref_llama3_inv_freq(d, theta, llama3))
    inv, scale = rope_init(d, {"rope_type": "default", "rope_theta": theta})
    assert torch.equal(inv, default) and scale == 1.0
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(d, theta, {"rope_type": "yarn", "factor": 2.0})


def test_rope_init_is_hf_own_function_for_every_scaled_type():
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from draftfeed.trainer.models.common import rope_init

    params = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf = Qwen3Config(
        hidden_size=32,
        num_attention_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        rope_parameters=dict(params),
    )
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS["yarn"](hf, None)
    inv, scale = rope_init(8, params, hidden_size=32, num_attention_heads=4, max_position_embeddings=256)
    assert torch.equal(inv, inv_hf.float()) and scale == float(scale_hf)


# ---------------------------------------------------------------- dtype names


def test_dtype_names_have_one_table():
    from draftfeed.client import wire
    from draftfeed.client.errors import InvalidArgument

    assert wire.DTYPES is dtypes.DTYPES
    assert wire.dtype_name is dtypes.wire_dtype_name and wire.dtype_from_name is dtypes.wire_dtype
    for name, dtype in dtypes.DTYPES.items():
        assert dtypes.dtype_name(dtype) == name and dtypes.torch_dtype(name) is dtype
    assert dtypes.dtype_name(torch.complex64) == "complex64"
    with pytest.raises(InvalidArgument, match="not a torch dtype"):
        dtypes.torch_dtype("nope")
    with pytest.raises(InvalidArgument, match="cannot go on the wire"):
        dtypes.wire_dtype_name(torch.complex64)
    for name in dtypes.MODEL_DTYPE_NAMES:
        assert dtypes.float_dtype(name).is_floating_point
    assert dtypes.float_dtype(None) == "auto" and dtypes.float_dtype("half") is torch.float16
    with pytest.raises(InvalidArgument, match="floating-point"):
        dtypes.float_dtype("int8")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("float32", torch.float32),
        ("fp32", torch.float32),
    ],
)
def test_eval_dtype_names_the_dtype_asked_for(spec, expected):
    """`draftfeed eval --dtype float16` (or bf16, fp16) used to load the target in fp32."""
    from draftfeed.trainer.evaluate import eval_dtype

    assert eval_dtype(spec, torch.device("cpu")) is expected


def test_eval_dtype_auto():
    from draftfeed.trainer.evaluate import eval_dtype

    assert eval_dtype("auto", torch.device("cpu")) is torch.float32
    assert eval_dtype("auto", torch.device("cuda")) is torch.bfloat16
