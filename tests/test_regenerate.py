"""Regenerating chat data with the target (trainer/regenerate.py): batched greedy equals one-by-one greedy,
later turns see the target's own earlier answers, the cache is reused only for the same settings."""

from __future__ import annotations

import json

import pytest
import torch
from test_loop import word_tokenizer

from draftfeed.trainer.regenerate import RegenerateSettings, regenerate, regenerate_cached

CONVS = [
    [{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "a lazy dog"}],
    [
        {"role": "system", "content": "seven wizards"},
        {"role": "user", "content": "hex bright jugs over the dog"},
        {"role": "assistant", "content": "quietly"},
        {"role": "user", "content": "jumps"},
        {"role": "assistant", "content": "the the the"},
    ],
    [{"role": "user", "content": "brown"}, {"role": "assistant", "content": "fox"}],
]


@pytest.fixture(scope="module")
def sharp_target(tiny_model):
    """The tiny target with a scaled-up lm_head (peaked distributions, so greedy is robust to padding) that
    only ever picks the word tokenizer's 16 words (ids 6..21): answers are never empty."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(tiny_model("llama").config, dtype=torch.float32).eval()
    m.load_state_dict(tiny_model("llama").state_dict())
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
        m.lm_head.weight[:6] = 0
        m.lm_head.weight[22:] = 0
    return m.requires_grad_(False)


@torch.no_grad()
def greedy_answer(model, tok, messages, n):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(n):
        t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_batched_greedy_equals_one_by_one_and_turns_chain(sharp_target):
    tok = word_tokenizer()
    got = regenerate(sharp_target, tok, CONVS, RegenerateSettings(max_new_tokens=6, batch_size=2))
    assert len(got) == 3
    for conv, orig in zip(got, CONVS, strict=True):
        assert [m["role"] for m in conv] == [m["role"] for m in orig]
        assert [m["content"] for m in conv if m["role"] != "assistant"] == [
            m["content"] for m in orig if m["role"] != "assistant"
        ]
        for i, m in enumerate(conv):
            if (
                m["role"] == "assistant"
            ):  # the answer to the conversation so far, with earlier answers regenerated
                assert m["content"] == greedy_answer(sharp_target, tok, conv[:i], 6)
    one = regenerate(sharp_target, tok, CONVS, RegenerateSettings(max_new_tokens=6, max_turns=1))
    assert [len(c) for c in one] == [2, 3, 2]
    short = regenerate(sharp_target, tok, CONVS, RegenerateSettings(max_new_tokens=6, max_prompt_tokens=8))
    assert [c[0]["content"] for c in short] == ["the quick fox", "brown"]  # the long prompt is dropped


def test_sampling_is_seeded_and_the_cache_is_reused_only_for_the_same_settings(sharp_target, tmp_path):
    tok = word_tokenizer()
    s = RegenerateSettings(max_new_tokens=5, temperature=1.5, seed=3)
    a = regenerate(sharp_target, tok, CONVS, s)
    assert a == regenerate(sharp_target, tok, CONVS, s)
    path = tmp_path / "regen.jsonl"
    first = regenerate_cached(path, sharp_target, tok, CONVS, source="x", target_id="t", settings=s)
    assert first == a and len(path.read_text().splitlines()) == 3
    # edit the cache: the same call reads it back instead of generating
    edited = [json.loads(line) for line in path.read_text().splitlines()]
    edited[0]["messages"][1]["content"] = "from the cache"
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    again = regenerate_cached(path, sharp_target, tok, CONVS, source="x", target_id="t", settings=s)
    assert again[0][1]["content"] == "from the cache"
    other = regenerate_cached(path, sharp_target, tok, CONVS, source="x", target_id="other", settings=s)
    assert other == a
