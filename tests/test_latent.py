"""Encodings end to end through a real server: latent supervision, fp8 hidden states, negotiation."""

from __future__ import annotations

import pytest
import torch
from test_backends import inputs, mapping

from draftfeed.client.errors import InvalidArgument
from draftfeed.client.remote import RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.target.backends import HFEagle3TargetModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model):
    srv = TargetServer(ServeConfig(port=0), model=model).start()
    yield srv
    srv.stop(grace=1)


def remote(server, **enc):
    r = RemoteEagle3TargetModel.from_urls([server.url], encodings=enc, cache_dir=None)
    r.set_vocab_mapping(*mapping(160))
    return r


def row_error(ref, got):
    ref, got = ref.float().flatten(0, -2), got.float().flatten(0, -2)
    return ((ref - got).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).max().item()


def test_latent_rebuilds_target_probs_and_the_trainer_loss(server, model):
    from draftfeed.trainer.losses import eagle3_batch_loss
    from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    sel, mask = mapping(160)
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(sel, mask)
    want = local.generate_batch(*inputs())
    with remote(server, probs="raw") as raw, remote(server, probs="latent") as latent:
        got_raw, got_latent = raw.generate_batch(*inputs()), latent.generate_batch(*inputs())
    assert torch.equal(got_latent.position_mask, want.position_mask)  # decided on the server, full vocab
    assert torch.equal(got_latent.aux_hidden_states, want.aux_hidden_states)
    assert (got_latent.target_probs - want.target_probs).abs().max() <= 1e-5
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig.from_target_config(model.config, draft_vocab_size=len(sel))
    draft = Eagle3DraftModel(cfg, model.get_input_embeddings().weight)
    draft.set_vocab_mapping(sel, mask)
    loss_raw = eagle3_batch_loss(draft, got_raw.to_trainer_inputs(), ttt_steps=3).loss
    loss_latent = eagle3_batch_loss(draft, got_latent.to_trainer_inputs(), ttt_steps=3).loss
    assert abs(loss_raw.item() - loss_latent.item()) <= 1e-6


def test_fp8_hidden_and_compact_masks(server, model):
    sel, mask = mapping(160)
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(sel, mask)
    want = local.generate_batch(*inputs())
    with remote(server, hidden="fp8", mask="bits", ids="narrow", probs="bf16") as r:
        got = r.generate_batch(*inputs())
        session = server.sessions.get(r.servers[0].session_id)
        assert session.encodings == {
            "hidden": "fp8",
            "final": "raw",
            "probs": "bf16",
            "mask": "bits",
            "ids": "narrow",
        }
    assert got.aux_hidden_states.dtype == want.aux_hidden_states.dtype
    for layer in range(3):  # per-layer scales: each layer's rows stay inside the bound
        sl = slice(layer * 32, (layer + 1) * 32)
        assert row_error(want.aux_hidden_states[..., sl], got.aux_hidden_states[..., sl]) < 0.04
    assert torch.equal(got.position_mask, want.position_mask)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.loss_mask, want.loss_mask)
    assert (got.target_probs - want.target_probs).abs().max() < 4e-3


def test_unknown_encoding_names_the_supported_ones(server):
    with pytest.raises(InvalidArgument, match=r"supported for tensor kind 'hidden': raw, fp8, bf16"):
        RemoteEagle3TargetModel.from_urls([server.url], encodings={"hidden": "int8"})
    with pytest.raises(InvalidArgument, match="unknown tensor kind"):
        RemoteEagle3TargetModel.from_urls([server.url], encodings={"pixels": "raw"})


@pytest.mark.slow
def test_bounds_on_the_default_targets_real_activations(default_target):
    """fp8 under 4% per row per layer and latent probs within 1e-5 of the server's, on SmolLM2's real weights."""
    from draftfeed.client.vocab import TokenCounter, build_token_map

    model, tokenizer = default_target
    srv = TargetServer(ServeConfig(port=0), model=model).start()
    try:
        from draftfeed.server.demo import chat_batch

        batch = chat_batch(tokenizer)
        counter = TokenCounter(49152)
        counter.update(batch["input_ids"], batch["loss_mask"])
        sel, mask = build_token_map(counter.counts, 4096, [tokenizer.eos_token_id])
        local = HFEagle3TargetModel(model)
        local.set_vocab_mapping(sel, mask)
        want = local.generate_batch(**batch)
        r = RemoteEagle3TargetModel.from_urls(
            [srv.url], encodings={"hidden": "fp8", "final": "raw", "probs": "latent"}, cache_dir=None
        )
        r.set_vocab_mapping(sel, mask)
        got = r.generate_batch(**batch)
        r.close()
        valid = batch["attention_mask"].bool()
        h = model.config.hidden_size
        for layer in range(3):
            sl = slice(layer * h, (layer + 1) * h)
            assert (
                row_error(want.aux_hidden_states[valid][..., sl], got.aux_hidden_states[valid][..., sl])
                < 0.04
            )
        assert (got.target_probs - want.target_probs).abs().max() <= 1e-5
        assert torch.equal(got.position_mask, want.position_mask)
    finally:
        srv.stop(grace=1)


def test_a_latent_session_keeps_only_the_logits_argmax(model):
    """With a vocab map, a latent EAGLE-3 session's forward asks for the final state and the logits' full-vocab
    argmax (its position_mask), not the [B,S,V] logits: the forward keeps [B,S] ids (and a CUDA graph of it
    no logits output), and the position_mask is the one the full logits give. Merged with a raw session's
    needs, both come."""
    from draftfeed.client.supervision import draft_position_mask, top1_position_mask
    from draftfeed.target.algorithms.eagle3 import Eagle3Features
    from draftfeed.target.backends import forward_for
    from draftfeed.target.capture import discover
    from draftfeed.target.features import TokenBatch, VocabMapping

    ids, attn, loss = inputs(seed=4, b=2, s=12)
    selected, selected_mask = mapping(160)
    vm = VocabMapping(selected, selected_mask)
    latent = Eagle3Features([0, 1, 2], mapping=vm, latent=True)
    raw = Eagle3Features([0, 1, 2], mapping=vm)
    assert latent.needs.top1 and latent.needs.final and not latent.needs.logits
    assert raw.needs.logits and not raw.needs.top1
    assert Eagle3Features([0, 1, 2], latent=True).needs.logits  # before the map: the raw logits go out
    layout, tb = discover(model), TokenBatch(ids, attn, loss)
    cap = forward_for(model, layout, tb, latent.needs)
    assert cap.logits is None and cap.top1.shape == ids.shape and cap.top1.dtype == torch.long
    both = forward_for(model, layout, tb, latent.needs | raw.needs)
    assert torch.equal(both.top1, both.logits.argmax(-1)) and torch.equal(cap.top1, both.top1)
    assert torch.equal(
        top1_position_mask(cap.top1, loss, selected_mask),
        draft_position_mask(both.logits, loss, selected_mask),
    )
    assert torch.equal(latent.fields(cap, tb)["position_mask"], raw.fields(both, tb)["position_mask"])
