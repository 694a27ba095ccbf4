"""In-process backends against an independent reference: HF's own `output_hidden_states` and logits."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES
from draftfeed.client.errors import FailedPrecondition, InvalidArgument
from draftfeed.client.supervision import project_supervision, shift_left
from draftfeed.target.backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from draftfeed.target.capture import discover, run_target

B, S = 2, 12


def inputs(seed=0, b=B, s=S, vocab=150):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    attn = torch.ones(b, s, dtype=torch.long)
    attn[1, -3:] = 0  # right padding on the second row
    loss = torch.zeros(b, s, dtype=torch.long)
    loss[:, s // 3 :] = 1
    loss = loss * attn
    return ids, attn, loss


def reference(model, ids, attn):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    return out.hidden_states, out.logits


def mapping(vocab, vd=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:vd].sort().values
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_eagle3_matches_hf(tiny_model, family):
    model = tiny_model(family)
    n = discover(model).num_layers
    ids, attn, loss = inputs()
    hs, logits = reference(model, ids, attn)
    backend = HFEagle3TargetModel(model)
    assert backend.aux_layer_ids == [1, n // 2 - 1, n - 4]
    batch = backend.generate_batch(ids, attn, loss)
    expect_aux = torch.cat([hs[i + 1] for i in backend.aux_layer_ids], dim=-1)
    assert torch.equal(batch.aux_hidden_states, expect_aux)
    assert torch.equal(batch.logits, shift_left(logits))
    assert torch.equal(batch.input_ids, shift_left(ids))
    assert torch.equal(batch.loss_mask, shift_left(loss))
    assert torch.equal(batch.attention_mask, attn)
    assert batch.target_probs is None

    sel, mask = mapping(logits.shape[-1])
    backend.set_vocab_mapping(sel, mask)
    proj = backend.generate_batch(ids, attn, loss)
    ref_probs, ref_pmask = project_supervision(shift_left(logits), shift_left(loss), sel, mask)
    # the straightforward reference, written out
    shifted = shift_left(logits)
    manual_probs = torch.softmax(shifted[..., sel].float(), -1)
    manual_pmask = (mask[shifted.argmax(-1)] & shift_left(loss).bool()).unsqueeze(-1)
    assert torch.equal(ref_probs, manual_probs) and torch.equal(ref_pmask, manual_pmask)
    assert proj.logits is None
    assert proj.target_probs.dtype == torch.float32 and proj.position_mask.dtype == torch.bool
    assert proj.target_probs.shape == (B, S, len(sel)) and proj.position_mask.shape == (B, S, 1)
    assert torch.equal(proj.target_probs, manual_probs)
    assert torch.equal(proj.position_mask, manual_pmask)
    assert torch.equal(proj.aux_hidden_states, expect_aux)


@pytest.mark.parametrize("family", FAMILIES)
def test_dflash_and_dspark_match_hf(tiny_model, family):
    model = tiny_model(family)
    n = discover(model).num_layers
    ids, attn, loss = inputs(seed=3)
    hs, logits = reference(model, ids, attn)

    dflash = HFDFlashTargetModel(model, capture_logits=True)
    assert dflash.target_layer_ids == [round(1 + i * (n - 4) / 4) for i in range(5)]
    fb = dflash.generate_batch(ids, attn, loss)
    assert torch.equal(fb.hidden_states, torch.cat([hs[i + 1] for i in dflash.target_layer_ids], -1))
    assert torch.equal(fb.logits, logits)
    assert (
        torch.equal(fb.input_ids, ids)
        and torch.equal(fb.loss_mask, loss)
        and torch.equal(fb.attention_mask, attn)
    )

    dspark = HFDSparkTargetModel(model, [0, 3, 5])
    sb = dspark.generate_batch(ids, attn, loss)
    assert torch.equal(sb.target_hidden_states, torch.cat([hs[1], hs[4], hs[6]], -1))
    assert torch.equal(sb.target_last_hidden_states, hs[n])
    assert torch.equal(sb.input_ids, ids) and torch.equal(sb.loss_mask, loss)
    assert not hasattr(sb, "attention_mask")

    with pytest.warns(UserWarning, match="SGLang"):
        edge = HFDSparkTargetModel(model, [-1, 2, n - 1])
    eb = edge.generate_batch(ids, attn, loss)
    # -1 is the input of the first decoder layer (hs[0]), N-1 the final-norm output (hs[N])
    assert torch.equal(eb.target_hidden_states, torch.cat([hs[0], hs[3], hs[n]], -1))


def test_last_layer_is_pre_norm(tiny_model):
    """Decoder-layer output N-1 is captured before the final norm; HF's hs[N] is after it."""
    model = tiny_model("llama")
    layout = discover(model)
    ids, attn, loss = inputs()
    hs, _ = reference(model, ids, attn)
    cap = run_target(model, layout, ids, attn, layer_ids=[7], want_final=True)
    assert torch.equal(layout.final_norm(cap.layers[7]), hs[8])
    assert torch.equal(cap.final, hs[8])


def test_hooks_removed_even_when_forward_raises(tiny_model):
    model = tiny_model("llama")
    layout = discover(model)
    mods = [*layout.layers, layout.final_norm]
    before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in mods]  # HF keeps its own
    bad = torch.full((1, 4), 10_000)  # out of the embedding's range: the forward raises
    with pytest.raises(IndexError):
        run_target(
            model, layout, bad, torch.ones(1, 4), layer_ids=[1, 2], want_first_input=True, want_final=True
        )
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in mods] == before


def test_generate_before_mapping_is_an_error_when_required(tiny_model):
    backend = HFEagle3TargetModel(tiny_model("llama"), require_vocab_mapping=True)
    with pytest.raises(FailedPrecondition, match="set_vocab_mapping"):
        backend.generate_batch(*inputs())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, a, lm: (i.float(), a, lm), "input_ids has dtype float32"),
        (lambda i, a, lm: (i[0], a, lm), r"input_ids must have rank 2"),
        (lambda i, a, lm: (i, a[:, :5], lm), r"attention_mask has shape \(2, 5\)"),
        (
            lambda i, a, lm: (i.clone().fill_(400), a, lm),
            r"token id 400, outside the target vocab \[0, 160\)",
        ),
        (lambda i, a, lm: (i, a, lm * 3), "loss_mask must hold only 0 and 1"),
    ],
)
def test_bad_inputs_name_the_problem(tiny_model, change, message):
    backend = HFEagle3TargetModel(tiny_model("llama"))
    with pytest.raises(InvalidArgument, match=message):
        backend.generate_batch(*change(*inputs()))


def test_bad_vocab_mapping(tiny_model):
    backend = HFEagle3TargetModel(tiny_model("llama"))
    sel, mask = mapping(160)
    with pytest.raises(InvalidArgument, match="outside the target vocab"):
        backend.set_vocab_mapping(torch.tensor([0, 200]), mask)
    with pytest.raises(InvalidArgument, match="entries; the target's vocab has 160"):
        backend.set_vocab_mapping(sel, mask[:100])
    with pytest.raises(InvalidArgument, match="disagrees"):
        backend.set_vocab_mapping(sel, ~mask)


def test_eagle3_batch_needs_exactly_one_source():
    from draftfeed.client.batches import Eagle3TargetBatch

    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="got neither"):
        Eagle3TargetBatch(aux_hidden_states=t, input_ids=t, attention_mask=t, loss_mask=t)
    with pytest.raises(ValueError, match="got both"):
        Eagle3TargetBatch(
            aux_hidden_states=t,
            input_ids=t,
            attention_mask=t,
            loss_mask=t,
            logits=t,
            target_probs=t,
            position_mask=t,
        )
    b = Eagle3TargetBatch(aux_hidden_states=t, input_ids=t, attention_mask=t, loss_mask=t, logits=t)
    assert set(b.to_trainer_inputs()) == {
        "hidden_states",
        "input_ids",
        "attention_mask",
        "loss_mask",
        "target",
    }


@pytest.mark.parametrize("kind", ["eagle3", "dflash", "dspark"])
def test_in_process_backend_interface(tiny_model, kind):
    """The interface a training loop calls: future-returning async path, embeddings, close, no servers."""
    from draftfeed.client.backend import DFlashTargetBackend, DSparkTargetBackend, Eagle3TargetBackend

    model = tiny_model("llama")
    cls, iface = {
        "eagle3": (HFEagle3TargetModel, Eagle3TargetBackend),
        "dflash": (HFDFlashTargetModel, DFlashTargetBackend),
        "dspark": (HFDSparkTargetModel, DSparkTargetBackend),
    }[kind]
    with cls(model) as backend:
        assert isinstance(backend, iface)
        assert backend.supports_async is False and backend.num_remote_servers == 0
        assert backend.get_input_embeddings().weight is model.get_input_embeddings().weight
        if kind != "eagle3":
            assert backend.get_output_embeddings().weight is model.get_output_embeddings().weight
        args = inputs(seed=5)
        future = backend.generate_batch_async(*args)
        got = future.result(timeout=60)
        assert future.cancel() is False  # already finished: nothing to cancel
        want = backend.generate_batch(*args)
        assert got.tensors().keys() == want.tensors().keys()
        assert all(torch.equal(v, want.tensors()[k]) for k, v in got.tensors().items())
        bad = backend.generate_batch_async(args[0].float(), *args[1:])  # errors arrive through the future
        with pytest.raises(InvalidArgument, match="input_ids has dtype float32"):
            bad.result(timeout=60)


def test_capture_never_keeps_all_layers(tiny_model):
    """The real path asks HF for no `output_hidden_states`, and skips `lm_head` when no logits are needed."""
    model = tiny_model("llama")
    seen, heads = [], []

    def record(_mod, _args, kwargs):
        seen.append(kwargs.get("output_hidden_states"))

    handles = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        model.base_model.register_forward_pre_hook(record, with_kwargs=True),
        model.get_output_embeddings().register_forward_hook(lambda *a: heads.append(1)),
    ]
    try:
        ids, attn, loss = inputs()
        HFDSparkTargetModel(model, [0, 3, 6]).generate_batch(ids, attn, loss)
        assert seen and heads == []  # DSpark needs no logits: the [B,S,V] head never runs
        HFEagle3TargetModel(model).generate_batch(ids, attn, loss)
        assert heads == [1]
        assert all(not v for v in seen), seen
    finally:
        for h in handles:
            h.remove()


def test_dspark_reports_final_logit_softcapping(tiny_model, tmp_path):
    """Gemma-2-style targets soft-cap their logits; the DSpark backend hands the cap to the trainer."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    backend = HFDSparkTargetModel(model, [0, 1])
    assert backend.final_logit_softcapping == 30.0
    ids, attn, loss = inputs(vocab=60)
    hs, _ = reference(model, ids, attn)
    batch = backend.generate_batch(ids, attn, loss)
    assert torch.equal(batch.target_hidden_states, torch.cat([hs[1], hs[2]], -1))
    assert torch.equal(batch.target_last_hidden_states, hs[3])
    assert HFDSparkTargetModel(tiny_model("llama"), [0]).final_logit_softcapping is None


def test_discovery_errors_name_what_was_searched(tiny_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs("llama"), dtype=torch.float32)
    layers = model.model.layers
    del model.model.layers
    with pytest.raises(
        InvalidArgument, match=r"decoder layers of LlamaForCausalLM: searched model\.model\.layers"
    ):
        discover(model)

    # an nn.ModuleDict keyed by str(i) is read in index order, whatever its insertion order
    model.model.layers = torch.nn.ModuleDict({str(i): layers[i] for i in reversed(range(len(layers)))})
    assert discover(model).layers == list(layers)

    model.model.layers = layers
    del model.model.norm
    with pytest.raises(InvalidArgument, match=r"final norm of LlamaForCausalLM .*model\.layers.*norm, ln_f"):
        discover(model)
