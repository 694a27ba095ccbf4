"""Generate the Python stubs of the draftfeed.v1 proto into client/pb/ (package draftfeed.client.pb).

    python proto/generate.py            # writes client/pb/draftfeed_pb2{.py,.pyi,_grpc.py}
    python proto/generate.py --check    # exit 1 when the committed stubs differ from a fresh run

The generator is pinned: stubs carry version gates. `_pb2_grpc.py` refuses to import under a grpcio
older than the grpcio-tools that wrote it, and `_pb2.py` refuses a protobuf runtime older than the
protoc inside it. So they are written by the oldest grpcio-tools we support (pyproject: grpcio>=1.66),
whose protoc emits protobuf 5.27.2 gencode; they then import under grpcio 1.66 .. 1.85 and protobuf
5.27.2 .. 7.x. Run it from a throwaway venv, never the project's environment:

    python -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools==1.66.0
    /tmp/gt/bin/python proto/generate.py

protoc names the output after the proto path (draftfeed/v1/draftfeed_pb2.py, imported as
`draftfeed.v1.draftfeed_pb2`); the file keeps that path inside the descriptor pool (what reflection
shows), and this script moves the files into client/pb/ and rewrites the module name they import.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
from pathlib import Path

PINNED_GRPCIO_TOOLS = "1.66.0"

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "draftfeed/v1/draftfeed.proto"
OUT_DIR = PROTO_ROOT.parent / "client" / "pb"
STUBS = ("draftfeed_pb2.py", "draftfeed_pb2.pyi", "draftfeed_pb2_grpc.py")

# (what protoc writes, what the package needs), applied to every stub.
_MODULE_FIXES = (
    ("from draftfeed.v1 import draftfeed_pb2 as", "from draftfeed.client.pb import draftfeed_pb2 as"),
    ("'draftfeed.v1.draftfeed_pb2'", "'draftfeed.client.pb.draftfeed_pb2'"),
)


def grpcio_tools_version() -> str | None:
    """The installed grpcio-tools version, or None when it is not installed."""
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_protoc(args: list[str]) -> None:
    """Runs the protoc bundled with grpcio-tools on the draftfeed proto with extra `args`."""
    from grpc_tools import protoc  # imported here: only the generator and its test need grpcio-tools

    include = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types
    argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args, str(PROTO_ROOT / PROTO_FILE)]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")


def generate() -> dict[str, str]:
    """Runs protoc (the installed grpcio-tools) and returns {stub file name: text} as it would be written."""
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"])
        gen_dir = Path(tmp) / Path(PROTO_FILE).parent
        files = {name: (gen_dir / name).read_text() for name in STUBS}
    for name, text in files.items():
        for old, new in _MODULE_FIXES:
            text = text.replace(old, new)
        files[name] = text
    return files


def descriptor_set() -> bytes:
    """The proto compiled to a serialized FileDescriptorSet (no source info) by the installed protoc."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "draftfeed.pb"
        run_protoc([f"--descriptor_set_out={out}"])
        return out.read_bytes()


def stale_stubs(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of the stubs in `out_dir` that differ from a fresh generation (missing ones included)."""
    fresh = generate()
    return [
        name
        for name, text in fresh.items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the stubs go (default: client/pb)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    parser.add_argument(
        "--any-version",
        action="store_true",
        help=f"use the installed grpcio-tools even if it is not {PINNED_GRPCIO_TOOLS} (stubs may not import elsewhere)",
    )
    args = parser.parse_args(argv)

    version = grpcio_tools_version()
    if version != PINNED_GRPCIO_TOOLS and not args.any_version:
        print(
            f"grpcio-tools {version or '(not installed)'} found; the stubs are generated with {PINNED_GRPCIO_TOOLS}"
            " so they import under every grpcio we support. Run:\n"
            f"  python -m venv /tmp/gt && /tmp/gt/bin/pip install grpcio-tools=={PINNED_GRPCIO_TOOLS}\n"
            f"  /tmp/gt/bin/python {__file__}",
            file=sys.stderr,
        )
        return 2

    if args.check:
        stale = stale_stubs(args.out)
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
