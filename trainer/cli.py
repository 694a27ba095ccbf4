"""`draftfeed train | regenerate | eval | demo-train`: flags (and a YAML file) -> one config -> run.

`server/cli.py` calls `register(subparsers)`. Flags come from the config dataclasses (`config.py`);
`--config FILE.yaml` is read first and flags override it. torchrun's RANK / WORLD_SIZE / LOCAL_RANK
are read here, and only here.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import (
    EvalConfig,
    TrainConfig,
    add_flags,
    build_config,
)

__all__ = ["register", "train_config_from_args", "dist_from_env", "ALGORITHM_NAMES"]

# the keys of algorithms.ALGORITHMS, spelt out so that building the parser does not import torch
# (`draftfeed health` / `--version` stay light; tests/test_cli_startup.py checks they match)
ALGORITHM_NAMES = ("dflash", "dspark", "eagle3")

# what `draftfeed regenerate` reads of a TrainConfig (it runs the target in this process)
REGENERATE_FLAGS = {
    "target.model",
    "target.dtype",
    "loop.device",
    "data.path",
    "data.limit",
    "data.holdout",
    "data.regen_max_new_tokens",
    "data.regen_temperature",
    "data.regen_batch_size",
    "data.regen_max_turns",
    "data.regen_max_prompt_tokens",
    "data.regen_time_limit",
    "data.regen_cache",
}


def dist_from_env() -> dict:
    """torchrun's process layout (one process without it)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return {}
    return {
        "rank": int(env.get("RANK", 0)),
        "world_size": int(env["WORLD_SIZE"]),
        "local_rank": int(env.get("LOCAL_RANK", 0)),
    }


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    return build_config(TrainConfig, args, args.config, extra={"dist": dist_from_env()})


def _run_train(args) -> int:
    from .signals import StopSignals, TrainingInterrupted, exit_code, resume_command
    from .train import run_training

    cfg = train_config_from_args(args)
    try:
        with StopSignals():  # while building; the loop installs its own (checkpoint first)
            result = run_training(cfg)
    except TrainingInterrupted as err:
        if cfg.dist.rank == 0:
            where = f"at step {err.step}" if err.step is not None else "before training started"
            saved = f"checkpoint: {err.checkpoint}" if err.checkpoint else "no checkpoint yet"
            if err.export:
                saved += f"; draft exported to {err.export}"
            print(
                f"draftfeed: {err.name} {where}; {saved}; session closed. Resume with:\n"
                f"  {resume_command(sys.argv[1:])}",
                file=sys.stderr,
            )
        return exit_code(err.signum)
    if cfg.dist.rank == 0:
        print(
            f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; out: {cfg.out_dir}"
        )
    return 0


def _run_regenerate(args) -> int:
    from draftfeed.target.loading import load_target, load_tokenizer

    from .loop import resolve_device
    from .train import regenerate_all, target_dtype, target_fingerprint

    cfg = train_config_from_args(args)
    cfg.data.regenerate = True
    cfg.data.val_path = None  # the held-out answers are made here, not read
    device = resolve_device(cfg.loop.device)
    model = load_target(cfg.target.model, device=device, dtype=target_dtype(cfg.target.dtype, device))
    convs, val = regenerate_all(cfg, load_tokenizer(cfg.target.model), model, target_fingerprint(model))
    if val:
        print(
            f"{len(val)} held-out first turns answered at {cfg.heldout_regen_path()} "
            f"(validate on them while training: --val-data {cfg.heldout_regen_path()})"
        )
    print(f"{len(convs)} conversations regenerated at {cfg.regen_cache_path()}")
    return 0


def _run_eval(args) -> int:
    from .evaluate import run_eval

    run_eval(build_config(EvalConfig, args, args.config))
    return 0


def _run_demo_train(args) -> int:
    from .demo import DemoSettings, run_demo_train

    settings = DemoSettings.gpu() if args.gpu else DemoSettings()
    overrides = {k: v for k, v in vars(args).items() if k.startswith("demo_") and v is not None}
    settings = settings.replace(**{k.removeprefix("demo_"): v for k, v in overrides.items()})
    return run_demo_train(settings, out=args.out)


def register(sub) -> None:
    train = sub.add_parser("train", help="train a draft against a target server or an in-process target")
    train.add_argument("algorithm", choices=ALGORITHM_NAMES, help="draft algorithm")
    train.add_argument("--config", default=None, help="YAML file of config sections; flags override it")
    add_flags(train, TrainConfig)
    train.set_defaults(run=_run_train)

    regen = sub.add_parser(
        "regenerate", help="regenerate a chat file's assistant turns with the target (cached for `train`)"
    )
    regen.add_argument("--config", default=None, help="YAML file (the train config's target/data sections)")
    regen.add_argument(
        "--out", dest="out", default=argparse.SUPPRESS, help="output directory of the training run"
    )
    regen.add_argument("--seed", dest="seed", type=int, default=argparse.SUPPRESS, help="sampling seed")
    add_flags(regen, TrainConfig, only=REGENERATE_FLAGS)
    regen.set_defaults(run=_run_regenerate)

    ev = sub.add_parser("eval", help="acceptance length tau of an exported draft against the target")
    ev.add_argument("--config", default=None, help="YAML file of eval settings; flags override it")
    add_flags(ev, EvalConfig)
    ev.set_defaults(run=_run_eval)

    demo = sub.add_parser(
        "demo-train",
        help="serve the default target, train an EAGLE-3 and a DSpark draft on regenerated ShareGPT at the same "
        "time against it, print both tau next to untrained drafts",
    )
    demo.add_argument("--gpu", action="store_true", help="the longer GPU setting (more data, more steps)")
    demo.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    demo.add_argument(
        "--conversations", dest="demo_conversations", type=int, default=None, help="ShareGPT conversations"
    )
    demo.add_argument("--steps", dest="demo_steps", type=int, default=None, help="optimizer steps")
    demo.add_argument(
        "--eval-prompts", dest="demo_eval_prompts", type=int, default=None, help="MT-Bench prompts"
    )
    demo.set_defaults(run=_run_demo_train)
