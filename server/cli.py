"""The `draftfeed` command: parses flags into one config per process, then runs it."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftfeed", description="Serve a frozen target LLM to draft trainers.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the built-in default target and show what each algorithm gets")
    demo.add_argument(
        "--model", default=None, help="local HF checkpoint (default: built-in SmolLM2-135M-Instruct)"
    )
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from draftfeed.client.errors import DraftfeedError

    try:
        if args.command == "demo":
            from .config import ServeConfig
            from .demo import run_inprocess_demo

            cfg = ServeConfig(model=args.model, device=args.device)
            run_inprocess_demo(cfg.model, cfg.resolved_device())
        return 0
    except DraftfeedError as err:
        print(f"draftfeed: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
