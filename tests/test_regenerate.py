"""Regenerating chat data with the target (trainer/regenerate.py): batched greedy equals one-by-one greedy,
later turns see the target's own earlier answers, the cache is reused only for the same settings."""

from __future__ import annotations

import json

import pytest
import torch
from test_loop import word_tokenizer

from draftfeed.client.errors import InvalidArgument
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


def test_a_greedy_cache_key_leaves_out_batch_size_seed_and_top_p(sharp_target, tmp_path):
    tok = word_tokenizer()
    path = tmp_path / "regen.jsonl"
    s = RegenerateSettings(max_new_tokens=5, batch_size=2, seed=1)
    regenerate_cached(path, sharp_target, tok, CONVS, source="x", target_id="t", settings=s)
    edited = [json.loads(line) for line in path.read_text().splitlines()]
    edited[0]["messages"][1]["content"] = "from the cache"
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    same = RegenerateSettings(max_new_tokens=5, batch_size=3, seed=7, top_p=0.5)  # greedy: the same answers
    assert (
        regenerate_cached(path, None, tok, CONVS, source="x", target_id=None, settings=same)[0][1]["content"]
        == "from the cache"
    )
    # sampled answers depend on the batches' seeds: there they are part of the key
    sampled = (RegenerateSettings(max_new_tokens=5, temperature=1.0, batch_size=b) for b in (2, 3))
    first = regenerate_cached(
        path, sharp_target, tok, CONVS, source="x", target_id="t", settings=next(sampled)
    )
    assert regenerate_cached(
        path, sharp_target, tok, CONVS, source="x", target_id="t", settings=next(sampled)
    )
    assert first  # both generated


def test_a_cache_of_other_settings_names_the_difference_and_loads_the_target_only_then(
    sharp_target, tmp_path, capsys
):
    tok = word_tokenizer()
    path = tmp_path / "regen.jsonl"
    regenerate_cached(
        path, sharp_target, tok, CONVS, source="x", target_id="t", settings=RegenerateSettings(4)
    )
    other = RegenerateSettings(max_new_tokens=6)
    with pytest.raises(InvalidArgument, match="max_new_tokens 4 in the cache, 6 now"):
        regenerate_cached(path, None, tok, CONVS, source="x", target_id=None, settings=other)
    loads = []

    def load():
        loads.append(1)
        return sharp_target, "t"

    capsys.readouterr()
    regenerate_cached(path, None, tok, CONVS, source="x", target_id=None, settings=other, load_target=load)
    assert loads == [1] and "max_new_tokens 4 in the cache, 6 now); regenerating" in capsys.readouterr().err
    assert json.loads(path.with_name("regen.jsonl.meta.json").read_text())["settings"]["max_new_tokens"] == 6
    regenerate_cached(path, None, tok, CONVS, source="x", target_id=None, settings=other, load_target=load)
    assert loads == [1]  # matched: not loaded again


def test_remote_train_with_a_cache_of_other_settings_regenerates_instead_of_crashing(
    sharp_target, tmp_path, capsys
):
    from test_loop import make_cfg, write_chats

    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.trainer.train import build_run

    target_dir = tmp_path / "target"
    sharp_target.save_pretrained(target_dir)
    word_tokenizer().save_pretrained(target_dir)
    data = write_chats(tmp_path / "chats.jsonl", 6, turns=(1, 1))
    # served from the saved copy, as a deployment loads it: the served fingerprint is the local copy's
    srv = TargetServer(ServeConfig(port=0, model=str(target_dir))).start()
    meta = tmp_path / "out/regenerated.jsonl.meta.json"

    def build(**regen):
        regen = {"regenerate": True, "regen_max_turns": 1, "regen_max_new_tokens": 4, **regen}
        run = build_run(
            make_cfg(tmp_path / "out", str(target_dir), data, target={"url": [srv.url]}, data=regen)
        )
        run.close()
        return capsys.readouterr().err

    try:
        build()  # no cache: the local copy regenerates
        assert json.loads(meta.read_text())["target"]
        err = build(regen_max_new_tokens=5)  # a cache of other settings (this crashed with AttributeError)
        assert "max_new_tokens 4 in the cache, 5 now); regenerating" in err
        assert json.loads(meta.read_text())["settings"]["max_new_tokens"] == 5
        assert "reusing" in build(regen_max_new_tokens=5, regen_batch_size=3)  # not part of a greedy key
    finally:
        srv.stop(grace=0)


def test_regenerate_takes_the_time_limit_of_the_train_config():
    import argparse

    from draftfeed.trainer import cli as trainer_cli

    parser = argparse.ArgumentParser()
    trainer_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["regenerate", "--regen-time-limit", "30", "--data-limit", "4", "--out", "o"])
    cfg = trainer_cli.train_config_from_args(args)
    assert cfg.data.regen_time_limit == 30.0 and cfg.data.limit == 4
