"""EAGLE-3 draft math (trainer/models/eagle3.py) and its loss (trainer/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from draftfeed.client.batches import Eagle3TargetBatch
from draftfeed.trainer.losses import (
    eagle3_batch_loss,
    eagle3_ttt_loss,
    soft_cross_entropy,
    target_distribution,
)
from draftfeed.trainer.models.eagle3 import (
    Eagle3DraftConfig,
    Eagle3DraftModel,
    document_ids,
    rope_inv_freq,
    shift_left,
)

V, H = 40, 16


def tiny_target_config(**kw) -> tf.LlamaConfig:
    args = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=1000.0,
    )
    args.update(kw)
    return tf.LlamaConfig(**args)


def tiny_draft(vd: int = V, dtype=torch.float64, seed: int = 0, **overrides) -> Eagle3DraftModel:
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig.from_target_config(tiny_target_config(), draft_vocab_size=vd, **overrides)
    model = Eagle3DraftModel(cfg, embed_weight=torch.randn(V, H)).to(dtype)
    # random norm weights so the reference below would notice a norm applied to the wrong input
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def random_inputs(b: int, s: int, vd: int = V, seed: int = 1, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(b, s, vd, generator=g, dtype=dtype), -1)
    loss_mask = (torch.rand(b, s, generator=g) < 0.8).long()
    return {
        "hidden_states": torch.randn(b, s, 3 * H, generator=g, dtype=dtype),
        "input_ids": torch.randint(0, V, (b, s), generator=g),
        "attention_mask": torch.ones(b, s, dtype=torch.long),
        "loss_mask": loss_mask,
        "target_probs": probs,
        "position_mask": (loss_mask.bool() & (torch.rand(b, s, generator=g) < 0.9)).unsqueeze(-1),
    }


# ---------------------------------------------------------------- shapes, config, rope


def test_shapes_and_export_names():
    model = tiny_draft(vd=24)
    x = random_inputs(2, 9, vd=24)
    logits = model(x["hidden_states"], x["input_ids"], x["attention_mask"], ttt_steps=3)
    assert len(logits) == 3 and all(t.shape == (2, 9, 24) for t in logits)
    assert not model.embed_tokens.weight.requires_grad
    assert model.d2t.dtype == torch.int64 and model.d2t.shape == (24,)
    assert model.t2d.dtype == torch.bool and model.t2d.shape == (V,)
    assert set(model.state_dict()) == {
        "embed_tokens.weight",
        "fc.weight",
        "midlayer.input_layernorm.weight",
        "midlayer.hidden_norm.weight",
        "midlayer.post_attention_layernorm.weight",
        "midlayer.self_attn.q_proj.weight",
        "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight",
        "midlayer.self_attn.o_proj.weight",
        "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight",
        "midlayer.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
        "d2t",
        "t2d",
    }
    assert model.fc.weight.shape == (H, 3 * H)
    assert model.midlayer.self_attn.q_proj.weight.shape == (4 * 4, 2 * H)
    assert model.midlayer.self_attn.k_proj.weight.shape == (2 * 4, 2 * H)


def test_config_from_target_and_rope_matches_transformers():
    for cfg in (
        tiny_target_config(),
        tiny_target_config(
            max_position_embeddings=1024,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        tiny_target_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ):
        d = Eagle3DraftConfig.from_target_config(cfg, draft_vocab_size=20)
        assert (d.hidden_size, d.num_attention_heads, d.num_key_value_heads, d.head_dim) == (H, 4, 2, 4)
        assert (d.intermediate_size, d.vocab_size, d.draft_vocab_size) == (32, V, 20)
        rope_type = cfg.rope_parameters.get("rope_type", "default")
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg) if rope_type != "default" else (None, None)
        if expected is None:
            expected = LlamaRotaryEmbedding(cfg).inv_freq
        torch.testing.assert_close(rope_inv_freq(d.head_dim, d.rope_theta, d.rope_scaling), expected.float())
    # a nested text config (multimodal) is read through get_text_config()
    g3 = tf.Gemma3Config(
        text_config=dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=8,
        )
    )
    d = Eagle3DraftConfig.from_target_config(g3)
    assert (d.hidden_size, d.head_dim, d.vocab_size) == (H, 8, V)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        Eagle3DraftConfig.from_target_config(tiny_target_config(), draft_vocab_size=V + 1)


# ---------------------------------------------------------------- the attention pattern vs a naive reference


def naive_unroll(model: Eagle3DraftModel, x: dict, ttt_steps: int, position_ids=None) -> list[torch.Tensor]:
    """Loop-by-loop TTT forward built from transformers' Llama RMSNorm and RoPE: at step k, the query
    at slot t attends to every allowed step-0 key j (same document, j <= t, not padding) and to its own
    slot's keys of steps 1..k, one softmax over all of them."""
    cfg = model.config
    attn = model.midlayer.self_attn
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def norm(module, v):
        ref = LlamaRMSNorm(v.shape[-1], eps=cfg.rms_norm_eps).to(v.dtype)
        ref.weight.data.copy_(module.weight)
        return ref(v)

    rope = LlamaRotaryEmbedding(tiny_target_config()).to(torch.float64)
    b, s = x["input_ids"].shape
    pos = torch.arange(s).expand(b, s) if position_ids is None else position_ids
    doc = torch.zeros(b, s, dtype=torch.long) if position_ids is None else document_ids(s, position_ids)
    amask = x["attention_mask"]
    g = model.fc(x["hidden_states"])
    ids = x["input_ids"]
    keys, values, out_logits = [], [], []
    for k in range(ttt_steps):
        emb = model.embed_tokens(ids)
        inp = torch.cat((norm(model.midlayer.input_layernorm, emb), norm(model.midlayer.hidden_norm, g)), -1)
        q = attn.q_proj(inp).view(b, s, nh, hd).transpose(1, 2)
        kk = attn.k_proj(inp).view(b, s, nkv, hd).transpose(1, 2)
        vv = attn.v_proj(inp).view(b, s, nkv, hd).transpose(1, 2)
        cos, sin = rope(vv, pos + k)
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        keys.append(kk)
        values.append(vv)
        out = torch.zeros(b, nh, s, hd, dtype=q.dtype)
        for bi in range(b):
            for h in range(nh):
                kvh = h // (nh // nkv)
                for t in range(s):
                    cols, vals = [], []
                    for j in range(s):
                        if j <= t and amask[bi, j] and doc[bi, j] == doc[bi, t]:
                            cols.append(q[bi, h, t] @ keys[0][bi, kvh, j] / math.sqrt(hd))
                            vals.append(values[0][bi, kvh, j])
                    for i in range(1, k + 1):
                        cols.append(q[bi, h, t] @ keys[i][bi, kvh, t] / math.sqrt(hd))
                        vals.append(values[i][bi, kvh, t])
                    p = torch.softmax(torch.stack(cols), 0)
                    out[bi, h, t] = (p[:, None] * torch.stack(vals)).sum(0)
        h1 = g + attn.o_proj(out.transpose(1, 2).reshape(b, s, nh * hd))
        h2 = h1 + model.midlayer.mlp(norm(model.midlayer.post_attention_layernorm, h1))
        out_logits.append(model.lm_head(norm(model.norm, h2)))
        g = norm(model.norm, h2) if cfg.norm_output else h2
        ids = shift_left(ids)
    return out_logits


@pytest.mark.parametrize("norm_output", [False, True])
def test_ttt_attention_matches_naive_reference(norm_output):
    model = tiny_draft(vd=24, norm_output=norm_output)
    x = random_inputs(2, 7, vd=24)
    x["attention_mask"][1, 5:] = 0  # right padding in row 1
    with torch.no_grad():
        got = model(x["hidden_states"], x["input_ids"], x["attention_mask"], ttt_steps=3)
        ref = naive_unroll(model, x, 3)
    for k in range(3):
        torch.testing.assert_close(got[k][0], ref[k][0])
        torch.testing.assert_close(got[k][1, :5], ref[k][1, :5])  # padded query slots are unsupervised


def test_packed_attention_matches_naive_reference():
    model = tiny_draft(vd=24)
    x = random_inputs(1, 8, vd=24)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    with torch.no_grad():
        got = model(x["hidden_states"], x["input_ids"], x["attention_mask"], 3, position_ids=position_ids)
        ref = naive_unroll(model, x, 3, position_ids=position_ids)
        seq_lens = torch.tensor([[3, 4, 1]])
        by_lens = model(x["hidden_states"], x["input_ids"], x["attention_mask"], 3, seq_lens=seq_lens)
    for k in range(3):
        torch.testing.assert_close(got[k], ref[k])
        torch.testing.assert_close(by_lens[k], ref[k])


# ---------------------------------------------------------------- packing


def _docs(lengths, seed=3):
    return [random_inputs(1, n, vd=24, seed=seed + i) for i, n in enumerate(lengths)]


def _pack(docs, total: int) -> dict:
    """Lay documents end to end in one row of `total` slots (padding as a final segment)."""
    used = sum(d["input_ids"].shape[1] for d in docs)
    pad = total - used
    out = {}
    for key in ("hidden_states", "input_ids", "attention_mask", "loss_mask", "target_probs", "position_mask"):
        parts = [d[key] for d in docs]
        if pad:
            filler = torch.zeros_like(parts[0][:, :1]).expand(1, pad, *parts[0].shape[2:])
            if key == "target_probs":
                filler = torch.full_like(filler, 1.0 / filler.shape[-1])
            parts.append(filler)
        out[key] = torch.cat(parts, 1)
    lens = [d["input_ids"].shape[1] for d in docs] + ([pad] if pad else [])
    out["seq_lens"] = torch.tensor([lens])
    out["position_ids"] = torch.cat([torch.arange(n) for n in lens])[None]
    out["doc_remaining"] = torch.cat([torch.arange(n - 1, -1, -1) for n in lens])[None]
    return out


def _unshifted_tail(doc: dict) -> dict:
    """An unpacked document's last slot predicts past its end: zero id and zero masks, as the service
    shifts with a zero tail. The packed copy instead sees the next document there (gated by doc_remaining)."""
    doc = dict(doc)
    for key in ("input_ids", "loss_mask", "position_mask"):
        doc[key] = doc[key].clone()
        doc[key][:, -1] = 0
    return doc


def test_packed_loss_equals_unpacked_loss():
    model = tiny_draft(vd=24)
    raw = _docs([5, 3, 6])
    packed = _pack(raw, 16)  # a packed document's last slot holds whatever follows it, gated off
    docs = [_unshifted_tail(d) for d in raw]
    k = 4
    with torch.no_grad():
        got = eagle3_batch_loss(model, packed, ttt_steps=k)
        # padding-free reference: each document alone, per-step sums and counts added up
        sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        for d in docs:
            r = eagle3_batch_loss(model, d, ttt_steps=k)
            sums += r.step_losses * r.step_counts
            counts += r.step_counts
        assert torch.equal(got.step_counts.double(), counts)
        torch.testing.assert_close(got.step_losses, sums / counts.clamp_min(1))
        w = torch.tensor([0.8**i for i in range(k)], dtype=torch.float64)
        torch.testing.assert_close(got.loss, (w * sums / counts).sum() / w.sum())
        # and a right-padded batch of the same documents gives the same loss
        width = 6
        padded = {}
        for key in (
            "hidden_states",
            "input_ids",
            "attention_mask",
            "loss_mask",
            "target_probs",
            "position_mask",
        ):
            rows = []
            for d in docs:
                t, n = d[key], d[key].shape[1]
                rows.append(torch.cat((t, torch.zeros_like(t[:, :1]).expand(1, width - n, *t.shape[2:])), 1))
            padded[key] = torch.cat(rows, 0)
        torch.testing.assert_close(eagle3_batch_loss(model, padded, ttt_steps=k).loss, got.loss)


def test_packed_gradients_equal_unpacked():
    model = tiny_draft(vd=24)
    raw = _docs([4, 6])
    packed = _pack(raw, 12)
    docs = [_unshifted_tail(d) for d in raw]
    eagle3_batch_loss(model, packed, ttt_steps=3, normalization="full_mean").loss.backward()
    g_packed = model.fc.weight.grad.clone()
    model.zero_grad()
    total = sum(
        eagle3_batch_loss(model, d, ttt_steps=3, normalization="full_mean").loss
        * d["input_ids"].shape[1]
        / 12
        for d in docs
    )
    total.backward()
    torch.testing.assert_close(model.fc.weight.grad, g_packed)


# ---------------------------------------------------------------- the loss by hand


def _hand_inputs():
    logits = [
        torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64),
        torch.tensor([[[0.0, 3.0], [1.0, 0.0], [5.0, 5.0]]], dtype=torch.float64),
    ]
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]], dtype=torch.float64)
    pmask = torch.tensor([[[True], [True], [False]]])
    lmask = torch.tensor([[1, 1, 0]])
    return logits, probs, pmask, lmask


def _ce(logit_row, prob_row):
    lse = math.log(sum(math.exp(v) for v in logit_row))
    return -sum(p * (v - lse) for p, v in zip(prob_row, logit_row, strict=True))


def test_normalisations_match_hand_computed_values():
    logits, probs, pmask, lmask = _hand_inputs()
    # step 0: slots 0,1 supervised against P[0], P[1]; step 1: slot 0 only, against P[1]
    l00 = _ce([2.0, 0.0], [0.9, 0.1])
    l01 = _ce([0.0, 1.0], [0.2, 0.8])
    l10 = _ce([0.0, 3.0], [0.2, 0.8])
    out = eagle3_ttt_loss(logits, probs, pmask, lmask)
    am0, am1 = (l00 + l01) / 2, l10 / 1
    assert out.step_losses.tolist() == pytest.approx([am0, am1])
    assert out.loss.item() == pytest.approx((am0 + 0.8 * am1) / 1.8)
    assert out.step_counts.tolist() == [2, 1]
    out = eagle3_ttt_loss(logits, probs, pmask, lmask, normalization="full_mean")
    ea0, ea1 = (l00 + l01) / 3, l10 / 3
    assert out.step_losses.tolist() == pytest.approx([ea0, ea1])
    assert out.loss.item() == pytest.approx(ea0 + 0.8 * ea1)
    with pytest.raises(ValueError, match="normalization"):
        eagle3_ttt_loss(logits, probs, pmask, lmask, normalization="mean")


def test_accuracy_and_simulated_tau_by_hand():
    logits, probs, pmask, lmask = _hand_inputs()
    out = eagle3_ttt_loss(logits, probs, pmask, lmask)
    # step 0: slot0 argmax 0 == 0 correct, slot1 1 == 1 correct; step 1: slot0 argmax 1 == argmax P[1] = 1
    assert out.step_accuracies.tolist() == [1.0, 1.0]
    assert out.accuracy.item() == 1.0
    # hit_0 = {0,1} / valid_0 = {0,1}; hit_1 = {0} / valid_1 = {0}: tau = 1 + 1 + 1
    assert out.tau_sim.item() == pytest.approx(3.0)
    logits[1] = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [5.0, 5.0]]], dtype=torch.float64)  # step 1 wrong
    out = eagle3_ttt_loss(logits, probs, pmask, lmask)
    assert out.step_accuracies.tolist() == [1.0, 0.0]
    assert out.accuracy.item() == pytest.approx(2 / 3)
    assert out.tau_sim.item() == pytest.approx(2.0)


def test_full_logits_supervision():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, dtype=torch.float64)
    loss_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    probs, mask = target_distribution(logits, loss_mask)
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))  # fp32, like the service
    assert torch.equal(mask, loss_mask.bool())
    # with a vocab map: the service's projection (argmax over the full vocab decides the mask)
    ids = torch.tensor([3, 0, 7, 11, 5])
    sel = torch.zeros(V, dtype=torch.bool)
    sel[ids] = True
    probs, mask = target_distribution(logits, loss_mask, ids, sel)
    torch.testing.assert_close(probs, torch.softmax(logits[..., ids].float(), -1))
    assert torch.equal(mask, sel[logits.argmax(-1)] & loss_mask.bool())
    # a draft with Vd == V trains on `target` logits the same as on the equivalent target_probs
    model = tiny_draft(vd=V)
    x = random_inputs(2, 5, vd=V)
    x_logits = {k: v for k, v in x.items() if k not in ("target_probs", "position_mask")}
    x_logits["target"], x_logits["loss_mask"] = logits, loss_mask
    x_probs = dict(
        x_logits, target_probs=torch.softmax(logits, -1), position_mask=loss_mask.bool()[..., None]
    )
    del x_probs["target"]
    torch.testing.assert_close(
        eagle3_batch_loss(model, x_logits, 3).loss, eagle3_batch_loss(model, x_probs, 3).loss
    )
    # a smaller draft vocab is projected through the draft's own d2t/t2d
    small = tiny_draft(vd=5)
    small.set_vocab_mapping(ids, sel)
    assert torch.equal(small.selected_token_ids(), ids)
    x_small = dict(x_probs, target_probs=torch.softmax(logits[..., ids].float(), -1))
    x_small["position_mask"] = (sel[logits.argmax(-1)] & loss_mask.bool())[..., None]
    torch.testing.assert_close(
        eagle3_batch_loss(small, x_logits, 2).loss, eagle3_batch_loss(small, x_small, 2).loss
    )


def test_soft_cross_entropy_is_fp32_and_matches_hard_ce_for_one_hot():
    logits = torch.randn(3, 4, 10).bfloat16()
    target = torch.randint(0, 10, (3, 4))
    out = soft_cross_entropy(logits, torch.nn.functional.one_hot(target, 10))
    assert out.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, 10), target.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(out, ref.view(3, 4))


# ---------------------------------------------------------------- training


def _target_batch(
    target, input_ids: torch.Tensor, loss_mask: torch.Tensor, layer_ids=(1, 2, 3)
) -> Eagle3TargetBatch:
    """EAGLE-3 supervision computed here from a HF target's output_hidden_states (test reference)."""
    with torch.no_grad():
        out = target(input_ids=input_ids, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i + 1] for i in layer_ids], -1)
    return Eagle3TargetBatch(
        aux_hidden_states=aux,
        input_ids=shift_left(input_ids),
        attention_mask=torch.ones_like(input_ids),
        loss_mask=shift_left(loss_mask),
        logits=shift_left(out.logits),
    )


def test_loss_goes_down_on_tiny_overfit_set():
    torch.manual_seed(0)
    target = tf.AutoModelForCausalLM.from_config(tiny_target_config()).eval()
    with torch.no_grad():  # a peaked target distribution, so there is something to learn
        target.lm_head.weight.mul_(100)
    input_ids = torch.randint(0, V, (4, 12))
    loss_mask = torch.ones_like(input_ids)
    loss_mask[:, :3] = 0
    inputs = _target_batch(target, input_ids, loss_mask).to_trainer_inputs()
    cfg = Eagle3DraftConfig.from_target_config(target.config)
    draft = Eagle3DraftModel(cfg, embed_weight=target.get_input_embeddings().weight)
    assert torch.equal(draft.embed_tokens.weight, target.get_input_embeddings().weight)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        out = eagle3_batch_loss(draft, inputs, ttt_steps=3)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert draft.embed_tokens.weight.grad is None
    assert losses[-1] < 0.6 * losses[0], losses
    assert out.step_accuracies[0] > 0.5
    # tau_sim = 1 + sum over the 3 TTT steps of the hit rate: above 1 + step-0 accuracy's share, at most 4
    tau = out.tau_sim.item()
    assert tau > 1.5 and tau <= 1 + 3


@pytest.mark.parametrize("mapped", [False, True])
def test_packed_equals_unpacked_through_the_in_process_backend(tiny_model, mapped):
    """The service's packed batch (block-causal target, shift across documents) and the documents
    run alone give the same draft loss."""
    from draftfeed.target.backends import HFEagle3TargetModel

    target = tiny_model("llama")
    backend = HFEagle3TargetModel(target)
    vd = 64 if mapped else target.config.vocab_size
    torch.manual_seed(0)
    draft = Eagle3DraftModel(
        Eagle3DraftConfig.from_target_config(target.config, draft_vocab_size=vd),
        embed_weight=target.get_input_embeddings().weight,
    )
    if mapped:
        ids = torch.randperm(target.config.vocab_size)[:vd]
        sel = torch.zeros(target.config.vocab_size, dtype=torch.bool)
        sel[ids] = True
        backend.set_vocab_mapping(ids, sel)
        draft.set_vocab_mapping(ids, sel)
    g = torch.Generator().manual_seed(5)
    lens, s, k = [6, 4, 7], 20, 4
    docs = [torch.randint(3, 150, (1, n), generator=g) for n in lens]
    masks = [(torch.rand(1, n, generator=g) > 0.2).long() for n in lens]
    pad = s - sum(lens)
    ids = torch.cat(docs + [torch.zeros(1, pad, dtype=torch.long)], 1)
    loss_mask = torch.cat(masks + [torch.zeros(1, pad, dtype=torch.long)], 1)
    attn = torch.cat([torch.ones(1, sum(lens), dtype=torch.long), torch.zeros(1, pad, dtype=torch.long)], 1)
    seg = lens + [pad]
    pos = torch.cat([torch.arange(n) for n in seg])[None]
    rem = torch.cat([torch.arange(n - 1, -1, -1) for n in seg])[None]
    packed = backend.generate_batch(ids, attn, loss_mask, pos, torch.tensor([seg]), rem)
    with torch.no_grad():
        got = eagle3_batch_loss(draft, packed.to_trainer_inputs(), ttt_steps=k)
        sums, counts = torch.zeros(k), torch.zeros(k)
        for d, m in zip(docs, masks, strict=True):
            alone = backend.generate_batch(d, torch.ones_like(d), m)
            r = eagle3_batch_loss(draft, alone.to_trainer_inputs(), ttt_steps=k)
            sums += r.step_losses * r.step_counts
            counts += r.step_counts
    assert torch.equal(got.step_counts.float(), counts) and counts[0] > 0
    torch.testing.assert_close(got.step_losses, sums / counts.clamp_min(1), atol=1e-5, rtol=1e-5)
