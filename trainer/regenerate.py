"""Regenerate the assistant turns of chat data with the target itself, as draft-training practice does
(a draft should learn the target's own distribution, not the one that wrote the dataset).

Turn by turn: every conversation's user turn r is put after the target's own earlier answers, the
prompts are rendered with the chat template, sorted by length, left-padded and generated in batches:
greedy through `fast_decode.greedy_generate` (static KV cache, one CUDA graph per batch shape), sampled
at `temperature` through HF `generate` with a seed per batch. A conversation stops at a turn
whose prompt is longer than `max_prompt_tokens` or whose answer comes out empty; conversations without
any answer are dropped. The result is cached as OpenAI-style JSONL (`{"messages": [...]}`) next to a
`.meta.json` naming the source, the target and the settings that change the answers (greedy answers do
not depend on the batch size, the seed or top_p, so those are left out of a greedy cache's key); a later
call with the same ones reads the cache instead of generating. A cache made under other settings is
regenerated, saying which setting differs; a caller that has not loaded the target (a remote run) passes
`load_target` to load it only then, and its unknown target (`target_id=None`) is not compared.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from draftfeed.client.errors import InvalidArgument

from .data import check_chat_template, read_chat_file
from .fast_decode import greedy_generate

__all__ = [
    "RegenerateSettings",
    "regenerate",
    "regenerate_cached",
    "cache_settings",
    "cache_differences",
    "write_chat_jsonl",
]

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class RegenerateSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 16
    max_turns: int | None = None
    max_prompt_tokens: int = 1024
    seed: int = 0


def _prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _generate(
    model, tokenizer, prompts: list[list[int]], settings: RegenerateSettings, seed: int
) -> list[str]:
    """Answers (decoded, stripped) for token-id prompts, one batch, left-padded."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if settings.temperature <= 0:  # greedy: the static-cache, CUDA-graphed generator
        rows = greedy_generate(model, prompts, settings.max_new_tokens, [tokenizer.eos_token_id], pad)
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    sampled = settings.temperature > 0
    gen = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampled,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} if sampled else {}),
    )
    rng = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen)
    finally:
        torch.set_rng_state(rng)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.cpu()]


def regenerate(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    settings: RegenerateSettings = RegenerateSettings(),
    log=None,
    time_limit: float | None = None,
) -> list[Conversation]:
    """Conversations whose assistant turns are the target's own answers (system and user turns kept).

    With `time_limit` (seconds), no batch starts after it: the conversations keep the turns answered so far
    (turn by turn: every first turn is answered before any second one)."""
    check_chat_template(tokenizer)
    states: list[Conversation] = []
    users: list[list[str]] = []
    for conv in conversations:
        states.append([m for m in conv if m["role"] == "system"][:1])
        users.append([m["content"] for m in conv if m["role"] == "user"])
    active = [i for i, u in enumerate(users) if u]
    turns = max((len(u) for u in users), default=0)
    if settings.max_turns is not None:
        turns = min(turns, settings.max_turns)
    done_batches = 0
    start = time.perf_counter()
    for turn in range(turns):
        items, prompts = [], []
        for i in active:
            if turn >= len(users[i]):
                continue
            messages = states[i] + [{"role": "user", "content": users[i][turn]}]
            ids = _prompt_ids(tokenizer, messages)
            if len(ids) <= settings.max_prompt_tokens:
                items.append(i)
                prompts.append(ids)
        order = sorted(range(len(items)), key=lambda j: len(prompts[j]))
        kept = []
        for b in range(0, len(order), settings.batch_size):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                if log is not None:
                    log(f"regenerate: time limit of {time_limit:.0f} s reached in turn {turn + 1}")
                break
            chunk = order[b : b + settings.batch_size]
            answers = _generate(
                model,
                tokenizer,
                [prompts[j] for j in chunk],
                settings,
                seed=settings.seed * 100003 + done_batches,
            )
            done_batches += 1
            for j, text in zip(chunk, answers, strict=True):
                i = items[j]
                if text:
                    states[i] += [
                        {"role": "user", "content": users[i][turn]},
                        {"role": "assistant", "content": text},
                    ]
                    kept.append(i)
            if log is not None:
                log(
                    f"regenerate: turn {turn + 1}/{turns}, {min(b + len(chunk), len(order))}/{len(order)} prompts "
                    f"({time.perf_counter() - start:.0f} s)"
                )
        active = sorted(kept)
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
    return [s for s in states if any(m["role"] == "assistant" for m in s)]


def write_chat_jsonl(path: str | Path, conversations: Sequence[Conversation]) -> None:
    """OpenAI-style JSONL, written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def cache_settings(settings: RegenerateSettings) -> dict:
    """The settings that change the regenerated answers (the cache key's part): greedy answers do not
    depend on the batch size, the seed or top_p; sampled ones do (each batch draws from its own seed)."""
    key = asdict(settings)
    if settings.temperature == 0:
        for name in ("batch_size", "seed", "top_p"):
            key.pop(name)
    return key


def cache_differences(cached: dict, wanted: dict) -> list[str]:
    """What differs between a cache's meta and the wanted one, in words; `wanted["target"]` None is
    not compared (the target was not loaded), nor are cached settings the wanted key leaves out."""
    out = []
    for name in ("source", "num_input", "target"):
        if name == "target" and wanted[name] is None:
            continue
        if cached.get(name) != wanted[name]:
            out.append(f"{name} {cached.get(name)!r} in the cache, {wanted[name]!r} now")
    old = cached.get("settings") if isinstance(cached.get("settings"), dict) else {}
    for name, value in wanted["settings"].items():
        if old.get(name, "unset") != value:
            out.append(f"{name} {old.get(name, 'unset')!r} in the cache, {value!r} now")
    return out


def regenerate_cached(
    path: str | Path,
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    *,
    source: str,
    target_id: str | None,
    settings: RegenerateSettings = RegenerateSettings(),
    load_target: Callable[[], tuple[object, str]] | None = None,
    time_limit: float | None = None,
) -> list[Conversation]:
    """`regenerate`, cached at `path`: reused when its meta file names the same source, target and the
    settings that change the answers (`cache_settings`), and `time_limit` when one is given.

    `source` identifies the input conversations (e.g. the file and the limit); `target_id` the target (e.g.
    its fingerprint; None: unknown, not compared). `model` None: `load_target()` -> (model, target_id) is
    called when the cache cannot be used."""
    path = Path(path).expanduser()
    meta_path = path.with_name(path.name + ".meta.json")
    meta = {
        "source": source,
        "target": target_id,
        "num_input": len(conversations),
        "settings": cache_settings(settings),
    }
    if time_limit is not None:
        meta["time_limit"] = time_limit
    if path.is_file():
        try:
            cached = json.loads(meta_path.read_text())
            differs = (
                cache_differences(cached, meta) if isinstance(cached, dict) else ["an unreadable meta file"]
            )
        except (OSError, json.JSONDecodeError):
            differs = [f"no readable {meta_path.name}"]
        if not differs:
            print(f"regenerate: reusing {path}", file=sys.stderr, flush=True)
            return read_chat_file(path)
        why = "; ".join(differs)
        if model is None and load_target is None:
            raise InvalidArgument(
                f"the regenerated data at {path} were made under other settings ({why}) and no target is "
                "loaded to regenerate them: use the same settings, or another --regen-cache file"
            )
        print(
            f"regenerate: {path} was made under other settings ({why}); regenerating",
            file=sys.stderr,
            flush=True,
        )
    if model is None:
        if load_target is None:
            raise InvalidArgument(f"no regenerated data at {path} and no target loaded to make them")
        model, target_id = load_target()
        meta["target"] = target_id
    out = regenerate(
        model,
        tokenizer,
        conversations,
        settings,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        time_limit=time_limit,
    )
    write_chat_jsonl(path, out)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out
