"""Tensor encodings (client/encodings.py): exact codecs bit for bit, lossy ones inside their bounds."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import torch

from draftfeed.client.encodings import (
    CODECS,
    KINDS,
    Encoded,
    decode,
    encode,
    encoded_nbytes,
    fidelity,
    get_encoding,
    latent_target_probs,
    pack_encoded,
    supported_encodings,
    unpack_encoded,
)
from draftfeed.client.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[1]
needs_zstd = pytest.mark.skipif(
    importlib.util.find_spec("zstandard") is None, reason="zstandard not installed"
)
WIRE_DTYPES = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INTS = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers, so NaN payloads and -0.0 compare exactly."""
    if t.dtype.is_floating_point:
        return t.contiguous().view(
            {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        )
    return t


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert list(a.shape) == list(b.shape), (a.shape, b.shape)
    assert torch.equal(_bits(a), _bits(b))


def roundtrip(t, name, kind, **kw):
    enc = encode(t, name, kind, **kw)
    for part in enc.parts.values():
        assert part.is_contiguous() and part.dtype in WIRE_DTYPES, (name, part.dtype)
    msgpack.packb(enc.info)  # info must travel in the reply's meta
    tensors, meta = pack_encoded({"x": enc})
    back = unpack_encoded(tensors, msgpack.unpackb(msgpack.packb(meta)))["x"]
    return enc, decode(back)


def shapes_of(t: torch.Tensor):
    """The same values under adversarial layouts: as is, non-contiguous, empty batch and sequence."""
    yield t
    yield t.transpose(0, 1)  # non-contiguous
    yield t[:, ::2]  # strided
    yield t[:0]  # B = 0
    yield t[:, :0]  # S = 0


def adversarial_floats(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 13, generator=g)  # H = 13: not a multiple of 8
    info = torch.finfo(dtype)
    x[0, 0, :6] = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0])
    x[0, 1] = 0.0  # all-zero row
    x[1, 2, 0], x[1, 2, 1] = 2.5e4, 1e-3  # massive activation next to a tiny one
    x[2, 3, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    return x.to(dtype)


# ---- exact encodings ----


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES, key=str))
def test_raw_is_bit_exact_for_every_wire_dtype(dtype):
    x = adversarial_floats(torch.float32)
    t = x.clamp(-100, 100).nan_to_num(0.0).to(dtype) if dtype not in FLOATS else adversarial_floats(dtype)
    for kind in KINDS:
        for s in shapes_of(t):
            _, back = roundtrip(s, "raw", kind)
            assert_bitwise(back, s.contiguous())


@needs_zstd
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("level", [1, 3])
def test_zstd_byte_planes_are_bit_exact(dtype, level):
    t = adversarial_floats(dtype)
    for s in shapes_of(t):
        enc, back = roundtrip(s, f"zstd:{level}", "probs")
        assert enc.info["encoding"] == f"zstd:{level}" and enc.info["planes"] == t.element_size()
        assert_bitwise(back, s.contiguous())
    assert get_encoding("zstd", "hidden").name == "zstd:1"  # level 1 by default


@needs_zstd
def test_zstd_shrinks_smooth_bf16():
    t = torch.randn(64, 512).bfloat16()  # random mantissas: only the exponent planes compress
    enc, back = roundtrip(t, "zstd", "hidden")
    assert_bitwise(back, t)
    assert encoded_nbytes(enc) < 0.9 * t.numel() * 2


@pytest.mark.parametrize("dtype", (torch.bool, *INTS))
def test_bits_pack_masks_exactly(dtype):
    g = torch.Generator().manual_seed(2)
    for shape in [(3, 7, 1), (2, 5), (1, 1, 1), (4, 8), (0, 5, 1), (3, 0, 1), (13,)]:
        t = (torch.rand(shape, generator=g) > 0.5).to(dtype)
        if t.dim() >= 2:
            t = t.transpose(0, 1)
        enc, back = roundtrip(t, "bits", "mask")
        assert enc.parts["bits"].dtype == torch.uint8
        assert enc.parts["bits"].numel() == math.ceil(t.numel() / 8)
        assert_bitwise(back, t.contiguous())
    for fill in (True, False):  # all ones / all zeros
        t = torch.full((3, 11, 1), fill, dtype=torch.bool)
        assert_bitwise(roundtrip(t, "bits", "mask")[1], t)


def test_bits_refuse_non_binary_integers():
    with pytest.raises(InvalidArgument, match="0/1 values"):
        encode(torch.tensor([[0, 1, 2]]), "bits", "mask")


@pytest.mark.parametrize(
    "values, wire, based",
    [
        ([0, 1, 255], torch.uint8, False),
        ([-1, 0, 127], torch.uint8, True),
        ([1000, 1255], torch.uint8, True),
        ([-129, 5], torch.uint8, True),
        ([0, 256], torch.int16, False),
        ([0, 32767], torch.int16, False),
        ([0, 49151], torch.int16, True),  # a 49k vocab: offset into int16
        ([-5, 65530], torch.int16, True),
        ([0, 65536], torch.int32, False),
        ([-(2**31), 2**31 - 1], torch.int32, False),
        ([0, 2**32 - 1], torch.int32, True),
        ([2**63 - 2**32, 2**63 - 1], torch.int32, True),  # base near int64 max: no overflow
        ([-(2**63), -(2**63) + 200], torch.uint8, True),
        ([0, 2**32], torch.int64, False),
        ([-(2**63), 2**63 - 1], torch.int64, False),
    ],
)
def test_narrow_picks_the_smallest_integer_dtype(values, wire, based):
    t = torch.tensor(values, dtype=torch.int64).repeat(3, 1)
    t[1, 0] = t[0, 1]  # a value in between is not needed; mixed order is
    enc, back = roundtrip(t, "narrow", "ids")
    assert enc.parts["data"].dtype == wire and (enc.info["base"] is not None) == based
    assert_bitwise(back, t)


@pytest.mark.parametrize("dtype", (torch.bool, *INTS))
def test_narrow_round_trips_every_integer_dtype(dtype):
    info = torch.iinfo(dtype) if dtype != torch.bool else None
    t = (
        torch.randint(0, 2, (4, 9))
        if info is None
        else torch.randint(info.min, info.max, (4, 9), dtype=dtype)
    )
    t = t.to(dtype)
    for s in shapes_of(t.unsqueeze(-1)):
        enc, back = roundtrip(s, "narrow", "ids")
        assert enc.parts["data"].element_size() <= s.element_size()
        assert_bitwise(back, s.contiguous())


def test_narrow_refuses_floats():
    with pytest.raises(InvalidArgument, match="narrow.*integers or bool.*float32"):
        encode(torch.ones(3), "narrow", "ids")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "name, kind", [("fp8", "hidden"), ("bf16", "hidden"), ("bf16", "probs"), ("topk:5", "probs")]
)
def test_lossy_encodings_take_every_layout(dtype, name, kind):
    t = torch.rand(4, 6, 24).to(dtype)
    for s in shapes_of(t):
        enc, back = roundtrip(s, name, kind)  # parts contiguous, of wire dtypes
        assert back.dtype == dtype and list(back.shape) == list(s.shape) and not back.isnan().any()


# ---- non-finite values ----


@pytest.mark.parametrize(
    "name, kind", [("fp8", "hidden"), ("bf16", "hidden"), ("bf16", "probs"), ("topk:4", "probs")]
)
def test_lossy_encodings_refuse_nonfinite_unless_allowed(name, kind):
    t = torch.rand(2, 3, 16)
    t[0, 0, 0], t[1, 2, 5], t[1, 1, 1] = math.nan, math.inf, -math.inf
    with pytest.raises(InvalidArgument) as err:
        encode(t, name, kind)
    msg = str(err.value)
    assert f"'{kind}'" in msg and "3 NaN/inf" in msg and "allow_nonfinite=True" in msg and name in msg
    encode(t, name, kind, allow_nonfinite=True)  # explicitly allowed: no error


def test_fp8_with_allowed_nonfinite_keeps_finite_values_and_nan():
    t = torch.randn(4, 32)
    t[0, 3] = math.nan
    t[1, 4] = math.inf
    back = decode(encode(t, "fp8", "hidden", allow_nonfinite=True))
    assert back[0, 3].isnan()
    assert torch.isclose(back[1, 4], t[1].nan_to_num(posinf=0).abs().max())  # inf saturates to the row amax
    finite = t.isfinite()
    assert (back[finite] - t[finite]).abs().max() <= 0.07 * t[finite].abs().max()


def test_exact_encodings_pass_nonfinite_bit_for_bit():
    t = adversarial_floats(torch.bfloat16)
    for name in ("raw", "zstd") if importlib.util.find_spec("zstandard") else ("raw",):
        assert_bitwise(roundtrip(t, name, "hidden")[1], t)


# ---- fp8 hidden states ----


def _rel_err_per_row(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, x.shape[-1])
    return (x - y).norm(dim=-1) / x.norm(dim=-1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fp8_one_scale_per_row_and_massive_activations(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 576, generator=g) * 0.5
    x[:, 0, 17] = 2.5e4  # massive-activation channel, Llama-style, on the first token
    x[:, :, 3] = 1e-3  # tiny values in the same rows
    x[1, 5] = 0.0  # all-zero row
    x = x.to(dtype)
    enc, back = roundtrip(x, "fp8", "hidden")
    assert enc.parts["data"].dtype == torch.float8_e4m3fn and list(enc.parts["data"].shape) == [4, 16, 576]
    assert enc.parts["scale"].dtype == torch.float32 and enc.parts["scale"].numel() == 4 * 16
    assert encoded_nbytes(enc) == 4 * 16 * (576 + 4)
    assert back.dtype == dtype and not back.isnan().any()
    assert torch.equal(back[1, 5], torch.zeros(576, dtype=dtype))  # zero row stays exactly zero
    nonzero = x.float().norm(dim=-1) > 0
    rel = _rel_err_per_row(x, back).reshape(4, 16)[nonzero]
    assert rel.max() < 0.04, rel.max()
    assert (back[:, 0, 17].float() - x[:, 0, 17].float()).abs().max() <= 0.01 * 2.5e4
    fid = fidelity(x, back, "hidden")
    assert fid["max_rel_err"] == pytest.approx(rel.max().item(), rel=1e-6) and fid["min_cosine"] > 0.999


def test_fp8_on_model_activations_under_four_percent(tiny_llama):
    model, ids = tiny_llama
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for h in hs[1:]:
        back = decode(encode(h, "fp8", "hidden"))
        assert _rel_err_per_row(h, back).max() < 0.04
    heavy = torch.distributions.StudentT(3.0).sample((256, 1024))  # heavy-tailed, realistic outliers
    assert _rel_err_per_row(heavy, decode(encode(heavy.bfloat16(), "fp8", "hidden"))).max() < 0.04


def test_fp8_odd_shapes_empty_and_non_contiguous():
    x = torch.randn(5, 3, 13).transpose(0, 1)  # non-contiguous, H = 13
    assert _rel_err_per_row(x, roundtrip(x, "fp8", "hidden")[1]).max() < 0.06  # few elements per row
    for shape in [(0, 4, 16), (2, 0, 16), (2, 3, 0), (7,)]:
        t = torch.randn(shape)
        enc, back = roundtrip(t, "fp8", "hidden")
        assert list(back.shape) == list(shape) and not back.isnan().any()
    z = torch.zeros(3, 8, dtype=torch.bfloat16)
    assert torch.equal(roundtrip(z, "fp8", "hidden")[1], z)
    big = torch.full((2, 4), 3e38)  # near fp32 max: the scale must not overflow
    assert torch.allclose(roundtrip(big, "fp8", "hidden")[1], big, rtol=0.07)


# ---- probabilities: bf16 and topk ----


def _probs(rows=6, seq=9, vocab=300, temp=1.0, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, seq, vocab, generator=g) * 4 / temp, -1)


def test_bf16_probs_error_bound():
    p = _probs()
    enc, q = roundtrip(p, "bf16", "probs")
    assert q.dtype == torch.float32 and encoded_nbytes(enc) == p.numel() * 2
    assert ((q - p).abs() <= p * 2**-8).all()  # round to nearest: half a bf16 ulp
    fid = fidelity(p, q, "probs")
    assert fid["kl_max"] < 1e-4 and fid["max_mass_err"] < 2**-8 and fid["top1_agreement"] == 1.0


@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_retained_mass_and_renormalisation(k):
    p = _probs(temp=0.5)
    p[0, 0] = 0.0  # an all-zero row
    enc, q = roundtrip(p, f"topk:{k}", "probs")
    assert enc.parts["index"].dtype == torch.int16 and enc.parts["values"].dtype == torch.float16
    assert encoded_nbytes(enc) == 6 * 9 * (k * 4 + 4)
    top = p.sort(-1, descending=True).values[..., :k].sum(-1)
    expected = torch.where(p.sum(-1) > 0, top / p.sum(-1).clamp_min(1e-30), 1.0)
    assert torch.allclose(enc.parts["retained"].reshape(6, 9), expected, atol=1e-6)
    assert enc.info["retained_min"] == pytest.approx(expected.min().item(), abs=1e-6)
    assert enc.info["retained_mean"] == pytest.approx(expected.mean().item(), abs=1e-6)
    assert torch.equal(q[0, 0], torch.zeros(300))  # zero row decodes to zeros, no NaN
    sums = q.sum(-1)
    sums[0, 0] = 1.0
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    kept = q > 0
    assert torch.equal(enc.parts["index"].reshape(6, 9, k).long(), p.topk(k, -1).indices)
    assert (kept.sum(-1)[1:] <= k).all() and kept[1:].gather(-1, p[1:].topk(1, -1).indices).all()
    rescaled = torch.where(kept, p / expected.unsqueeze(-1), 0.0)
    assert torch.allclose(q[1:], rescaled[1:], rtol=2**-10, atol=1e-7)  # fp16 values, renormalised
    fid = fidelity(p[1:], q[1:], "probs")
    assert math.isfinite(fid["kl_max"]) and fid["retained_min"] == pytest.approx(
        expected[1:].min().item(), abs=1e-5
    )


def test_topk_index_dtype_and_k_larger_than_vocab():
    for vocab, dtype in [
        (200, torch.uint8),
        (256, torch.uint8),
        (257, torch.int16),
        (32768, torch.int16),
        (32769, torch.int32),
    ]:
        p = torch.softmax(torch.randn(2, vocab), -1)
        assert encode(p, "topk:3", "probs").parts["index"].dtype == dtype
    p = _probs(vocab=20)
    enc, q = roundtrip(p, "topk:64", "probs")
    assert enc.info["k"] == 20 and enc.info["retained_min"] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(q, p, rtol=2**-10, atol=1e-7)
    for shape in [(0, 3, 20), (2, 0, 20)]:
        assert list(roundtrip(torch.rand(shape), "topk:4", "probs")[1].shape) == list(shape)


def test_fidelity_kl_spreads_residual_mass_over_zeros():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    q = torch.tensor([[0.625, 0.375, 0.0, 0.0]])  # top-2 renormalised
    fid = fidelity(p, q, "probs")
    # q' = [0.5, 0.3, 0.1, 0.1] == p: the residual 0.2 spread over the two zeros
    assert fid["kl_max"] == pytest.approx(0.0, abs=1e-12) and fid["retained_min"] == pytest.approx(0.8)
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    expected = (
        0.5 * math.log(0.5 / (0.7 / 3)) + 0.3 * math.log(0.3 / 0.3) + 2 * 0.1 * math.log(0.1 / (0.7 / 3))
    )
    fid = fidelity(p, q, "probs")
    assert fid["kl_max"] == pytest.approx(expected) and fid["top1_agreement"] == 0.0
    assert fidelity(torch.tensor([3, 1]), torch.tensor([3, 2]), "ids") == {"agreement": 0.5, "exact": False}
    two = torch.stack([p[0], p[0]]), torch.stack([p[0], q[0]])  # rows select what counts
    assert fidelity(*two, "probs", rows=torch.tensor([True, False]))["kl_max"] == 0.0
    assert fidelity(*two, "probs", rows=torch.tensor([False, True]))["kl_max"] == pytest.approx(expected)


# ---- latent supervision ----


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.3)  # peaked distributions, not the near-uniform init
    return model, torch.randint(0, 512, (3, 24))


def _shift(t):
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def _reference_and_latent(model, ids, selected, **kw):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        ref = torch.softmax(_shift(out.logits)[..., selected].float(), -1)  # the server's reference
        h = _shift(out.hidden_states[-1])  # shifted final-norm state, zero tail
        got = latent_target_probs(h, model.lm_head.weight[selected], **kw)
    return ref, got


@pytest.mark.parametrize("chunk_rows", [1024, 5])
def test_latent_target_probs_match_the_server_reference(tiny_llama, chunk_rows):
    model, ids = tiny_llama
    selected = torch.randperm(512, generator=torch.Generator().manual_seed(5))[:200].sort().values
    ref, got = _reference_and_latent(model, ids, selected, chunk_rows=chunk_rows)
    assert got.shape == (3, 24, 200) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-5
    assert torch.allclose(got[:, -1], torch.full((3, 200), 1 / 200))  # zero tail: uniform, like the server


def test_latent_bf16_model_matches_when_the_matmul_runs_in_the_model_dtype(tiny_llama):
    model, ids = tiny_llama
    model_bf16 = type(model)(model.config).eval()
    model_bf16.load_state_dict(model.state_dict())
    model_bf16 = model_bf16.to(torch.bfloat16)
    selected = torch.arange(0, 512, 2)
    ref, got = _reference_and_latent(model_bf16, ids, selected)
    assert (got - ref).abs().max() <= 1e-5
    _, upcast = _reference_and_latent(model_bf16, ids, selected, matmul_dtype=torch.float32)
    assert (upcast - ref).abs().max() > (got - ref).abs().max()  # why the default is the model dtype


def test_latent_target_probs_with_final_logit_softcapping():
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=5.0,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits well past the cap
    ids = torch.randint(0, 384, (2, 10))
    selected = torch.arange(100, 300)
    ref, got = _reference_and_latent(model, ids, selected, final_logit_softcapping=5.0)
    assert (got - ref).abs().max() <= 1e-5
    _, uncapped = _reference_and_latent(model, ids, selected)
    assert (uncapped - ref).abs().max() > 1e-3  # the cap matters for these logits


def test_latent_with_encoded_final_hidden_state(tiny_llama):
    model, ids = tiny_llama
    selected = torch.arange(256)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    ref = torch.softmax(_shift(out.logits)[..., selected].float(), -1)
    h = _shift(out.hidden_states[-1])
    rows = model.lm_head.weight[selected].detach()
    for name, bound in [("raw", 1e-5), ("bf16", 0.02), ("fp8", 0.05)]:
        got = latent_target_probs(decode(encode(h, name, "hidden")), rows)
        fid = fidelity(ref, got, "probs")
        assert fid["max_abs_err"] <= bound, (name, fid)
    with pytest.raises(InvalidArgument, match=r"lm_head_rows.*\[Vd, 64\]"):
        latent_target_probs(h, rows[:, :32])


# ---- negotiation and plumbing ----


def test_unknown_or_unsupported_encoding_names_list_the_supported_ones():
    with pytest.raises(InvalidArgument, match=r"unknown encoding 'gzip'.*'hidden': raw, fp8, bf16"):
        get_encoding("gzip", "hidden")
    with pytest.raises(
        InvalidArgument, match=r"'fp8' is not supported for tensor kind 'probs'.*topk:K.*latent"
    ):
        get_encoding("fp8", "probs")
    with pytest.raises(InvalidArgument, match="needs its K"):
        get_encoding("topk", "probs")
    with pytest.raises(InvalidArgument, match=r"K must be an integer"):
        get_encoding("topk:0", "probs")
    with pytest.raises(InvalidArgument, match="takes no parameter"):
        get_encoding("raw:3", "ids")
    with pytest.raises(InvalidArgument, match="unknown tensor kind 'logits'"):
        get_encoding("raw", "logits")
    with pytest.raises(InvalidArgument, match="float32/float16/bfloat16.*int64"):
        encode(torch.ones(2, 3, dtype=torch.int64), "fp8", "hidden")


def test_supported_encodings_per_kind():
    sup = supported_encodings()
    assert set(sup) == set(KINDS) and all(s[0] == "raw" for s in sup.values())
    assert sup["mask"] == ["raw", "bits"] and sup["ids"] == ["raw", "narrow"]
    assert "topk:K" in sup["probs"] and "latent" in sup["probs"] and "fp8" in sup["hidden"]
    for kind, names in sup.items():
        for name in names:
            get_encoding(name.replace("[:LEVEL]", "").replace(":K", ":8"), kind)
    latent = get_encoding("latent", "probs")
    assert latent.latent and not latent.exact
    with pytest.raises(InvalidArgument, match="supervision mode"):
        latent.encode(torch.rand(2, 3))
    assert {n for n, c in CODECS.items() if c.exact} == {"raw", "bits", "narrow", "zstd"}


def test_pack_unpack_and_decode_on_a_device():
    encs = {
        "aux": encode(torch.randn(2, 3, 8), "fp8", "hidden"),
        "m": encode(torch.ones(2, 3, 1).bool(), "bits", "mask"),
    }
    tensors, meta = pack_encoded(encs)
    assert set(tensors) == {"aux.data", "aux.scale", "m.bits"}
    back = unpack_encoded(tensors, meta)
    assert torch.equal(decode(back["m"], device="cpu"), torch.ones(2, 3, 1).bool())
    del tensors["aux.scale"]
    with pytest.raises(InvalidArgument, match="aux.scale"):
        unpack_encoded(tensors, meta)
    with pytest.raises(InvalidArgument, match="no known encoding"):
        decode(Encoded({}, {"encoding": "nope"}))


def test_client_encodings_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import draftfeed.client.encodings as e\n"
        "assert not any(m.startswith('draftfeed.server') for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_encoding_bench_on_a_tiny_model(tiny_llama, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_encodings", REPO / "bench" / "encodings.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, ids = tiny_llama
    out = tmp_path / "encodings.md"
    result = bench.run_encoding_bench(model, None, ids, out, draft_vocab=256, repeats=1)
    text = out.read_text()
    assert "| aux_hidden_states | fp8 |" in text and "Llama-3.1-8B" in text
    rows = {(r["tensor"], r["encoding"]): r for r in result["rows"]}
    assert rows[("position_mask", "bits")]["fidelity"]["exact"]
    assert rows[("latent", "raw final h")]["fidelity"]["max_abs_err"] <= 1e-5
    assert rows[("aux_hidden_states", "fp8")]["bytes_per_token"] == 3 * 64 + 4  # [3H] fp8 + one fp32 scale
    projected = {r["reply"]: r["bytes_per_token"] for r in result["projected_8b"]}
    assert round(projected["raw reference (bf16 aux, fp32 probs)"] / 1000, 1) == 152.6
    assert (
        projected["latent: bf16 final h + fp8 aux"] <= 21_000
        and projected["latent: fp8 final h + fp8 aux"] <= 17_000
    )


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_encode_gives_the_same_parts_as_cpu():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(4, 33, 3 * 576, generator=g).bfloat16()
    hidden[:, 0, 5] = 2.5e4
    hidden[1, 3] = 0
    probs = torch.softmax(torch.randn(4, 33, 32000, generator=g) * 3, -1)
    cases = [
        (hidden, "fp8", "hidden"), (hidden, "bf16", "hidden"), (hidden, "raw", "hidden"),
        (probs, "bf16", "probs"), (probs, "topk:64", "probs"),
        (torch.rand(4, 33, 1, generator=g) > 0.3, "bits", "mask"),
        (torch.randint(0, 49152, (4, 33), generator=g), "narrow", "ids"),
    ]  # fmt: skip
    for t, name, kind in cases:
        cpu, gpu = encode(t, name, kind), encode(t.cuda(), name, kind)
        assert all(p.is_cuda for p in gpu.parts.values()), name
        for part, value in cpu.parts.items():
            if part == "retained":  # a sum: the reduction order differs between devices
                assert torch.allclose(gpu.parts[part].cpu(), value, atol=1e-6)
            else:
                assert_bitwise(gpu.parts[part].cpu(), value)
        assert_bitwise(decode(gpu).cpu(), decode(cpu))
        assert_bitwise(decode(cpu, device="cuda").cpu(), decode(cpu))
    h = torch.randn(64, 576, generator=g)
    rows = torch.randn(1000, 576, generator=g) * 0.05
    assert torch.allclose(
        latent_target_probs(h.cuda(), rows.cuda()).cpu(), latent_target_probs(h, rows), atol=1e-5
    )


# ---- device stage without host syncs, checks verified on the host ----


@pytest.mark.parametrize(
    "value_range, wire, base",
    [((0, 1), torch.uint8, None), ((0, 49151), torch.int16, 0), ((0, 128255), torch.int32, None),
     ((0, 4096), torch.int16, None), ((-3, 250), torch.uint8, -3)],
)  # fmt: skip
def test_narrow_takes_its_dtype_from_the_declared_range_not_the_data(value_range, wire, base):
    lo, hi = value_range
    t = torch.tensor([[lo, hi, lo], [hi, lo, lo]])
    enc, back = roundtrip(t, "narrow", "ids", value_range=value_range)
    assert enc.parts["data"].dtype == wire and enc.info["base"] == base
    assert_bitwise(back, t)
    small = torch.full((2, 3), lo)  # the same dtype whatever the values: no data-dependent choice
    assert encode(small, "narrow", "ids", value_range=value_range).parts["data"].dtype == wire


def test_narrow_refuses_values_outside_the_declared_range():
    with pytest.raises(InvalidArgument, match=r"outside its declared range \[0, 159\]"):
        encode(torch.tensor([[0, 160]]), "narrow", "ids", value_range=(0, 159))


def test_device_stage_defers_checks_and_host_stages_to_finish():
    from draftfeed.client.encodings import finish_encoded

    t = torch.rand(2, 3, 16)
    t[1, 2, 3] = math.nan
    enc = get_encoding("fp8", "hidden").encode_on_device(t)  # no error yet: nothing read on the host
    assert len(enc.checks) == 1 and enc.checks[0].values.dtype == torch.int64
    with pytest.raises(InvalidArgument, match="1 NaN/inf"):
        finish_encoded(enc)
    bits = get_encoding("bits", "mask").encode_on_device(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(InvalidArgument, match="2 other value"):
        finish_encoded(bits)
    topk = get_encoding("topk:2", "probs").encode_on_device(torch.softmax(torch.randn(3, 5), -1))
    assert topk.host_stage and "retained_min" not in topk.info
    assert 0 < finish_encoded(topk).info["retained_min"] <= 1
