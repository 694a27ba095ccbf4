"""Loopback transport benchmark: the gRPC tensor path of client/wire.py and the TCP data plane
against plain TCP.

    python bench/transport.py --out bench/results/

A server process holds the reply payloads (a realistic mix: bf16 hidden states, fp32 probabilities,
a bool mask) and serves them two ways: the gRPC path (`wire.encode_reply` frames on a server stream,
identity serializers) and a plain TCP socket (`sendall` of the same bytes). For each payload size,
a fresh client process per configuration fetches the payload repeatedly: the gRPC client
reassembles with `wire.ReplyAssembler(reuse_buffers=1)`, the TCP client `recv_into`s one reused
buffer. gRPC runs with each chunk size and each flow-control window (`bdp`: gRPC's adaptive window;
a number: a fixed window of that many KiB, see `wire.grpc_options`). A `grpc drain` client that only
receives the frames (1 MiB chunks) shows what gRPC itself costs, before any reassembly.
The `dataplane` rows go through the real data-plane code: the client opens a session with
`data_plane=True`, connects `client.dataplane.DataPlaneClient(reuse_buffers=1)` with the ticket,
and each unary Generate gets the header on gRPC while the server's `server.dataplane.reply_frames`
sends the payload on the data socket, read by the client's reader thread (`recv_into` one buffer)
and matched by `wire.ReplyAssembler(data_plane=...)`: one gRPC call per reply is included.

Reported: median payload GB/s (1e9 bytes/s) over repeated fetches, the ratio to TCP in the same run,
and the client's peak memory over the payload: peak RSS above the RSS just before the first payload
fetch (after a 1 MiB warm-up call), read from /proc, so it counts the reply buffer, gRPC's receive
buffers, chunk objects and allocator slack. Targets: >= 0.75x TCP, peak client memory < 1.3x.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing as mp
import os
import platform
import queue
import re
import socket
import statistics
import struct
import sys
import time
from concurrent import futures
from pathlib import Path

MiB = 1 << 20
WARMUP = MiB
TARGET_RATIO, TARGET_MEMORY = 0.75, 1.3


# ------------------------------------------------------------------------------------------ server


def _payload(nbytes: int):
    """Reply tensors adding up to exactly `nbytes`: ~70% bf16 hidden, ~30% fp32 probs, a bool mask."""
    import torch

    g = torch.Generator().manual_seed(nbytes)
    probs = (nbytes * 3 // 10) // 4
    hidden = (nbytes - nbytes // 64 - probs * 4) // 2
    mask = nbytes - probs * 4 - hidden * 2
    return {
        "aux_hidden_states": torch.randn(hidden, generator=g).to(torch.bfloat16),
        "target_probs": torch.rand(probs, generator=g),
        "position_mask": torch.rand(mask, generator=g) > 0.5,
    }


class _Session:
    """What the data plane needs of a session: an id and whether it closed."""

    def __init__(self, sid: str):
        self.id, self.closed = sid, False


def _serve(sizes: list[int], conn) -> None:
    """Serves the payloads over gRPC, the data plane and TCP until the parent sends anything on `conn`."""
    import uuid

    import grpc

    from draftfeed.client import wire
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.pb import draftfeed_pb2_grpc as pb_grpc
    from draftfeed.server.dataplane import DataPlaneServer, reply_frames

    payloads = {n: _payload(n) for n in [*sizes, WARMUP]}
    flat = {n: b"".join(bytes(wire.tensor_bytes(t)) for t in p.values()) for n, p in payloads.items()}
    plane = DataPlaneServer("127.0.0.1", 0)

    class Servicer(pb_grpc.TargetServiceServicer):
        def OpenSession(self, request, context):
            session = _Session(uuid.uuid4().hex)
            return pb.OpenSessionResponse(
                session_id=session.id, data_port=plane.port, data_ticket=plane.issue(session)
            )

        def Generate(self, request, context):  # session_id: "NBYTES:CHUNK[:SESSION]"
            nbytes, chunk, *session = request.session_id.split(":")
            nbytes, chunk = int(nbytes), int(chunk)
            meta = {"n": nbytes}
            sid = session[0] if session else ""
            want = request.data_plane
            yield from reply_frames(plane, sid, request.request_id, payloads[nbytes], meta, chunk, want)

        def GenerateStream(self, request_iterator, context):  # one open stream, replies in order
            for request in request_iterator:
                yield from self.Generate(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.grpc_options())
    wire.add_to_server(Servicer(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    listener = socket.create_server(("127.0.0.1", 0))
    conn.send((grpc_port, listener.getsockname()[1]))
    listener.settimeout(1.0)
    while not conn.poll():
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while header := sock.recv(8, socket.MSG_WAITALL):
                (nbytes,) = struct.unpack("<Q", header)
                sock.sendall(memoryview(flat[nbytes]))
    server.stop(grace=None)


# ------------------------------------------------------------------------------------------ client


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> int:
    """Resets the peak-RSS mark (VmHWM) and returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _client(
    path: str, port: int, nbytes: int, chunk: int, window: int | None, seconds: float, call: str, conn
) -> None:
    """Fetches the payload 3..30 times within about `seconds`; sends (GB/s of each fetch, peak / payload)."""
    if path.startswith("grpc") or path == "dataplane":
        import grpc

        from draftfeed.client import wire
        from draftfeed.client.dataplane import DataPlaneClient
        from draftfeed.client.pb import draftfeed_pb2 as pb

        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.grpc_options(window_bytes=window))
        stub, assembler = wire.TargetStub(channel), wire.ReplyAssembler(reuse_buffers=1)
        session, data = "", None
        if path == "dataplane":
            opened = stub.OpenSession(pb.OpenSessionRequest(algorithm="bench", data_plane=True))
            data = DataPlaneClient("127.0.0.1", opened.data_port, opened.data_ticket, reuse_buffers=1)
            assembler, session = wire.ReplyAssembler(data_plane=data), f":{opened.session_id}"

        if call == "stream":  # one GenerateStream kept open, one request at a time (generate_batch_async)
            outbox: queue.Queue = queue.Queue()
            frames = stub.GenerateStream(iter(outbox.get, None))
            inbox = assembler.replies(frames) if path != "grpc drain" else None

        def fetch(i: int, size: int = nbytes) -> None:
            request = pb.GenerateRequest(
                session_id=f"{size}:{chunk}{session}", request_id=i, data_plane=data is not None
            )
            if call == "stream" and path != "grpc drain":
                outbox.put(request)
                reply = next(inbox)
            elif path == "grpc drain":  # the gRPC ceiling: receive the frames, keep nothing
                assert sum(len(frame) for frame in stub.Generate(request)) > size
                return
            else:
                (reply,) = assembler.replies(stub.Generate(request))
            assert reply.request_id == i and sum(t.nbytes for t in reply.tensors.values()) == size
            assert data is None or data.replies == i + 1  # the payload came on the data plane

        fetch(0, WARMUP)  # connects and runs every code path once
    else:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = None

        def fetch(i: int, size: int = nbytes) -> None:
            nonlocal buf
            if buf is None or len(buf) < size:
                buf = memoryview(bytearray(size))
            sock.sendall(struct.pack("<Q", size))
            got = 0
            while got < size:
                n = sock.recv_into(buf[got:size], size - got)
                if n == 0:
                    raise ConnectionError("server closed the connection")
                got += n

        fetch(0, WARMUP)
        buf = None

    base = _reset_peak()
    fetch(1)  # allocates and faults in the reply buffer: counted in memory, not in speed
    rates, start = [], time.perf_counter()
    while len(rates) < 3 or (time.perf_counter() - start < seconds and len(rates) < 30):
        t0 = time.perf_counter()
        fetch(len(rates) + 2)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    peak = _status_kib("VmHWM") * 1024 - base
    conn.send((rates, peak / nbytes))
    if call == "stream" and (path.startswith("grpc") or path == "dataplane"):
        outbox.put(None)


def _measure(ctx, path: str, port: int, nbytes: int, chunk: int, window, arenas, seconds: float, call: str):
    """(median GB/s, peak memory / payload) from a fresh client process (`arenas`: its MALLOC_ARENA_MAX)."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client, args=(path, port, nbytes, chunk, window, seconds, call, child))
    saved = os.environ.pop("MALLOC_ARENA_MAX", None)
    if arenas is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(arenas)  # read by glibc when the spawned interpreter starts
    try:
        proc.start()
    finally:
        os.environ.pop("MALLOC_ARENA_MAX", None)
        if saved is not None:
            os.environ["MALLOC_ARENA_MAX"] = saved
    if not parent.poll(120):
        proc.kill()
        raise TimeoutError(f"{path} client for {nbytes} bytes gave no result in 120 s")
    rates, memory = parent.recv()
    proc.join()
    return statistics.median(rates), memory


# ------------------------------------------------------------------------------------------ report


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _verdict(ratio: float, memory: float) -> str:
    missed = [
        what for what, bad in (("speed", ratio < TARGET_RATIO), ("memory", memory >= TARGET_MEMORY)) if bad
    ]
    return "met" if not missed else "missed: " + ", ".join(missed)


def _write(out_dir: Path, table: str, argv: list[str]) -> Path:
    import grpc
    import torch

    now = datetime.datetime.now().astimezone()
    name = socket.gethostname()
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    name = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"transport-{name}-{now:%Y-%m-%d}.md"
    out.write_text(
        "# Transport benchmark: gRPC tensor path and TCP data plane vs plain TCP (loopback)\n\n"
        f"- date: {now:%Y-%m-%d %H:%M %Z}\n"
        f"- device: {_device()}\n"
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, grpcio {grpc.__version__}\n"
        f"- command: `python {' '.join(argv)}`\n"
        f"- targets: >= {TARGET_RATIO}x TCP, peak client memory < {TARGET_MEMORY}x payload\n\n"
        f"{table}\n\n"
        "GB/s = 1e9 payload bytes per second, median over repeated fetches; client and server are separate "
        "processes; dataplane = header on a unary gRPC call, payload on the session's data-plane socket "
        "(server/dataplane.py -> client/dataplane.py); window = the client's HTTP/2 flow-control window (bdp = gRPC's adaptive default); malloc "
        "arenas = MALLOC_ARENA_MAX in the client's environment; peak memory = client peak RSS above its RSS "
        "before the first payload fetch.\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,64,256", help="payload sizes in MiB (default 16,64,256)")
    parser.add_argument(
        "--chunks", default="256,1024,4096", help="chunk sizes in KiB (default 256,1024,4096)"
    )
    parser.add_argument("--windows", default="bdp,2048", help="gRPC windows: bdp or KiB (default bdp,2048)")
    parser.add_argument(
        "--arenas",
        default="default",
        help="MALLOC_ARENA_MAX values for the gRPC client: default (unset) or numbers (e.g. default,2)",
    )
    parser.add_argument(
        "--drain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a gRPC client that only receives the frames (the gRPC ceiling)",
    )
    parser.add_argument(
        "--paths",
        default="grpc,dataplane",
        help="paths to measure besides tcp: grpc (each chunk x window), dataplane (default grpc,dataplane)",
    )
    parser.add_argument(
        "--call",
        default="stream",
        choices=("stream", "unary"),
        help="gRPC and data-plane clients: one open GenerateStream with one request at a time (the path of "
        "generate_batch_async, the trainer's) or a unary Generate call per reply (default stream)",
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="time per measurement (default 1.5)")
    parser.add_argument("--out", type=Path, default=None, help="folder for transport-<host>-<date>.md")
    args = parser.parse_args(argv)
    sizes = [int(s) * MiB for s in args.sizes.split(",")]
    chunks = [int(c) * 1024 for c in args.chunks.split(",")]
    windows = [None if w == "bdp" else int(w) * 1024 for w in args.windows.split(",")]
    arena_limits = [None if a == "default" else int(a) for a in args.arenas.split(",")]
    paths = set(args.paths.split(","))

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(sizes, child), daemon=True)
    server.start()
    grpc_port, tcp_port = parent.recv()
    began = time.perf_counter()
    lines = [
        "| payload | path | chunk | window | malloc arenas | GB/s | vs TCP | peak client memory / payload | target |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(nbytes, path, chunk, window, arenas, rate, tcp, mem):
        chunk_text = f"{chunk // 1024} KiB" if chunk else "-"
        window_text = (
            "-" if path in ("tcp", "dataplane") else "bdp" if window is None else f"{window // 1024} KiB"
        )
        verdict = _verdict(rate / tcp, mem) if path in ("grpc", "dataplane") else ""
        arenas_text = "default" if arenas is None else str(arenas)
        lines.append(
            f"| {nbytes // MiB} MiB | {path} | {chunk_text} | {window_text} | {arenas_text} | {rate:.2f} "
            f"| {rate / tcp:.2f}x | {mem:.2f}x | {verdict} |"
        )
        print(lines[-1], flush=True)

    try:
        for nbytes in sizes:
            tcp, mem = _measure(ctx, "tcp", tcp_port, nbytes, 0, None, None, args.seconds, args.call)
            row(nbytes, "tcp", 0, None, None, tcp, tcp, mem)
            if "dataplane" in paths:
                rate, mem = _measure(
                    ctx, "dataplane", grpc_port, nbytes, 0, None, None, args.seconds, args.call
                )
                row(nbytes, "dataplane", 0, None, None, rate, tcp, mem)
            if args.drain and "grpc" in paths:
                rate, mem = _measure(
                    ctx, "grpc drain", grpc_port, nbytes, MiB, None, None, args.seconds, args.call
                )
                row(nbytes, "grpc drain", MiB, None, None, rate, tcp, mem)
            grpc_runs = itertools.product(arena_limits, windows, chunks) if "grpc" in paths else ()
            for arenas, window, chunk in grpc_runs:
                rate, mem = _measure(
                    ctx, "grpc", grpc_port, nbytes, chunk, window, arenas, args.seconds, args.call
                )
                row(nbytes, "grpc", chunk, window, arenas, rate, tcp, mem)
    finally:
        parent.send("stop")
        server.join(timeout=10)

    table = "\n".join(lines)
    print(f"\n{table}\n\n{time.perf_counter() - began:.0f} s")
    if args.out is not None:
        print(f"wrote {_write(args.out, table, sys.argv if argv is None else ['bench/transport.py', *argv])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
