"""`draftfeed demo-train`: what a new user runs first.

It loads the built-in default target (SmolLM2-135M-Instruct), serves it on a free local port, regenerates
the first turns of a few ShareGPT conversations with it, trains an EAGLE-3 draft against the server
through the remote client (the same path as `draftfeed train eagle3 --target grpc://...`), exports it,
and measures the real acceptance length tau on MT-Bench next to an untrained draft with the same vocab
map. The default fits a 2-core CPU laptop in a few minutes; `--gpu` trains longer.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DemoSettings", "run_demo_train"]


@dataclass(frozen=True)
class DemoSettings:
    """CPU default: about 5 minutes on a 2-core VM (there, 40 conversations / 40 steps took 3.6 min: 32 s
    regeneration, 72 s training at ~250 tok/s, 100 s evaluation; tau 1.15 vs 1.00 untrained). `gpu()`: the
    recipe measured on an H100 (bench/results/eagle3_train_2026-11-23.md: 185 s regeneration, ~3 min of
    training, tau 1.5 on MT-Bench)."""

    conversations: int = 80  # ShareGPT conversations read (long prompts are dropped afterwards)
    regen_max_new_tokens: int = 96
    regen_max_prompt_tokens: int = 160
    regen_batch_size: int = 20
    seq_len: int = 512
    draft_vocab_size: int = 2048
    ttt_steps: int = 3
    steps: int = 70
    lr: float = 1e-3
    prefetch: int = 2
    eval_prompts: int = 6  # MT-Bench first turns
    eval_max_new_tokens: int = 48
    num_draft_tokens: int = 3

    @classmethod
    def gpu(cls) -> DemoSettings:
        return cls(
            conversations=3000,
            regen_max_new_tokens=256,
            regen_max_prompt_tokens=512,
            regen_batch_size=256,
            seq_len=2048,
            draft_vocab_size=8192,
            ttt_steps=4,
            steps=1500,
            lr=5e-4,
            prefetch=4,
            eval_prompts=20,
            eval_max_new_tokens=128,
            num_draft_tokens=4,
        )

    def replace(self, **changes) -> DemoSettings:
        return dataclasses.replace(self, **changes)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo_train(s: DemoSettings = DemoSettings(), out: str | None = None) -> int:
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.server.loading import load_target, load_tokenizer

    from .config import DataConfig, Eagle3Config, LoopConfig, OptimConfig, TargetConfig, TrainConfig
    from .evaluate import Eagle3ChainDrafter, TargetVerifier, eos_token_ids, load_prompt_sets, measure_tau
    from .export import load_eagle3
    from .train import run_training

    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="draftfeed-demo-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else None
    start = time.perf_counter()
    model = load_target(None, device=device, dtype=dtype)
    tokenizer = load_tokenizer(None)
    server = TargetServer(ServeConfig(port=0, device=device), model=model).start()
    _say(f"server: {type(model).__name__} on {server.url} ({device}); output in {out_dir}")
    try:
        cfg = TrainConfig(
            out=str(out_dir),
            target=TargetConfig(url=[server.url], job_name="demo-train-eagle3"),
            data=DataConfig(
                limit=s.conversations,
                seq_len=s.seq_len,
                pack=True,
                regenerate=True,
                regen_max_new_tokens=s.regen_max_new_tokens,
                regen_max_prompt_tokens=s.regen_max_prompt_tokens,
                regen_batch_size=s.regen_batch_size,
                regen_max_turns=1,
                regen_cache=str(
                    Path("~/.cache/draftfeed/demo").expanduser()
                    / f"sharegpt-{s.conversations}-{s.regen_max_new_tokens}-{device}.jsonl"
                ),
            ),
            eagle3=Eagle3Config(draft_vocab_size=s.draft_vocab_size, ttt_steps=s.ttt_steps),
            optim=OptimConfig(lr=s.lr),
            loop=LoopConfig(steps=s.steps, prefetch=s.prefetch, log_every=max(1, s.steps // 20)),
        )
        result = run_training(cfg, model=model, target_id=server.info.fingerprint)
        train_s = time.perf_counter() - start
        embed = model.get_input_embeddings().weight
        trained = load_eagle3(out_dir / "export", embed, device=device, dtype=model.dtype)
        untrained = load_eagle3(out_dir / "export", embed, device=device, dtype=model.dtype)
        torch.manual_seed(cfg.seed)
        untrained.reset_parameters()  # same vocab map, fresh random weights
        prompts = load_prompt_sets(["mtbench"], tokenizer, s.eval_prompts)["mtbench"]
        verifier = TargetVerifier(model)
        eos = eos_token_ids(tokenizer, model)
        rows = []
        for name, draft in (("untrained", untrained), ("trained", trained)):
            r = measure_tau(
                verifier,
                Eagle3ChainDrafter(draft),
                prompts,
                s.num_draft_tokens,
                s.eval_max_new_tokens,
                eos,
                name,
            )
            rows.append((name, r))
    finally:
        server.stop(grace=1)
    print(
        f"\nEAGLE-3 draft for SmolLM2-135M-Instruct: {result.steps} steps, {result.tokens:,} tokens, "
        f"trained in {result.seconds:.0f} s ({train_s:.0f} s with loading and data)"
    )
    print(
        f"tau on {len(prompts)} MT-Bench prompts (chain K={s.num_draft_tokens}, greedy, max tau {s.num_draft_tokens + 1}):"
    )
    for name, r in rows:
        print(f"  {name:9s} tau {r.tau:.3f}  ({r.rounds} verify rounds, {r.seconds:.0f} s)")
    print(f"exported draft: {out_dir / 'export'}  (draftfeed eval --draft {out_dir / 'export'})")
    return 0
