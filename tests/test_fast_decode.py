"""Static-cache greedy decoding (trainer/fast_decode.py): batched, left-padded generation equals plain greedy
decoding without a cache; the grouped-KV attention equals HF's; the regeneration time limit; the held-out split."""

from __future__ import annotations

import json

import pytest
import torch

from draftfeed.trainer.data import split_holdout, write_heldout_prompts
from draftfeed.trainer.fast_decode import gqa_attention, greedy_generate


@torch.no_grad()
def plain_greedy(model, ids, n, eos):
    ids, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(t)
        ids.append(t)
        if t in eos:
            break
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_batched_static_greedy_equals_plain_greedy(tiny_model, family):
    model = tiny_model(family)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    ref = [plain_greedy(model, p, 9, set()) for p in prompts]
    eos = ref[2][3]  # row 2 stops by its 4th token (kept), the others may stop too
    want = [plain_greedy(model, p, 9, {eos}) for p in prompts]
    assert greedy_generate(model, prompts, 9, [eos], pad_id=0, check_every=2) == want
    assert len(want[2]) <= 4 and want[2][-1] == eos


def test_gqa_attention_equals_repeated_heads():
    torch.manual_seed(0)
    b, h, kvh, m, length, d = 2, 6, 2, 3, 7, 4
    q, k, v = torch.randn(b, h, m, d), torch.randn(b, kvh, length, d), torch.randn(b, kvh, length, d)
    mask = torch.zeros(b, 1, m, length).masked_fill_(
        torch.rand(b, 1, m, length) < 0.3, torch.finfo(torch.float32).min
    )
    mask[..., 0] = 0  # every query sees at least one key
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1), attn_mask=mask
    )
    out, _ = gqa_attention(None, q, k, v, mask)
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_regeneration_time_limit_keeps_the_answered_turns(tiny_model):
    from test_loop import word_tokenizer

    from draftfeed.trainer.regenerate import RegenerateSettings, regenerate

    convs = [[{"role": "user", "content": "the quick fox"}, {"role": "assistant", "content": "x"}]] * 3
    got = regenerate(
        tiny_model("llama"),
        word_tokenizer(),
        convs,
        RegenerateSettings(max_new_tokens=3, batch_size=1),
        time_limit=0.0,
    )
    assert got == []  # the limit is checked before each batch: nothing starts after it


def test_holdout_split_and_prompt_file(tmp_path):
    convs = [[{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(5)]  # fmt: skip
    train, held = split_holdout(convs, 2)
    assert train == convs[:3] and held == convs[3:]
    assert split_holdout(convs, 0) == (convs, [])
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        split_holdout(convs, 5)
    write_heldout_prompts(tmp_path / "h.jsonl", held)
    rows = [json.loads(x) for x in (tmp_path / "h.jsonl").read_text().splitlines()]
    assert rows == [
        {"messages": [{"role": "user", "content": "q3"}]},
        {"messages": [{"role": "user", "content": "q4"}]},
    ]
