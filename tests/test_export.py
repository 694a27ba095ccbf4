"""EAGLE-3 export (trainer/export.py): the SGLang/vLLM layout, and the loader reads back the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from draftfeed.trainer.export import export_eagle3, load_eagle3, read_eagle3_config
from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

EXPECTED_KEYS = {
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


@pytest.fixture(scope="module")
def target(tiny_model):
    return tiny_model("llama")


def trained_like_draft(target, vd=48):
    torch.manual_seed(0)
    cfg = Eagle3DraftConfig.from_target_config(target.config, draft_vocab_size=vd)
    draft = Eagle3DraftModel(cfg, embed_weight=target.get_input_embeddings().weight)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ids = torch.randperm(160)[:vd]
    mask = torch.zeros(160, dtype=torch.bool)
    mask[ids] = True
    draft.set_vocab_mapping(ids, mask)
    return draft


def test_layout_and_config(target, tmp_path):
    draft = trained_like_draft(target)
    out = export_eagle3(draft, tmp_path / "d", target.config, [1, 3, 4], 8)
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == EXPECTED_KEYS  # no embedding unless asked, no rope buffer
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 1 and cfg["draft_vocab_size"] == 48 and cfg["vocab_size"] == 160
    assert cfg["tie_word_embeddings"] is False and "target_hidden_size" not in cfg
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # the default for 8 layers
    assert "eagle_aux_hidden_state_layer_ids" not in cfg
    assert cfg["hidden_size"] == 32 and cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    # the config is one transformers' Llama config class reads (what SGLang / vLLM build from)
    from transformers import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert hf.num_hidden_layers == 1 and hf.hidden_size == 32
    custom = export_eagle3(draft, tmp_path / "c", target.config, [0, 2, 5], 8, include_embeddings=True)
    ccfg = json.loads((custom / "config.json").read_text())
    assert ccfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]  # vLLM: input-of-layer ids
    assert "embed_tokens.weight" in load_file(str(custom / "model.safetensors"))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_export_loads_back_to_the_same_weights(target, tmp_path, dtype):
    draft = trained_like_draft(target)
    out = export_eagle3(draft, tmp_path / "d", target.config, [1, 3, 4], 8, dtype=dtype)
    loaded = load_eagle3(out, target.get_input_embeddings().weight)
    want = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        for k, v in draft.state_dict().items()
    }
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert loaded.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.inv_freq, draft.inv_freq)
    assert read_eagle3_config(out)[0] == draft.config
    if dtype is None:  # same function, not only the same tensors
        x = torch.randn(2, 7, 96)
        ids = torch.randint(0, 160, (2, 7))
        mask = torch.ones(2, 7, dtype=torch.long)
        for a, b in zip(loaded(x, ids, mask, 3), draft(x, ids, mask, 3), strict=True):
            assert torch.equal(a, b)


def test_loader_accepts_automodel_names_and_needs_an_embedding(target, tmp_path):
    draft = trained_like_draft(target)
    out = export_eagle3(draft, tmp_path / "d", target.config, [1, 3, 4], 8)
    with pytest.raises(ValueError, match="embed_weight"):
        load_eagle3(out)
    tensors = load_file(str(out / "model.safetensors"))
    renamed = {
        ("model." + k.replace("midlayer.", "layers.0.") if k != "lm_head.weight" else k): v
        for k, v in tensors.items()
    }
    del renamed["model.t2d"]  # vLLM-style files may leave t2d out
    save_file(renamed, str(out / "model.safetensors"))
    loaded = load_eagle3(out, target.get_input_embeddings().weight)
    for k, v in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
