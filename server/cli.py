"""The `draftfeed` command: parses flags into one config per process, then runs it.

Each subcommand registers its parser with `set_defaults(run=...)`; the trainer package adds its
own (`train`, `eval`) through `draftfeed.trainer.cli.register`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "build_parser", "package_version"]


def package_version() -> str:
    """The installed draftfeed's version (`unknown` when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("draftfeed")
    except PackageNotFoundError:
        return "unknown"


def _serve_config(args):
    from .checks import Limits
    from .config import ServeConfig

    return ServeConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        nemo_http_port=args.nemo_http_port,
        data_port=None if args.no_data_plane else args.data_port,
        device=args.device,
        dtype=args.dtype,
        limits=Limits(
            args.max_batch_size, args.max_seq_len, args.max_request_tokens, args.max_packed_seq_len
        ),
        max_chunk_bytes=args.max_chunk_bytes,
        max_forward_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        max_queued_per_session=args.max_queued_per_job,
        cuda_graphs=not args.no_cuda_graphs,
        grace_seconds=args.grace_seconds,
        grpc_workers=args.grpc_workers,
        max_streams_per_job=args.max_streams_per_job,
        aux_layer_ids=args.aux_layer_ids,
        session_ttl_s=args.session_ttl,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token_file=args.token_file,
        insecure_allow_remote=args.insecure_allow_remote,
        tensor_parallel=int(os.environ.get("WORLD_SIZE", "1")),  # set by torchrun
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _layer_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer ids (e.g. 1,2,3)"
        ) from None


def _run_serve(args) -> int:
    from .app import serve

    if args.host in ("0.0.0.0", "::", "[::]"):
        print(f"draftfeed: listening on all interfaces ({args.host}) as asked", file=sys.stderr)
    return serve(_serve_config(args))


def _run_health(args) -> int:
    from draftfeed.client.channel import ChannelSecurity, check_health

    security = ChannelSecurity(args.ca_file, args.client_cert, args.client_key, server_name=args.server_name)
    status = check_health(args.target, security, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _add_serve_security(serve) -> None:
    serve.add_argument(
        "--tls-cert", default=None, help="PEM certificate chain: TLS on the gRPC and admin ports"
    )
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mutual TLS)"
    )
    serve.add_argument(
        "--token-file",
        default=None,
        help="YAML/JSON job name -> token (and quotas); clients send 'authorization: Bearer <token>'",
    )
    serve.add_argument(
        "--insecure-allow-remote",
        action="store_true",
        help="without --token-file, answer clients beyond loopback too (trusted networks only)",
    )


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
    serve.add_argument(
        "--model", default=None, help="local HF checkpoint (default: built-in SmolLM2-135M-Instruct)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 binds all interfaces")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument(
        "--admin-port", type=int, default=None, help="HTTP /healthz /readyz /metrics /sessions"
    )
    serve.add_argument(
        "--nemo-http-port",
        type=int,
        default=None,
        help="also serve NeMo AutoModel's remote-target HTTP protocol (remote_urls: [http://HOST:PORT])",
    )
    serve.add_argument(
        "--data-port",
        type=int,
        default=0,
        help="TCP data plane for reply payloads, offered to sessions (on --host; default 0: a free port)",
    )
    serve.add_argument(
        "--no-data-plane",
        action="store_true",
        help="offer no data plane: every reply goes on gRPC (e.g. when only the gRPC port is reachable)",
    )
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    serve.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    serve.add_argument("--max-batch-size", type=int, default=256, help="per-request limit on B")
    serve.add_argument("--max-seq-len", type=int, default=32768, help="per-request limit on S")
    serve.add_argument("--max-request-tokens", type=int, default=262144, help="per-request limit on B*S")
    serve.add_argument(
        "--max-packed-seq-len",
        type=int,
        default=8192,
        help="packed requests: B*S*S (their attention mask) at most this squared (one row of this length)",
    )
    serve.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="token budget of one batched forward"
    )
    serve.add_argument("--max-chunk-bytes", type=int, default=1 << 20, help="reply chunk size")
    serve.add_argument("--max-queue", type=int, default=256, help="requests waiting for the GPU, all jobs")
    serve.add_argument("--max-queued-per-job", type=int, default=32, help="requests waiting, per session")
    serve.add_argument(
        "--grpc-workers",
        type=int,
        default=128,
        help="gRPC worker threads; a quarter (at least 4) is kept for health checks and other short calls",
    )
    serve.add_argument(
        "--max-streams-per-job",
        type=int,
        default=32,
        help="Generate/GenerateStream calls a job (without --token-file: a client connection) may have open "
        "at once; each holds a worker thread (default 32)",
    )
    serve.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run every target forward eagerly (default on a GPU: replay a CUDA graph for repeated batch shapes)",
    )
    serve.add_argument("--grace-seconds", type=float, default=30.0, help="drain time on SIGTERM")
    serve.add_argument(
        "--aux-layer-ids",
        type=_layer_ids,
        default=None,
        help="EAGLE-3 aux layer ids (3 distinct, e.g. 1,2,3) for sessions that name none, such as NeMo HTTP "
        "clients (default: [1, N//2-1, N-4], which needs N >= 7 decoder layers)",
    )
    serve.add_argument(
        "--session-ttl",
        type=float,
        default=900.0,
        help="seconds a session may go without a request before it is closed and freed (its client "
        "re-opens it on its next request); 0: never (default 900)",
    )
    _add_serve_security(serve)
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
