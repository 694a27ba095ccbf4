"""`draftfeed demo-train`: what a new user runs first.

It loads the built-in default target (SmolLM2-135M-Instruct), serves it on a free local port, regenerates
the first turns of a few ShareGPT conversations with it, and trains an EAGLE-3 and a DSpark draft at the
same time against that one server (two threads, each its own job and session, the same path as
`draftfeed train eagle3|dspark --target grpc://...`), exports both, and measures the real acceptance
length tau on MT-Bench for each, next to untrained drafts of the same shapes. The default fits a 2-core
CPU in a few minutes; `--gpu` trains longer.

`train_concurrently` and `measure_exports` are what `bench/tau_three_algorithms.py` reuses for its
three-algorithm table.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import HELDOUT_PROMPTS

__all__ = ["DemoSettings", "demo_configs", "train_concurrently", "measure_exports", "run_demo_train"]

NAMES = {"eagle3": "EAGLE-3", "dflash": "DFlash", "dspark": "DSpark"}


@dataclass(frozen=True)
class DemoSettings:
    """CPU default: a few minutes on a 2-core VM (measurements in bench/results/tau_three_algorithms_cpu_*.md).
    `gpu()`: the EAGLE-3 recipe measured on an H100 (bench/results/eagle3_train_2026-11-23.md: 185 s
    regeneration, ~3 min of training, tau 1.5 on MT-Bench) with DSpark at AutoModel's Qwen3-0.6B recipe
    (5 layers, block 7, 512 anchors, Markov rank 256) beside it; both stop at `time_limit`."""

    conversations: int | None = 80  # ShareGPT conversations read (None: all; long prompts are dropped)
    holdout: int = 0  # the last conversations read, never trained on: a held-out prompt set
    regen_max_new_tokens: int = 96
    regen_max_prompt_tokens: int = 160
    regen_batch_size: int = 20
    regen_max_turns: int | None = 1  # None: every user turn
    regen_time_limit: float | None = None
    seq_len: int = 512
    batch_size: int = 1  # EAGLE-3 rows per step (the block drafts take one row: their step is larger)
    steps: int = 40
    time_limit: float | None = None  # seconds of training per job
    prefetch: int = 2
    # EAGLE-3
    draft_vocab_size: int = 2048
    ttt_steps: int = 3
    lr: float = 1e-3
    num_draft_tokens: int = 7  # chain K at evaluation (max tau K + 1)
    # block drafts (DSpark; DFlash in the bench)
    block_size: int = 7  # DSpark drafts bs tokens per block (max tau bs + 1); DFlash bs - 1
    block_layers: int = 1
    num_anchors: int = 32
    markov_rank: int = 64
    block_lr: float = 3e-3
    # evaluation
    eval_prompts: int = 5  # MT-Bench first turns
    eval_max_new_tokens: int = 40
    confidence_threshold: float = 0.0  # DSpark early stop (0 = off)

    @classmethod
    def gpu(cls) -> DemoSettings:
        """recipes/eagle3-gpu.yaml and recipes/dspark-gpu.yaml (bench/results/draft_quality_*.md)."""
        return cls(
            conversations=None,
            holdout=200,
            regen_max_new_tokens=256,
            regen_max_prompt_tokens=1024,
            regen_batch_size=512,
            regen_max_turns=None,
            regen_time_limit=150.0,
            seq_len=2048,
            batch_size=8,
            steps=4000,  # ~10 epochs of EAGLE-3 at 8 x 2048; the time limit paces the schedule when it ends first
            time_limit=300.0,
            prefetch=4,
            draft_vocab_size=8192,
            ttt_steps=7,
            lr=1e-3,
            block_layers=5,
            num_anchors=512,
            markov_rank=256,
            block_lr=6e-4,
            eval_prompts=20,
            eval_max_new_tokens=128,
        )

    def replace(self, **changes) -> DemoSettings:
        return dataclasses.replace(self, **changes)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def demo_configs(s: DemoSettings, out_dir: Path, url: str, algorithms: Sequence[str], device: str) -> dict:
    """algorithm -> TrainConfig: the same data (regenerated once, cached), steps and server for each job."""
    from .config import (
        BlockConfig,
        DataConfig,
        DSparkTrainConfig,
        Eagle3Config,
        LoopConfig,
        OptimConfig,
        TargetConfig,
        TrainConfig,
    )

    data = DataConfig(
        limit=s.conversations,
        holdout=s.holdout,
        seq_len=s.seq_len,
        pack=True,
        regenerate=True,
        regen_max_new_tokens=s.regen_max_new_tokens,
        regen_max_prompt_tokens=s.regen_max_prompt_tokens,
        regen_batch_size=s.regen_batch_size,
        regen_max_turns=s.regen_max_turns,
        regen_time_limit=s.regen_time_limit,
        regen_cache=str(
            Path("~/.cache/draftfeed/demo").expanduser()
            / f"sharegpt-{s.conversations or 'all'}-{s.regen_max_new_tokens}-{device}.jsonl"
        ),
    )
    out = {}
    for alg in algorithms:
        block = alg in ("dflash", "dspark")
        out[alg] = TrainConfig(
            out=str(out_dir / alg),
            algorithm=alg,
            target=TargetConfig(url=[url], job_name=f"demo-train-{alg}"),
            data=dataclasses.replace(data, batch_size=1 if block else s.batch_size),
            eagle3=Eagle3Config(draft_vocab_size=s.draft_vocab_size, ttt_steps=s.ttt_steps),
            block=BlockConfig(
                block_size=s.block_size + (1 if alg == "dflash" else 0),  # the same number of drafts
                num_anchors=s.num_anchors,
                num_layers=s.block_layers,
            ),
            dspark=DSparkTrainConfig(markov_rank=s.markov_rank),
            optim=OptimConfig(lr=s.block_lr if block else s.lr),
            loop=LoopConfig(
                steps=s.steps,
                time_limit=s.time_limit,
                prefetch=s.prefetch,
                log_every=max(1, s.steps // 10),
                val_answer_tokens=s.eval_max_new_tokens,  # what its eval decodes
            ),
        )
    return out


def train_concurrently(cfgs: dict, model, target_id: str, threads_per_job: int | None = None) -> dict:
    """Run `run_training` for every config at once, one thread each (each its own session on the
    server); the regenerated data and the held-out answers the jobs validate on are made once first.
    algorithm -> TrainResult; a failed job re-raises.
    `threads_per_job` sets torch's intra-op threads meanwhile (1 keeps two CPU jobs off each other's cores)."""
    from draftfeed.target.loading import load_tokenizer

    from .train import regenerate_all, run_training

    first = next(iter(cfgs.values()))
    if first.data.regenerate:  # the jobs read both from the cache
        regenerate_all(first, load_tokenizer(first.target.model), model, target_id)
    results, errors = {}, {}

    def job(alg, cfg):
        try:
            results[alg] = run_training(cfg, model=model, target_id=target_id)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors[alg] = err

    before = torch.get_num_threads()
    if threads_per_job:
        torch.set_num_threads(threads_per_job)
    try:
        workers = [threading.Thread(target=job, args=item, name=f"train-{item[0]}") for item in cfgs.items()]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(before)
    for alg, err in errors.items():
        raise RuntimeError(f"the {alg} job failed: {err}") from err
    return results


def measure_exports(
    model, tokenizer, exports: dict, prompts, *, num_draft_tokens: int, max_new_tokens: int,
    untrained: bool = True, confidence_threshold: float = 0.0, on_row=None, speedup: bool = False,
) -> list:  # fmt: skip
    """tau of each exported draft (label -> directory) on `prompts` (token ids), plus, with `untrained`,
    each algorithm's draft re-initialised (same shapes). Returns TauResults named by label; `on_row(rows)`
    is called with the rows so far after each one (a caller writes partial results as they come)."""
    from .evaluate import (
        TargetVerifier,
        eos_token_ids,
        make_drafter,
        measure_speedup,
        measure_tau,
        reinitialize,
    )
    from .export import load_draft

    device = next(model.parameters()).device
    eos = eos_token_ids(tokenizer, model)
    rows = []
    for label, path in exports.items():
        variants = [(label, False)] + ([(f"{label} untrained", True)] if untrained else [])
        for name, fresh in variants:
            exp = load_draft(path, model, device=device, dtype=model.dtype)
            if fresh:
                reinitialize(exp.draft)
            drafter = make_drafter(exp.algorithm, exp.draft, confidence_threshold)
            k = num_draft_tokens if exp.algorithm == "eagle3" else drafter.max_drafts
            if speedup:  # both loops, graphed: tau, tokens/s and the speedup
                r = measure_speedup(
                    model, exp.draft, exp.algorithm, exp.layer_ids, prompts, k, max_new_tokens, eos, name,
                    confidence_threshold=confidence_threshold,
                )  # fmt: skip
            else:
                r = measure_tau(
                    TargetVerifier(model, exp.layer_ids, exp.algorithm), drafter, prompts, k, max_new_tokens, eos,
                    name, algorithm=exp.algorithm,
                )  # fmt: skip
            _say(f"{name}: tau {r.tau:.3f} ({r.rounds} rounds, {r.seconds:.0f} s)")
            rows.append(r)
            if on_row is not None:
                on_row(list(rows))
            del exp, drafter
    return rows


def run_demo_train(s: DemoSettings = DemoSettings(), out: str | None = None) -> int:
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.target.loading import load_target, load_tokenizer

    from .evaluate import load_prompt_sets

    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="draftfeed-demo-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else None
    start = time.perf_counter()
    model = load_target(None, device=device, dtype=dtype)
    tokenizer = load_tokenizer(None)
    server = TargetServer(ServeConfig(port=0, device=device), model=model, tokenizer=tokenizer).start()
    _say(f"server: {type(model).__name__} on {server.url} ({device}); output in {out_dir}")
    algorithms = ("eagle3", "dspark")
    try:
        cfgs = demo_configs(s, out_dir, server.url, algorithms, device)
        results = train_concurrently(cfgs, model, server.info.fingerprint, threads_per_job=None)
        train_s = time.perf_counter() - start
    finally:
        server.stop(grace=1)
    served = {}  # job name -> (tokens, bytes) the server sent it, over all its sessions
    for sess in [*server.sessions.finished, *server.sessions.list()]:
        t, b = served.get(sess.job_name, (0, 0))
        served[sess.job_name] = (t + sess.stats.tokens, b + sess.stats.bytes_sent)
    prompts = load_prompt_sets(["mtbench"], tokenizer, s.eval_prompts)["mtbench"]
    rows = measure_exports(
        model, tokenizer, {NAMES[a]: out_dir / a / "export" for a in algorithms}, prompts,
        num_draft_tokens=s.num_draft_tokens, max_new_tokens=s.eval_max_new_tokens,
        confidence_threshold=s.confidence_threshold, speedup=True,
    )  # fmt: skip
    held_rows = []
    held_file = out_dir / algorithms[0] / HELDOUT_PROMPTS
    if s.holdout and held_file.is_file():  # the held-out ShareGPT prompts: trained drafts only
        held = load_prompt_sets([str(held_file)], tokenizer, s.eval_prompts)[str(held_file)]
        held_rows = measure_exports(
            model, tokenizer, {NAMES[a]: out_dir / a / "export" for a in algorithms}, held,
            num_draft_tokens=s.num_draft_tokens, max_new_tokens=s.eval_max_new_tokens,
            confidence_threshold=s.confidence_threshold, speedup=True, untrained=False,
        )  # fmt: skip
    by_name = {r.name: r for r in rows}
    print(
        "\nEAGLE-3 and DSpark drafts for SmolLM2-135M-Instruct, trained at the same time against one server:"
    )
    for a in algorithms:
        r = results[a]
        tokens, nbytes = served.get(cfgs[a].target.job_name, (0, 0))
        print(
            f"  {NAMES[a]:8s} {r.steps} steps, {r.tokens:,} tokens in {r.seconds:.0f} s; server sent "
            f"{tokens:,} tokens ({tokens / max(r.seconds, 1e-9):,.0f} tok/s, "
            f"{nbytes / max(tokens, 1):,.0f} bytes/token)"
        )
    print(f"  ({train_s:.0f} s with loading, data regeneration and both jobs)")
    print(f"\ntau on {len(prompts)} MT-Bench prompts (greedy, {s.eval_max_new_tokens} new tokens each):")
    print(f"  {'draft':8s}  {'proposal':16s}  {'max tau':>7s}  {'untrained':>9s}  {'trained':>7s}")
    for a in algorithms:
        t, u = by_name[NAMES[a]], by_name[f"{NAMES[a]} untrained"]
        how = f"chain of {t.k}" if a == "eagle3" else f"block of {t.k}"
        print(f"  {NAMES[a]:8s}  {how:16s}  {t.k + 1:7d}  {u.tau:9.3f}  {t.tau:7.3f}")
    print("\nspeedup over the target alone (greedy, the same tokens checked; CUDA graphs on GPU):")
    print(
        f"  {'draft':8s}  {'prompts':18s}  {'tau':>6s}  {'alone tok/s':>11s}  {'draft tok/s':>11s}  {'speedup':>7s}  identical"
    )
    for label, rs in (("MT-Bench", rows), ("held-out ShareGPT", held_rows)):
        for r in rs:
            if r.name in {NAMES[a] for a in algorithms}:
                print(
                    f"  {r.name:8s}  {label:18s}  {r.tau:6.3f}  {r.base_tok_s:11.0f}  {r.spec_tok_s:11.0f}  "
                    f"{r.speedup:6.2f}x  {r.identical}/{r.prompts}"
                )
    print(f"\nexported drafts: {out_dir}/{{{','.join(algorithms)}}}/export  (draftfeed eval --draft DIR)")
    return 0
