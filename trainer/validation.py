"""Validation while training: the draft's loss and metrics (EAGLE-3's simulated tau, the block drafts'
acceptance) on conversations it never trains on, measured through the same target backend as training.

The held-out set is what `draftfeed eval` decodes on: the first turns of the `--data-holdout`
conversations, answered by the target itself when the run regenerates its data, so the draft is scored on
the target's own continuations, which is what decoding sees. For EAGLE-3, `val_tau_decode` replays greedy
speculative decoding of the first `--val-answer-tokens` of those answers from the TTT unroll
(`losses.decode_walk`: K = the unroll's steps); it predicts `draftfeed eval --max-new-tokens` (the same
number) on the same prompts, where the trainer's slot-averaged `tau_sim` reads high
(tests/test_validation.py: 3.11 against a decoded 3.16, tau_sim 3.71). The cap matters: a small target's
answers turn repetitive as they grow, so a walk over longer answers than the eval decodes reads high
(bench/answer_repetition.py). `--val-data FILE` names conversations to use as they are instead, e.g. the `<regen cache>.heldout.jsonl` written by
`draftfeed regenerate --data-holdout N`.

A validation leaves training exactly as it was: the global RNG and the algorithm's own state (the block
drafts' anchor generator) are restored afterwards, and the loop's clock for the tokens/s it logs does not
count it. The forward runs without autograd (no activations kept); the compiled kernels run inside autograd
Functions, whose forward is gradient-free either way, so they are not compiled a second time.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as tdist

from draftfeed.client.errors import InvalidArgument

from .data import ChatDataset, TokenBatch, TokenBatchIterator, read_chat_file

__all__ = ["first_turns", "val_conversations", "val_batches", "held_out_batches", "measure"]

Conversation = list[dict[str, str]]


def first_turns(convs: Sequence[Conversation]) -> list[Conversation]:
    """Each conversation up to its first assistant answer (a system turn before it is kept)."""
    out = []
    for conv in convs:
        end = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), None)
        if end is not None and any(m["role"] == "user" for m in conv[:end]):
            out.append(list(conv[: end + 1]))
    return out


def val_conversations(cfg, held: Sequence[Conversation], tokenizer, target=None, target_id=None,
                      load_target=None) -> list[Conversation]:  # fmt: skip
    """The conversations to validate on: `--val-data` as they are; else the held-out conversations' first
    turns, answered by the target (cached at `cfg.heldout_regen_path()`) when the run regenerates."""
    from .regenerate import RegenerateSettings, regenerate_cached

    d = cfg.data
    if d.val_path:
        convs = read_chat_file(d.val_path)
        if not convs:
            raise InvalidArgument(
                f"--val-data {d.val_path}: no usable conversation (a user turn followed by an assistant turn)"
            )
        return convs
    convs = first_turns(held)
    if not convs or not d.regenerate:
        return convs
    settings = RegenerateSettings(
        max_new_tokens=d.regen_max_new_tokens,
        temperature=d.regen_temperature,
        batch_size=d.regen_batch_size,
        max_turns=1,
        max_prompt_tokens=d.regen_max_prompt_tokens,
        seed=cfg.seed,
    )
    return regenerate_cached(
        cfg.heldout_regen_path(),
        target,
        tokenizer,
        convs,
        source=f"heldout of {d.path or 'sharegpt'} limit={d.limit} holdout={d.holdout}",
        target_id=target_id,
        settings=settings,
        load_target=load_target,
    )


def val_batches(convs: Sequence[Conversation], tokenizer, cfg, pad_id: int, dist,
                device: torch.device | str = "cpu") -> list[TokenBatch]:  # fmt: skip
    """At most `--val-batches` full batches of the training shape (a final partial batch is left out), the
    same number on every rank (the block drafts' loss denominators are all-reduced over ranks)."""
    d = cfg.data
    if len(convs) < dist.world_size:
        raise InvalidArgument(
            f"{len(convs)} validation conversations for {dist.world_size} ranks: hold out more "
            "(--data-holdout) or give a larger --val-data file"
        )
    it = TokenBatchIterator(
        ChatDataset(convs, tokenizer, d.seq_len), d.batch_size, d.seq_len, pack=d.pack, seed=cfg.seed,
        rank=dist.rank, world_size=dist.world_size, pad_token_id=pad_id, num_epochs=1,
    )  # fmt: skip
    try:
        batches = list(itertools.islice(it, cfg.loop.val_batches))
    except ValueError:  # no supervised token within seq_len in this rank's shard
        batches = []
    n = torch.tensor(len(batches))
    if dist.world_size > 1:  # on the rank's device: NCCL reduces CUDA tensors only
        n = n.to(device)
        tdist.all_reduce(n, op=tdist.ReduceOp.MIN)
    if int(n) == 0:
        raise InvalidArgument(
            f"the {len(convs)} validation conversations fill no batch of --batch-size {d.batch_size} x "
            f"--seq-len {d.seq_len}{' per rank' if dist.world_size > 1 else ''}: hold out more (--data-holdout) "
            "or give a larger --val-data file, or pass --val-every 0 to train without validation"
        )
    return batches[: int(n)]


def held_out_batches(cfg, held, tokenizer, pad_id: int, dist, device, target=None, target_id=None,
                     load_target=None, say=print) -> list[TokenBatch]:  # fmt: skip
    """The batches the loop validates on ([] = no validation). Asked for (`--val-data`, `--val-every N`), a
    validation that cannot be made is an error; by default (only `--data-holdout`) it is skipped with a line
    that says why. The held-out answers are made with an in-process target (`target`, or `load_target` when
    the run already loads one to regenerate); a remote run without them in the cache does not load a local
    copy of the target for a few hundred answers: `draftfeed regenerate` with the same data flags makes them."""
    if cfg.loop.val_every == 0 or not (held or cfg.data.val_path):
        return []
    asked = cfg.data.val_path is not None or cfg.loop.val_every is not None
    try:
        convs = val_conversations(cfg, held, tokenizer, target, target_id, load_target)
        return val_batches(convs, tokenizer, cfg, pad_id, dist, device)
    except InvalidArgument as err:
        if asked:
            raise
        say(
            f"validation off: {err} (`draftfeed regenerate` with this run's --data / --data-holdout flags "
            "answers the held-out prompts; --val-data FILE names others)"
        )
        return []


def measure(algorithm, draft, backend, batches: Sequence[TokenBatch], *, device: torch.device, dist,
            autocast: bool, prefetch: int, answer_tokens: int | None = None) -> dict[str, float]:  # fmt: skip
    """The draft's metrics over `batches` (mean over batches and ranks) with `val_tokens` and `val_seconds`;
    keys prefixed `val_`. Training state (RNG, the algorithm's generator, gradients) is left as it was."""
    from .loop import _rng_state, _set_rng_state

    t0 = time.perf_counter()
    rng, own = _rng_state(), algorithm.state_dict()
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    walk = [0, 0]  # decoding rounds, tokens (EAGLE-3: losses.decode_walk)
    pending: deque = deque()
    todo = iter(batches)
    try:
        while True:
            while len(pending) < prefetch and (tb := next(todo, None)) is not None:
                with torch.no_grad():
                    pending.append((tb, backend.generate_batch_async(**tb.backend_kwargs())))
            if not pending:
                break
            tb, future = pending.popleft()
            target = future.result().to(device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext():
                out = algorithm.loss(draft, target, dist)
            metrics = {"loss": out.loss, **out.metrics}
            if out.decode_walk is not None:
                r, t = out.decode_walk(answer_tokens)
                walk[0] += r
                walk[1] += t
            del out
            for k, m in metrics.items():
                sums[k] = sums.get(k, 0) + m.float().reshape(())
            tokens += int(tb.attention_mask.sum())
    finally:
        for _, future in pending:
            future.cancel()
        _set_rng_state(rng)
        algorithm.load_state_dict(own)
    keys = sorted(sums)
    local = torch.stack(
        [sums[k].double().cpu() / len(batches) for k in keys]
        + [torch.tensor(float(x)) for x in (*walk, tokens)]
    )
    if dist.world_size > 1:
        local = local.to(device if device.type == "cuda" else "cpu")
        tdist.all_reduce(local)
        local[: len(keys)] /= dist.world_size
    values = local.cpu().tolist()
    record = {f"val_{k}": v for k, v in zip(keys, values[: len(keys)], strict=True)}
    rounds, committed = values[len(keys)], values[len(keys) + 1]
    if rounds:  # tokens per round of greedy speculative decoding of these answers (K = the unroll's steps)
        record["val_tau_decode"] = committed / rounds
    record["val_tokens"] = int(values[-1])
    record["val_seconds"] = time.perf_counter() - t0
    return record
