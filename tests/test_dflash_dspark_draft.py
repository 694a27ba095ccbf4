"""DFlash / DSpark drafts: layer math, training vs inference, packing, overfitting, export/load, proposals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from draftfeed.client.batches import DFlashTargetBatch, DSparkTargetBatch
from draftfeed.trainer.block_drafting import Blocks, block_hidden, dflash_loss, dspark_loss, make_blocks
from draftfeed.trainer.models import dflash, dspark
from draftfeed.trainer.models.dflash import DFlashConfig, DFlashDraft, export_dflash, load_dflash, run_block
from draftfeed.trainer.models.dspark import DSparkConfig, DSparkDraft, export_dspark, load_dspark

LAYERS = [1, 3]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster and does not fight the other tests for the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_qwen3_config(**kw) -> Qwen3Config:
    base = dict(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0,
    )  # fmt: skip
    base.update(kw)
    return Qwen3Config(**base)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.manual_seed(0)
    # a larger init makes the random target's next-token distributions peaked, like a trained model's
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(initializer_range=0.2))
    path = tmp_path_factory.mktemp("target")
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def features(target, input_ids, position_ids=None, attention_mask=None):
    """Reference features from HF's output_hidden_states: layer i = hs[i+1]; last = final-norm output."""
    with torch.no_grad():
        out = target(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, output_hidden_states=True
        )
    hs = out.hidden_states
    return torch.cat([hs[i + 1] for i in LAYERS], dim=-1), hs[-1]


def make_dflash(target, **kw) -> DFlashDraft:
    cfg = DFlashConfig.from_target_config(
        target.config, target_layer_ids=LAYERS, **{"num_layers": 2, "block_size": 4, **kw}
    )
    return DFlashDraft(cfg, target.get_input_embeddings(), target.get_output_embeddings())


def make_dspark(target, **kw) -> DSparkDraft:
    cfg = DSparkConfig.from_target_config(
        target.config, target_layer_ids=LAYERS, **{"num_layers": 2, "block_size": 4, "markov_rank": 8, **kw}
    )
    return DSparkDraft(cfg).copy_target_weights(target.get_input_embeddings(), target.get_output_embeddings())


def test_config_from_target_and_validation(target):
    cfg = DFlashConfig.from_target_config(target.config, num_target_features=2)
    assert cfg.target_layer_ids == [1, 2]  # round(1 + i*(N-4)/(K-1)), N = 5
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 4, 2, 8)
    assert (
        cfg.num_layers == 5 and cfg.block_size == 16 and cfg.mask_token_id == 47 and cfg.rope_theta == 10000.0
    )
    scfg = DSparkConfig.from_target_config(target.config, target_layer_ids=[0, 2])
    assert scfg.block_size == 7 and scfg.markov_rank == 256 and scfg.final_logit_softcapping is None
    capped = DSparkConfig.from_target_config(
        {**target.config.to_dict(), "final_logit_softcapping": 30.0}, target_layer_ids=[0]
    )
    assert capped.final_logit_softcapping == 30.0
    with pytest.raises(ValueError, match="block_size"):
        DFlashConfig.from_target_config(target.config, target_layer_ids=LAYERS, block_size=1)
    with pytest.raises(ValueError, match="mask_token_id"):
        DFlashConfig.from_target_config(target.config, target_layer_ids=LAYERS, mask_token_id=48)
    with pytest.raises(ValueError, match=r"\[1, 1, 2, 2, 2\] are not 5 distinct"):  # 5 layers, N = 5
        DFlashConfig.from_target_config(target.config)
    with pytest.raises(ValueError, match="out of range"):
        DFlashConfig.from_target_config(target.config, target_layer_ids=[5])
    with pytest.raises(ValueError, match="markov_rank"):
        DSparkConfig.from_target_config(target.config, target_layer_ids=[0], markov_rank=0)


def test_layer_without_context_equals_hf_qwen3_layer(target):
    """With an empty context and no mask, a draft layer is a Qwen3 decoder layer with full attention."""
    torch.manual_seed(1)
    draft = make_dflash(target)
    ours = draft.layers[0]
    cfg = tiny_qwen3_config()
    cfg._attn_implementation = "eager"
    hf = Qwen3DecoderLayer(cfg, layer_idx=0).eval()
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 32)
    pos = torch.arange(10, 16).expand(2, 6)
    cos, sin = Qwen3RotaryEmbedding(cfg)(x, pos)
    ref = hf(x, attention_mask=None, position_embeddings=(cos, sin))
    ref = ref[0] if isinstance(ref, tuple) else ref
    rope = draft.rope(pos, x.dtype)
    got = ours(x, x[:, :0], rope, rope, None)
    assert torch.allclose(got, ref, atol=1e-5)


def reference_block(draft, feats, anchor_id, s):
    """docs/architecture.md section 2 written out: C = hidden_norm(fc(F)) once, unnormed, in every layer; per layer
    x' = input_layernorm(x); q = q_norm(q_proj x') at block positions s..s+bs-1; K = k_norm(k_proj [C; x']),
    V = v_proj [C; x'] at positions 0..s+bs-1; softmax over all keys; o_proj; residual; SwiGLU; final norm."""
    cfg = draft.config
    bs, nh, nkv, d = cfg.block_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ids = torch.tensor([anchor_id] + [cfg.mask_token_id] * (bs - 1))
    x = draft.embed(ids)  # [bs,H]
    c = draft.hidden_norm(draft.fc(feats))  # [s,H]
    hf_cfg = tiny_qwen3_config(rope_theta=cfg.rope_theta)
    cos, sin = Qwen3RotaryEmbedding(hf_cfg)(x[None], torch.arange(s + bs)[None])
    for layer in draft.layers:
        att = layer.self_attn
        xn = layer.input_layernorm(x)
        kv_in = torch.cat([c, xn])
        q = att.q_norm(att.q_proj(xn).view(bs, nh, d)).transpose(0, 1)[None]
        k = att.k_norm(att.k_proj(kv_in).view(s + bs, nkv, d)).transpose(0, 1)[None]
        v = att.v_proj(kv_in).view(s + bs, nkv, d).transpose(0, 1)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, s:], sin[:, s:])
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        k, q = k[0].repeat_interleave(nh // nkv, 0), q[0]
        v = v.repeat_interleave(nh // nkv, 0)
        probs = torch.softmax(q @ k.transpose(1, 2) / d**0.5, dim=-1)  # [nh,bs,s+bs]
        out = (probs @ v).transpose(0, 1).reshape(bs, nh * d)
        x = x + att.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return draft.norm(x)


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_block_equals_written_out_reference(target, kind):
    torch.manual_seed(12)
    draft = make_dflash(target) if kind == "dflash" else make_dspark(target)
    with torch.no_grad():  # non-trivial norms, so a misplaced norm shows
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    ids = torch.randint(0, 47, (1, 12))
    feats, _ = features(target, ids)
    got = run_block(draft, feats[:, :9], ids[:, 9])[0]
    with torch.no_grad():
        ref = reference_block(draft, feats[0, :9], int(ids[0, 9]), 9)
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64, "rope_theta": 500000.0}]
)  # fmt: skip
def test_rope_matches_hf_and_stays_fp32(rope):
    hf_cfg = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_parameters=rope,
    )  # fmt: skip
    cfg = DFlashConfig.from_target_config(hf_cfg, num_layers=1, block_size=2, num_target_features=1)
    backbone = dflash.BlockDraftBackbone(cfg).to(torch.bfloat16)
    pos = torch.arange(0, 4000, 37).view(1, -1)
    x = torch.zeros(1, pos.shape[1], 32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)  # fp32 frequencies, fp32 angles
    cos, sin = backbone.rope(pos, torch.bfloat16)
    assert torch.equal(cos, ref_cos.to(torch.bfloat16)) and torch.equal(sin, ref_sin.to(torch.bfloat16))
    assert not list(backbone.buffers())  # no RoPE buffer a dtype cast could round


@pytest.mark.parametrize("kind", ["dflash", "dspark"])
def test_training_blocks_equal_inference_blocks(target, kind):
    """The training mask (context j < a, bidirectional block) gives what one inference block gives for
    the committed prefix x_0..x_{a-1} and anchor x_a."""
    torch.manual_seed(2)
    draft = make_dflash(target) if kind == "dflash" else make_dspark(target)
    ids = torch.randint(0, 47, (2, 20))
    feats, _ = features(target, ids)
    anchors = torch.tensor([[1, 6, 13], [0, 9, 16]])
    blocks = Blocks(anchors, torch.ones(2, 3, dtype=torch.bool), 4, torch.arange(20).expand(2, 20))
    trained = block_hidden(draft, feats, ids, blocks)
    for b in range(2):
        for i, a in enumerate(anchors[b].tolist()):
            inferred = run_block(draft, feats[b : b + 1, :a], ids[b : b + 1, a])
            assert torch.allclose(trained[b, i], inferred[0], atol=1e-5), (b, a)


def test_packed_row_blocks_equal_separate_documents(target):
    """Blocks of a packed row see only their own document, at positions that restart with it."""
    torch.manual_seed(3)
    draft = make_dspark(target)
    doc_a, doc_b = torch.randint(0, 47, (1, 7)), torch.randint(0, 47, (1, 9))
    packed = torch.cat([doc_a, doc_b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(9)]).view(1, 16)
    feats_a, _ = features(target, doc_a)
    feats_b, _ = features(target, doc_b)
    feats = torch.cat([feats_a, feats_b], dim=1)  # what a block-causal packed target run returns
    seq_lens = torch.tensor([[7, 9]])
    from draftfeed.trainer.block_drafting import document_ids

    doc = document_ids(1, 16, seq_lens=seq_lens)
    blocks = Blocks(torch.tensor([[2, 8, 12]]), torch.ones(1, 3, dtype=torch.bool), 4, pos, doc)
    trained = block_hidden(draft, feats, packed, blocks)
    for i, (a, src, f, off) in enumerate(
        [(2, doc_a, feats_a, 0), (8, doc_b, feats_b, 7), (12, doc_b, feats_b, 7)]
    ):
        alone = run_block(draft, f[:, : a - off], src[:, a - off])
        assert torch.allclose(trained[0, i], alone[0], atol=1e-5), a


def test_dflash_propose_block_equals_stepwise_reference(target):
    torch.manual_seed(4)
    draft = make_dflash(target)
    ids = torch.randint(0, 47, (1, 12))
    feats, _ = features(target, ids)
    s = 9
    got = dflash.propose_block(draft, feats[:, :s], ids[:, s])
    # reference: one query slot at a time, each through the training path (mask) on the full sequence
    expected = []
    for k in range(1, 4):
        blocks = Blocks(torch.tensor([[s]]), torch.tensor([[True]]), 4, torch.arange(12).view(1, 12))
        h = block_hidden(draft, feats, ids, blocks)[0, 0, k]
        expected.append(int((target.get_output_embeddings().weight @ h).argmax()))
    assert got.shape == (1, 3) and got[0].tolist() == expected


def test_dspark_propose_block_markov_chain_and_early_stop(target):
    torch.manual_seed(5)
    draft = make_dspark(target)
    ids = torch.randint(0, 47, (2, 12))
    feats, _ = features(target, ids)
    s = 8
    prop = dspark.propose_block(draft, feats[:, :s], ids[:, s])
    # step-by-step reference: z_k = U_k + W2 W1[prev], prev = x_s then d_k
    hidden = run_block(draft, feats[:, :s], ids[:, s])
    w1, w2 = draft.markov_head.markov_w1.weight, draft.markov_head.markov_w2.weight
    lm = target.get_output_embeddings().weight
    for b in range(2):
        prev, toks, confs = int(ids[b, s]), [], []
        for k in range(4):
            h = hidden[b, k]
            feat = torch.cat([h, w1[prev]])
            confs.append(
                torch.sigmoid(
                    draft.confidence_head.proj.weight[0] @ feat + draft.confidence_head.proj.bias[0]
                )
            )
            prev = int((lm @ h + w2 @ w1[prev]).argmax())
            toks.append(prev)
        assert prop.tokens[b].tolist() == toks
        assert torch.allclose(prop.confidence[b], torch.stack(confs), atol=1e-6)
    assert prop.lengths.tolist() == [4, 4]  # threshold 0 = no early stop

    # a Markov head that dominates: B(prev)[u] is largest at u = prev + 1, so d_{k+1} = x_s + k + 1 (mod V)
    v, r = draft.config.vocab_size, draft.config.markov_rank
    code = torch.tensor(
        [[((t >> i) & 1) * 2.0 - 1.0 for i in range(r)] for t in range(v)]
    )  # distinct +-1 codes
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.copy_(code)
        draft.markov_head.markov_w2.weight.copy_(code.roll(1, dims=0) * 30)  # row u = code(u - 1)
    chained = dspark.propose_block(draft, feats[:, :s], ids[:, s])
    for b in range(2):
        assert chained.tokens[b].tolist() == [(int(ids[b, s]) + k) % v for k in range(1, 5)]

    # early stop: l = first k with c_k < theta
    theta = float(chained.confidence.flatten().median())
    stopped = dspark.propose_block(draft, feats[:, :s], ids[:, s], confidence_threshold=theta)
    assert torch.equal(stopped.tokens, chained.tokens)
    for b in range(2):
        below = (stopped.confidence[b] < theta).tolist()
        assert stopped.lengths[b].item() == (below.index(True) if True in below else 4)
    assert (stopped.lengths < 4).any()  # the threshold bites somewhere
    off = dspark.propose_block(draft, feats[:, :s], ids[:, s], confidence_threshold=1.1)
    assert off.lengths.tolist() == [0, 0]  # nothing clears the bar: verify the anchor only


def batch_for(target, ids, loss_mask=None):
    f, last = features(target, ids)
    lm = torch.ones_like(ids) if loss_mask is None else loss_mask
    dfl = DFlashTargetBatch(hidden_states=f, input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=lm)
    dsp = DSparkTargetBatch(
        target_hidden_states=f, target_last_hidden_states=last, input_ids=ids, loss_mask=lm
    )
    return dfl, dsp


def greedy_sequence(target, prompt, n):
    with torch.no_grad():
        return target.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)


def test_dflash_loss_goes_down_on_overfit_set(target):
    torch.manual_seed(6)
    draft = make_dflash(target)
    ids = greedy_sequence(target, torch.randint(0, 47, (2, 3)), 21)
    batch, _ = batch_for(target, ids)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        out = dflash_loss(draft, batch, num_anchors=64, gamma=7.0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or (out.loss.item(), out.metrics["accept_len"].item())
    assert out.loss.item() < 0.5 * first[0]
    assert out.metrics["accept_len"].item() > first[1] + 1.0
    assert out.metrics["blocks"].item() == 2 * (24 - 4 + 1)  # every valid anchor drawn


def test_dspark_loss_goes_down_on_overfit_set(target):
    torch.manual_seed(7)
    draft = make_dspark(target)
    ids = greedy_sequence(target, torch.randint(0, 47, (2, 3)), 21)
    _, batch = batch_for(target, ids)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    frozen = draft.lm_head.weight.clone()
    first = None
    for _ in range(40):
        out = dspark_loss(
            draft, batch, num_anchors=64, chunk_rows=64, generator=torch.Generator().manual_seed(0)
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or (out.loss.item(), dict(out.parts), out.metrics["tau_train"].item())
    assert out.loss.item() < 0.5 * first[0]
    assert out.parts["tv"] < first[1]["tv"] and out.parts["ce"] < first[1]["ce"]
    assert out.metrics["tau_train"].item() > first[2] + 0.5
    assert torch.equal(draft.lm_head.weight, frozen)  # the target's copies stay frozen
    total = 0.1 * out.parts["ce"] + 0.9 * out.parts["tv"] + 1.0 * out.parts["conf"]
    assert torch.allclose(total, out.loss.detach(), atol=1e-4)  # loss of the step's weights before its update


def test_dflash_loss_equals_naive_per_block_reference(target):
    torch.manual_seed(10)
    draft = make_dflash(target)
    ids = torch.randint(0, 47, (2, 18))
    loss_mask = (torch.rand(2, 18) > 0.15).long()
    batch, _ = batch_for(target, ids, loss_mask)
    gamma = 3.0
    out = dflash_loss(draft, batch, num_anchors=5, gamma=gamma, generator=torch.Generator().manual_seed(1))
    blocks = make_blocks(ids, loss_mask, algorithm="dflash", block_size=4, num_anchors=5,
                         generator=torch.Generator().manual_seed(1))  # fmt: skip
    hidden = block_hidden(draft, batch.hidden_states, ids, blocks).detach()
    lm = target.get_output_embeddings().weight
    num = den = 0.0
    accept, kept = [], 0
    for b in range(2):
        for i, (a, keep) in enumerate(zip(blocks.anchors[b].tolist(), blocks.keep[b].tolist(), strict=True)):
            if not keep:
                continue
            kept += 1
            run, running = 1, True
            for k in range(1, 4):  # slot k predicts x_{a+k}
                ok = a + k < 18 and loss_mask[b, a + k] == 1
                logits = lm @ hidden[b, i, k]
                if ok:
                    w = math.exp(-(k - 1) / gamma)
                    num += w * float(torch.nn.functional.cross_entropy(logits[None], ids[b, a + k][None]))
                    den += w
                running = running and ok and int(logits.argmax()) == int(ids[b, a + k])
                run += int(running)
            accept.append(run)
    assert math.isclose(out.loss.item(), num / den, rel_tol=1e-5)
    assert math.isclose(out.metrics["accept_len"].item(), sum(accept) / kept, rel_tol=1e-6)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_dspark_loss_equals_naive_per_block_reference(target, cap):
    torch.manual_seed(11)
    draft = make_dspark(target, final_logit_softcapping=cap)
    ids = torch.randint(0, 47, (2, 18))
    loss_mask = (torch.rand(2, 18) > 0.15).long()
    _, batch = batch_for(target, ids, loss_mask)
    gamma = 2.0
    out = dspark_loss(
        draft, batch, num_anchors=6, gamma=gamma, chunk_rows=5, generator=torch.Generator().manual_seed(2)
    )
    blocks = make_blocks(ids, loss_mask, algorithm="dspark", block_size=4, num_anchors=6,
                         generator=torch.Generator().manual_seed(2))  # fmt: skip
    hidden = block_hidden(draft, batch.target_hidden_states, ids, blocks).detach()
    lm = target.get_output_embeddings().weight
    w1, w2 = draft.markov_head.markov_w1.weight.detach(), draft.markov_head.markov_w2.weight.detach()
    proj_w, proj_b = draft.confidence_head.proj.weight.detach(), draft.confidence_head.proj.bias.detach()

    def capped(z):
        return z if cap is None else torch.tanh(z / cap) * cap

    sums = {"ce": 0.0, "tv": 0.0, "conf": 0.0}
    den, taus = 0.0, []
    for b in range(2):
        for i, (a, keep) in enumerate(zip(blocks.anchors[b].tolist(), blocks.keep[b].tolist(), strict=True)):
            if not keep:
                continue
            tau, prod = 1.0, 1.0
            for k in range(4):  # slot k predicts x_{a+k+1}; prev = x_{a+k}; teacher = Hlast[a+k]
                if a + k + 1 >= 18 or loss_mask[b, a + k + 1] == 0:
                    break
                h, prev, y = hidden[b, i, k], int(ids[b, a + k]), ids[b, a + k + 1]
                z = capped(lm @ h) + w2 @ w1[prev]
                p_t = torch.softmax(capped(lm @ batch.target_last_hidden_states[b, a + k]), -1)
                tv = float((torch.softmax(z, -1) - p_t).abs().sum())
                c_star = min(max(1 - tv / 2, 0.0), 1.0)
                conf = proj_w[0] @ torch.cat([h, w1[prev]]) + proj_b[0]
                w = math.exp(-k / gamma)
                sums["ce"] += w * float(torch.nn.functional.cross_entropy(z[None], y[None]))
                sums["tv"] += w * tv
                sums["conf"] += w * float(
                    torch.nn.functional.binary_cross_entropy_with_logits(conf, torch.tensor(c_star))
                )
                den += w
                prod *= c_star
                tau += prod
            taus.append(tau)
    for key in sums:
        assert math.isclose(out.parts[key].item(), sums[key] / den, rel_tol=1e-4), key
    total = (0.1 * sums["ce"] + 0.9 * sums["tv"] + sums["conf"]) / den
    assert math.isclose(out.loss.item(), total, rel_tol=1e-4)
    assert math.isclose(out.metrics["tau_train"].item(), sum(taus) / len(taus), rel_tol=1e-4)


def test_global_denominator_and_world_size(target):
    draft = make_dflash(target)
    ids = torch.randint(0, 47, (2, 16))
    batch, dsp_batch = batch_for(target, ids)
    local = dflash_loss(draft, batch, num_anchors=4, generator=torch.Generator().manual_seed(0))
    glob = dflash_loss(
        draft,
        batch,
        num_anchors=4,
        generator=torch.Generator().manual_seed(0),
        den_reduce=lambda t: t * 4,
        world_size=2,
    )
    assert torch.allclose(glob.loss, local.loss / 2)
    sdraft = make_dspark(target)
    local = dspark_loss(sdraft, dsp_batch, num_anchors=4, generator=torch.Generator().manual_seed(0))
    glob = dspark_loss(
        sdraft,
        dsp_batch,
        num_anchors=4,
        generator=torch.Generator().manual_seed(0),
        den_reduce=lambda t: t * 3,
        world_size=3,
    )
    assert torch.allclose(glob.loss, local.loss)


DFLASH_LAYER_KEYS = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}  # fmt: skip


def dflash_keys(num_layers):
    return {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{k}" for i in range(num_layers) for k in DFLASH_LAYER_KEYS
    }


def test_export_load_dflash_identical(target, tmp_path):
    torch.manual_seed(8)
    draft = make_dflash(target, mask_token_id=40)
    export_dflash(draft, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and "auto_map" in cfg
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 2 and cfg["num_target_layers"] == 5
    assert cfg["block_size"] == 4 and cfg["dflash_config"] == {
        "mask_token_id": 40,
        "target_layer_ids": LAYERS,
        "block_size": 4,
    }
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert Qwen3Config.from_pretrained(tmp_path).num_hidden_layers == 2  # a Qwen3 config to HF
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == dflash_keys(2)
    assert tensors["fc.weight"].shape == (32, 64)

    loaded = load_dflash(tmp_path, target.get_input_embeddings(), target.get_output_embeddings())
    assert loaded.config == draft.config
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, 47, (1, 12))
    feats, _ = features(target, ids)
    assert torch.equal(run_block(loaded, feats[:, :7], ids[:, 7]), run_block(draft, feats[:, :7], ids[:, 7]))
    assert torch.equal(
        dflash.propose_block(loaded, feats[:, :7], ids[:, 7]),
        dflash.propose_block(draft, feats[:, :7], ids[:, 7]),
    )


def test_export_load_dspark_identical(target, tmp_path):
    torch.manual_seed(9)
    draft = make_dspark(target, final_logit_softcapping=20.0, num_anchors=64)
    export_dspark(draft, tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    expected = dict(
        num_hidden_layers=2, num_target_layers=5, block_size=4, mask_token_id=47, target_layer_ids=LAYERS,
        num_anchors=64, markov_rank=8, markov_head_type="vanilla", enable_confidence_head=True,
        confidence_head_with_markov=True, final_logit_softcapping=20.0,
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    extra = {"embed_tokens.weight", "lm_head.weight", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
             "confidence_head.proj.weight", "confidence_head.proj.bias"}  # fmt: skip
    assert set(tensors) == dflash_keys(2) | extra
    assert (
        tensors["markov_head.markov_w1.weight"].shape
        == tensors["markov_head.markov_w2.weight"].shape
        == (48, 8)
    )
    assert tensors["confidence_head.proj.weight"].shape == (1, 32 + 8)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())

    loaded = load_dspark(tmp_path)
    bf16 = draft.to(torch.bfloat16)
    assert loaded.config == draft.config
    for k, v in bf16.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not loaded.lm_head.weight.requires_grad and not loaded.embed_tokens.weight.requires_grad
    ids = torch.randint(0, 47, (2, 12))
    feats, _ = features(target, ids)
    a, b = (
        dspark.propose_block(loaded, feats[:, :7], ids[:, 7]),
        dspark.propose_block(bf16, feats[:, :7], ids[:, 7]),
    )
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.confidence, b.confidence)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_training_matches_inference_and_trains(target):
    torch.manual_seed(13)
    gpu_target = AutoModelForCausalLM.from_config(tiny_qwen3_config(initializer_range=0.2)).cuda().eval()
    draft = make_dspark(gpu_target, block_size=7).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 47, (2, 40), device="cuda")
    feats, last = features(gpu_target, ids)
    feats, last = feats.to(torch.bfloat16), last.to(torch.bfloat16)
    anchors = torch.tensor([[3, 17, 30], [0, 12, 25]], device="cuda")
    blocks = Blocks(
        anchors,
        torch.ones(2, 3, dtype=torch.bool, device="cuda"),
        7,
        torch.arange(40, device="cuda").expand(2, 40),
    )
    with torch.no_grad():
        trained = block_hidden(draft, feats, ids, blocks).float()
        for b in range(2):
            for i, a in enumerate(anchors[b].tolist()):
                inferred = run_block(draft, feats[b : b + 1, :a], ids[b : b + 1, a])[0].float()
                assert torch.allclose(trained[b, i], inferred, atol=0.05, rtol=0.05), (b, a)
    batch = DSparkTargetBatch(
        target_hidden_states=feats,
        target_last_hidden_states=last,
        input_ids=ids,
        loss_mask=torch.ones_like(ids),
    )
    out = dspark_loss(draft, batch, num_anchors=16, chunk_rows=32)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in draft.parameters() if p.requires_grad and p.grad is not None
    )
