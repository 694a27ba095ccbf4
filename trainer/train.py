"""One training run from a `TrainConfig`: build the pieces, train, export, close.

Build order: join the process group (torchrun), read the data file, get the tokenizer (the server's when
a server URL is given) and the target's config (the in-process target itself when no server URL is given,
else the server's model info), regenerate the conversations when asked (from a cache when one matches),
tokenize them (and the held-out or --val-data conversations the loop validates on, `validation.py`), open
the backend, seed and build the draft (EAGLE-3: token map from the data's supervised tokens), size the
schedule, resume if asked.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from draftfeed.client.errors import InvalidArgument
from draftfeed.client.vocab import TokenCounter

from .algorithms import ALGORITHMS, DistContext, DraftAlgorithm
from .config import TrainConfig, config_to_dict
from .data import (
    HELDOUT_PROMPTS,
    ChatDataset,
    TokenBatchIterator,
    check_chat_template,
    load_sharegpt,
    read_chat_file,
    split_holdout,
    write_heldout_prompts,
)
from .loop import Trainer, TrainResult, init_distributed, latest_checkpoint, resolve_device
from .regenerate import RegenerateSettings, regenerate_cached
from .signals import TrainingInterrupted
from .validation import held_out_batches

__all__ = [
    "TrainingRun",
    "build_run",
    "run_training",
    "load_training_conversations",
    "read_training_conversations",
    "read_conversations",
    "regenerate_all",
    "target_dtype",
    "target_fingerprint",
    "special_ids",
]


# Draft initialisation draws from torch's global RNG: runs started from several threads of one process
# (demo-train, the tests) build their drafts one at a time so each gets exactly its seed's weights.
_INIT_LOCK = threading.Lock()
COUNT_SAMPLE = 4000  # conversations counted for the draft vocab map


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def target_dtype(spec: str, device: torch.device) -> str | None:
    """`auto`: bf16 on GPU, the checkpoint's own dtype on CPU."""
    if spec == "auto":
        return "bfloat16" if device.type == "cuda" else None
    return spec


def special_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]


def read_training_conversations(cfg: TrainConfig) -> list:
    """The data file's (or the packaged ShareGPT) conversations less the held-out ones, which are written
    to the run's directory; a file without a usable conversation is a clear error."""
    return read_conversations(cfg)[0]


def read_conversations(cfg: TrainConfig) -> tuple[list, list]:
    """(training conversations, held-out ones): the held-out ones' first user turns are written to
    OUT/heldout_prompts.jsonl (rank 0); a file without a usable conversation is a clear error."""
    d = cfg.data
    limit = None if d.limit is None else d.limit + d.holdout
    convs = read_chat_file(d.path, limit=limit) if d.path else load_sharegpt(limit=limit)
    convs, held = split_holdout(convs, d.holdout)
    if held and cfg.dist.rank == 0:
        write_heldout_prompts(cfg.out_dir / HELDOUT_PROMPTS, held)
    if not convs:
        raise InvalidArgument(
            f"no usable conversation in {d.path or 'the packaged ShareGPT file'}: a record needs a user turn "
            "followed by an assistant turn (ShareGPT conversations: [{from, value}] or OpenAI messages: "
            "[{role, content}])"
        )
    return convs, held


def load_training_conversations(
    cfg: TrainConfig,
    tokenizer,
    target=None,
    target_id: str | None = None,
    load_target=None,
    convs: list | None = None,
) -> list:
    """The conversations to train on (`convs`: already read by `read_training_conversations`); with
    `data.regenerate`, the target's own answers (cached). `target` None: `load_target()` -> (model,
    fingerprint) loads it if the cache cannot be used."""
    d = cfg.data
    if convs is None:
        convs = read_training_conversations(cfg)
    if not d.regenerate:
        return convs
    settings = RegenerateSettings(
        max_new_tokens=d.regen_max_new_tokens,
        temperature=d.regen_temperature,
        batch_size=d.regen_batch_size,
        max_turns=d.regen_max_turns,
        max_prompt_tokens=d.regen_max_prompt_tokens,
        seed=cfg.seed,
    )
    source = f"{Path(d.path).expanduser().resolve() if d.path else 'sharegpt'} limit={d.limit}"
    source += f" holdout={d.holdout}" if d.holdout else ""
    return regenerate_cached(
        cfg.regen_cache_path(),
        target,
        tokenizer,
        convs,
        source=source,
        target_id=target_id,
        settings=settings,
        load_target=load_target,
        time_limit=d.regen_time_limit,
    )


def regenerate_all(cfg: TrainConfig, tokenizer, model, target_id: str | None) -> tuple[list, list]:
    """(training conversations, held-out validation conversations), both answered by the in-process `model`
    and cached, before any job trains on them (`draftfeed regenerate`, demo-train): the held-out first turns
    first (a few hundred answers, kept even when --regen-time-limit cuts the rest)."""
    from .validation import val_conversations

    convs, held = read_conversations(cfg)
    val = (
        val_conversations(cfg, held, tokenizer, model, target_id) if held and cfg.loop.val_every != 0 else []
    )
    return load_training_conversations(cfg, tokenizer, model, target_id, convs=convs), val


def target_fingerprint(model) -> str:
    from draftfeed.target.fingerprint import fingerprint

    return fingerprint(model)


def served_target_config(backend, local_model: str | None):
    """The config of the target a remote backend serves, from the server's model info (no local read); from
    the local copy (`--target-model`, else the built-in default target) only for a server too old to send it."""
    from transformers import AutoConfig

    served = backend.target_config_dict() if hasattr(backend, "target_config_dict") else None
    if served:
        fields = dict(served)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    from draftfeed.target.loading import default_target_path

    return AutoConfig.from_pretrained(local_model or default_target_path(), local_files_only=True)


def target_tokenizer(cfg: TrainConfig):
    """The target's tokenizer. In process: the local one (`--target-model`, else the built-in default
    target's). Against a server: the one it serves (GetTokenizer, cached under the run's out dir), so no
    local copy of the target is needed; a `--target-model` given as well must hold the same tokenizer
    (compared by digest) and is used. A server too old to serve one: the local one, as before."""
    from draftfeed.client.channel import ChannelSecurity
    from draftfeed.client.errors import FailedPrecondition, Unavailable
    from draftfeed.client.tokenizer import fetch_tokenizer, tokenizer_digest
    from draftfeed.target.loading import load_tokenizer

    t = cfg.target
    if not t.remote:
        return load_tokenizer(t.model)
    local = load_tokenizer(t.model) if t.model else None  # a bad local path is named before any server
    if local is not None:
        check_chat_template(local)  # so is a local tokenizer without a chat template
    kw = t.client_kwargs()
    security = ChannelSecurity(
        kw["ca_file"], kw["client_cert"], kw["client_key"], kw["token"], kw["server_name"]
    )
    served = err = None
    for url in t.url:  # the first server that answers (as the remote backend skips dead ones)
        try:
            served = fetch_tokenizer(
                url, cfg.out_dir / "target_tokenizer", security=security, timeout=t.timeout
            )
            break
        except Unavailable as e:
            err = e
        except FailedPrecondition:  # a server without a tokenizer: only a local copy will do
            if local is None:
                raise
            return local
    else:
        raise err
    if served is None:  # a server older than GetTokenizer
        return local if local is not None else load_tokenizer(None)
    tokenizer, digest = served
    if local is not None and tokenizer_digest(local) != digest:
        raise InvalidArgument(
            f"the tokenizer at --target-model {t.model} is not the one the server at {url} serves (digest "
            f"{tokenizer_digest(local)}, served {digest}): point --target-model at a copy of the served model, "
            "or leave it out to use the server's tokenizer"
        )
    return local if local is not None else tokenizer


@dataclass
class TrainingRun:
    cfg: TrainConfig
    algorithm: DraftAlgorithm
    tokenizer: Any
    target_config: Any
    backend: Any
    trainer: Trainer
    dist: DistContext

    def export(self) -> Path:
        return self.algorithm.export(
            self.trainer.draft, self.cfg.out_dir / "export", self.target_config, self.backend
        )

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.dist.world_size > 1 and tdist.is_initialized():
                tdist.destroy_process_group()


def _count_steps(dataset, cfg: TrainConfig, pad_id: int, dist: DistContext, device) -> int:
    d = cfg.data
    probe = TokenBatchIterator(
        dataset, d.batch_size, d.seq_len, pack=d.pack, seed=cfg.seed, rank=dist.rank,
        world_size=dist.world_size, pad_token_id=pad_id, num_epochs=cfg.loop.epochs,
    )  # fmt: skip
    steps = torch.tensor(sum(1 for _ in probe) // cfg.optim.grad_accum, device=device)
    if dist.world_size > 1:
        tdist.all_reduce(steps, op=tdist.ReduceOp.MIN)
    if int(steps) < 1:
        raise ValueError(
            f"{len(dataset)} conversations give no full optimizer step at --batch-size {d.batch_size} x "
            f"--grad-accum {cfg.optim.grad_accum} per rank; use more data or pass --steps"
        )
    return int(steps)


def build_run(cfg: TrainConfig, *, model=None, target_id: str | None = None) -> TrainingRun:
    """Everything `Trainer.train` needs. `model` (optional) is an already loaded in-process target, used
    for regeneration and, when no server URL is configured, as the backend's target."""
    from draftfeed.target.loading import load_target

    device = resolve_device(cfg.loop.device, cfg.dist.local_rank)
    dist = init_distributed(cfg.dist, device)
    algorithm = ALGORITHMS[cfg.algorithm](cfg)
    # the user's own mistakes (data file, tokenizer path) are named before any server is reached
    convs, held = read_conversations(cfg)
    tokenizer = target_tokenizer(cfg)
    check_chat_template(tokenizer)
    if model is None and not cfg.target.remote:
        model = load_target(cfg.target.model, device=device, dtype=target_dtype(cfg.target.dtype, device))
    target_config = model.config if model is not None else None  # remote: the server tells it below
    if cfg.data.regenerate and dist.world_size > 1 and not cfg.regen_cache_path().is_file():
        raise ValueError(
            f"--regenerate under torchrun needs the regenerated data at {cfg.regen_cache_path()} first: run "
            "`draftfeed regenerate` with the same flags (one process), then train"
        )

    @functools.cache
    def load_local():  # a remote run regenerates with its local copy of the target, loaded only if needed
        if dist.world_size > 1:
            raise ValueError(
                f"--regenerate under torchrun needs the regenerated data at {cfg.regen_cache_path()} made "
                "with the same settings first: run `draftfeed regenerate` with the same flags, then train"
            )
        local = load_target(cfg.target.model, device=device, dtype=target_dtype(cfg.target.dtype, device))
        return local, target_fingerprint(local)

    backend = algorithm.open_backend(None if cfg.target.remote else model, device)
    try:
        if target_config is None:
            target_config = served_target_config(backend, cfg.target.model)
        if target_id is None and cfg.data.regenerate:
            # the regenerated data name the target that wrote them: the served one when training remotely
            servers = getattr(backend, "servers", None) if cfg.target.remote else None
            target_id = (
                servers[0].info.fingerprint
                if servers
                else target_fingerprint(model)
                if model is not None
                else None
            )
        convs = load_training_conversations(cfg, tokenizer, model, target_id, load_local, convs)
        dataset = ChatDataset(convs, tokenizer, cfg.data.seq_len)
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        emb = backend.get_input_embeddings().weight
        if tuple(emb.shape) != (text.vocab_size, text.hidden_size):
            raise ValueError(
                f"the target's embedding is {tuple(emb.shape)} but its config ({cfg.target.model or 'built-in'}) "
                f"says ({text.vocab_size}, {text.hidden_size}); point --target-model at a copy of the served model"
            )
        counts = None
        if algorithm.needs_token_counts(text.vocab_size):
            counter = TokenCounter(text.vocab_size)
            # at most COUNT_SAMPLE conversations, evenly spread: tokenizing all of a large set up front (16k
            # regenerated conversations: minutes on a busy host) would delay the first step for a vocab map
            # that a sample ranks the same way
            step = max(1, -(-len(dataset) // COUNT_SAMPLE))
            for i in range(0, len(dataset), step):
                ids, mask = dataset[i]
                counter.update(torch.from_numpy(ids), torch.from_numpy(mask))
            counts = counter.counts
        with _INIT_LOCK:
            torch.manual_seed(cfg.seed)
            draft = algorithm.build_draft(backend, target_config, counts, special_ids(tokenizer))
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        total = cfg.loop.steps or _count_steps(dataset, cfg, pad_id, dist, device)
        d = cfg.data
        batches = TokenBatchIterator(
            dataset, d.batch_size, d.seq_len, pack=d.pack, seed=cfg.seed, rank=dist.rank,
            world_size=dist.world_size, pad_token_id=pad_id, num_epochs=None if cfg.loop.steps else cfg.loop.epochs,
        )  # fmt: skip
        trainer = Trainer(
            cfg, algorithm, draft, backend, batches, total, device=device, dist=dist,
            val_batches=held_out_batches(
                cfg, held, tokenizer, pad_id, dist, device,
                # held-out answers from an in-process target (one process), or from the local copy a remote
                # run loaded anyway to regenerate; else only from the cache
                target=model if dist.world_size == 1 else None, target_id=target_id,
                load_target=load_local if load_local.cache_info().currsize else None, say=_say,
            ),
        )  # fmt: skip
        resume = latest_checkpoint(cfg.out_dir) if cfg.loop.resume == "auto" else cfg.loop.resume
        if resume:
            trainer.load_checkpoint(resume)
            _say(f"resumed from {resume} at step {trainer.step}/{total}")
    except BaseException:
        backend.close()
        raise
    if dist.rank == 0:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        _say(
            f"{cfg.algorithm}: {len(dataset)} conversations, {total} steps of {d.batch_size}x{d.seq_len} tokens "
            f"x{cfg.optim.grad_accum} accum x{dist.world_size} ranks, target "
            f"{', '.join(cfg.target.url) if cfg.target.remote else 'in-process'}, device {device}"
        )
    return TrainingRun(cfg, algorithm, tokenizer, target_config, backend, trainer, dist)


def run_training(cfg: TrainConfig, **build_kwargs) -> TrainResult:
    """Build, train, export (rank 0), close. A run stopped by SIGINT / SIGTERM after a step exports too
    (`TrainingInterrupted.export`): a job stopped at its deadline leaves a draft to evaluate, not only a
    checkpoint to resume."""
    run = build_run(cfg, **build_kwargs)
    try:
        try:
            result = run.trainer.train()
        except TrainingInterrupted as err:
            if cfg.loop.export and run.dist.rank == 0 and err.step:
                err.export = run.export()
            raise
        if cfg.loop.export and run.dist.rank == 0:
            _say(f"exported the draft to {run.export()}")
        return result
    finally:
        run.close()
