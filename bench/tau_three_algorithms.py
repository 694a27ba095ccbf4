"""tau of EAGLE-3, DFlash and DSpark drafts trained on the same data with the same step budget against the
default target (SmolLM2-135M-Instruct), on the same MT-Bench prompts, in one markdown table.

One invocation does everything: serve the default target on a free port, regenerate the ShareGPT first
turns with it (cached), train the three drafts at the same time against that one server (three jobs, three
sessions), export them, measure tau (greedy; EAGLE-3 chains K drafts, DFlash proposes a block of bs-1,
DSpark of bs, so all three draft the same number of tokens per round) with untrained baselines, and write
bench/results/tau_three_algorithms_<cpu|gpu>_<date>.md.

    python bench/tau_three_algorithms.py            # CPU setting (about 10 minutes on 2 cores)
    python bench/tau_three_algorithms.py --gpu      # the demo-train --gpu recipe for all three

Every `DemoSettings` field is a flag (`--steps 100`, `--block-layers 2`, ...), applied over the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from draftfeed.trainer.demo import NAMES, DemoSettings, demo_configs, measure_exports, train_concurrently
from draftfeed.trainer.evaluate import load_prompt_sets, tau_table

ALGORITHMS = ("eagle3", "dflash", "dspark")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="start from DemoSettings.gpu()")
    p.add_argument("--out", default="bench/results", help="directory of the markdown result")
    p.add_argument("--work", default=None, help="training output directory (default: a temporary one)")
    p.add_argument("--no-untrained", action="store_true", help="skip the untrained baselines")
    for f in dataclasses.fields(DemoSettings):
        kind = float if f.type in ("float", "float | None") else int if f.type == "int" else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None)
    return p.parse_args(argv)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    args = parse_args(argv)
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.target.loading import load_target, load_tokenizer

    s = DemoSettings.gpu() if args.gpu else DemoSettings(steps=30, eval_prompts=4, eval_max_new_tokens=32)
    s = s.replace(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(s) if getattr(args, f.name) is not None}
    )
    work = Path(args.work or tempfile.mkdtemp(prefix="draftfeed-tau3-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = load_target(None, device=device, dtype="bfloat16" if device == "cuda" else None)
    tokenizer = load_tokenizer(None)
    server = TargetServer(ServeConfig(port=0, device=device), model=model, tokenizer=tokenizer).start()
    try:
        cfgs = demo_configs(s, work, server.url, ALGORITHMS, device)
        trained = train_concurrently(cfgs, model, server.info.fingerprint)
    finally:
        server.stop(grace=1)
    train_s = time.perf_counter() - start
    prompts = load_prompt_sets(["mtbench"], tokenizer, s.eval_prompts)["mtbench"]
    date = datetime.date.today().isoformat()
    kind = "gpu" if device == "cuda" else "cpu"
    out = Path(args.out) / f"tau_three_algorithms_{kind}_{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    expected = len(ALGORITHMS) * (1 if args.no_untrained else 2)

    def write(rows) -> None:
        """The report so far: written after training and after each measured draft, so a run cut short
        (a device call's time limit) still leaves the training table and the drafts measured until then."""
        note = "" if len(rows) == expected else f" (partial: {len(rows)} of {expected} drafts measured)"
        total_s = time.perf_counter() - start
        out.write_text(report(s, argv, kind, date, len(prompts), trained, rows, train_s, total_s, note))

    write([])
    rows = measure_exports(
        model, tokenizer, {NAMES[a]: work / a / "export" for a in ALGORITHMS}, prompts,
        num_draft_tokens=s.num_draft_tokens, max_new_tokens=s.eval_max_new_tokens,
        untrained=not args.no_untrained, confidence_threshold=s.confidence_threshold, on_row=write,
    )  # fmt: skip
    print(tau_table(rows))
    print(f"\nwritten to {out}")
    return 0


def report(s, argv, kind, date, num_prompts, trained, rows, train_s, total_s, note="") -> str:
    """The markdown result: tau table (`note` after its heading), training table, wall times, command and
    settings."""
    train_lines = [
        f"| {NAMES[a]} | {r.steps} | {r.tokens:,} | {r.seconds:.0f} | {r.history[-1]['loss']:.3f} |"
        for a, r in trained.items()
    ]
    settings = "\n".join(f"- `{k}` = {v}" for k, v in dataclasses.asdict(s).items())
    command = "python bench/tau_three_algorithms.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    return (
        f"# tau of EAGLE-3, DFlash and DSpark on the default target ({kind.upper()}, {date})\n\n"
        f"Device: {device_name()}; torch {torch.__version__}. Target: SmolLM2-135M-Instruct (built-in), "
        f"served by one draftfeed server in this process; the three drafts trained at the same time against it "
        f"(three jobs, three sessions, remote client), on the same regenerated ShareGPT first turns "
        f"({s.conversations} read, packed rows of {s.seq_len}), for the same {s.steps} optimizer steps"
        + (f" or {s.time_limit:.0f} s of training, whichever comes first" if s.time_limit else "")
        + ".\n\n"
        f"## tau{note} on {num_prompts} MT-Bench prompts (greedy, {s.eval_max_new_tokens} new tokens each)\n\n"
        f"{tau_table(rows)}\n\n"
        "tau = committed tokens per verification round, pooled over prompts, bonus token included "
        "(docs/architecture.md section 4); every draft proposes the same number of tokens per round "
        f"(EAGLE-3 chain K={s.num_draft_tokens}, DFlash block {s.block_size + 1} = {s.block_size} drafts, "
        f"DSpark block {s.block_size}), so max tau is the same for all.\n\n"
        "## Training\n\n| draft | steps | tokens | seconds | last loss |\n|---|---|---|---|---|\n"
        + "\n".join(train_lines)
        + f"\n\nWall time: {train_s:.0f} s to load, regenerate and train; {total_s:.0f} s in all.\n\n"
        f"## Command\n\n```bash\n{command}\n```\n\nSettings (`trainer/demo.py` `DemoSettings`):\n\n{settings}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
