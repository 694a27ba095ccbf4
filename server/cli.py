"""The `draftfeed` command: parses flags into one config per process, then runs it.

Each subcommand registers its parser with `set_defaults(run=...)`; the trainer package adds its
own (`train`, `eval`) through `draftfeed.trainer.cli.register`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "build_parser", "package_version", "serve_config_from_args"]


def package_version() -> str:
    """The installed draftfeed's version (`unknown` when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("draftfeed")
    except PackageNotFoundError:
        return "unknown"


def serve_config_from_args(args: argparse.Namespace):
    """The `ServeConfig` of `draftfeed serve`'s flags (the dataclass defaults for those not given) and
    torchrun's environment (WORLD_SIZE, LOCAL_RANK)."""
    from draftfeed.client.config_flags import build_config

    from .config import ServeConfig

    env = {
        "tensor_parallel": int(os.environ.get("WORLD_SIZE", "1")),  # set by torchrun
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
    }
    return build_config(ServeConfig, args, extra=env)


def _run_serve(args) -> int:
    from .app import serve

    cfg = serve_config_from_args(args)
    if cfg.host in ("0.0.0.0", "::", "[::]"):
        print(f"draftfeed: listening on all interfaces ({cfg.host}) as asked", file=sys.stderr)
    return serve(cfg)


def _run_health(args) -> int:
    from draftfeed.client.channel import ChannelSecurity, check_health

    security = ChannelSecurity(args.ca_file, args.client_cert, args.client_key, server_name=args.server_name)
    status = check_health(args.target, security, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _run_demo(args) -> int:
    from .config import ServeConfig
    from .demo import run_demo

    cfg = ServeConfig(model=args.model, device=args.device, port=0)
    return run_demo(cfg, steps=args.requests)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftfeed", description="Serve a frozen target LLM to draft trainers.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a target over gRPC")
    from draftfeed.client.config_flags import add_flags

    from .config import ServeConfig

    add_flags(serve, ServeConfig)  # every flag, its help and its default come from the dataclass
    serve.set_defaults(run=_run_serve)

    health = sub.add_parser(
        "health", help="check a server through the gRPC health service (exit 0 = SERVING)"
    )
    health.add_argument(
        "--target", default="grpc://127.0.0.1:50051", help="grpc://HOST:PORT or grpcs://HOST:PORT"
    )
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--ca-file", default=None, help="PEM CA of the server's certificate (grpcs://)")
    health.add_argument("--client-cert", default=None, help="PEM client certificate (mutual TLS)")
    health.add_argument("--client-key", default=None, help="PEM key of --client-cert")
    health.add_argument("--server-name", default=None, help="name to verify in the server's certificate")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(run=_run_health)

    demo = sub.add_parser("demo", help="serve the default target and run two training-style jobs against it")
    demo.add_argument(
        "--model", default=None, help="local HF checkpoint (default: built-in SmolLM2-135M-Instruct)"
    )
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    demo.add_argument("--requests", type=int, default=4, help="requests per job")
    demo.set_defaults(run=_run_demo)

    bench = sub.add_parser("bench", help="benchmarks (bench/): encodings")
    bench.add_argument(
        "which", choices=["encodings"], help="encodings: bytes/token, speed and fidelity per encoding"
    )
    bench.add_argument(
        "rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (--model PATH, --out FILE)"
    )
    bench.set_defaults(
        run=lambda a: __import__("draftfeed.bench.encodings", fromlist=["main"]).main(a.rest) or 0
    )

    try:
        from draftfeed.trainer.cli import register
    except ImportError:
        register = None
    if register is not None:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from draftfeed.client.errors import DraftfeedError

    try:
        return args.run(args) or 0
    except DraftfeedError as err:
        print(f"draftfeed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C where a command has no handler of its own (train has one)
        print("draftfeed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
