"""End-to-end draft training throughput: remote (a draftfeed server) against co-located (the target loaded in
the trainer), in one run, through the real training loop (`trainer/loop.py`). The server and the trainers share
one GPU (the default) or sit on different devices (`--server-device cuda:0 --trainer-device cuda:1`).

    python bench/train_throughput.py make-target --dir /tmp/tt/target [--dims smollm2-135m|llama-3.1-8b|tiny]
    python bench/train_throughput.py steps  --target /tmp/tt/target --out OUT        # draft step: reference vs fast
    python bench/train_throughput.py single --target /tmp/tt/target --url grpc://127.0.0.1:50051 --out OUT
    python bench/train_throughput.py single --target DIR --server-device cuda:0 --trainer-device cuda:1 --out OUT
    python bench/train_throughput.py jobs   --target /tmp/tt/target --url grpc://... --algos eagle3,dspark --out OUT
    python bench/train_throughput.py report --out OUT --command "..."                 # OUT/train_throughput.md

The target is a random-weight LlamaConfig of SmolLM2-135M's dimensions by default, or Llama-3.1-8B's (speed
does not depend on the values; `--dims tiny` for a CPU dry run). Batches are random token rows, loss on all but
the first eighth of each row.

Placement: `--trainer-device` is where the trainer (and the co-located target) runs; `--server-device` is where
the server runs. With `--url` the server is already up and `--server-device` only labels the rows; without
`--url` the bench starts `draftfeed serve --device SERVER_DEVICE` itself for the run (default: the trainer's
device, i.e. one shared GPU) and stops it at the end.

`steps`: each algorithm's draft step (forward, backward, AdamW) on one target batch at B x S, three rows each
(`--impls`): `reference` (EAGLE-3: explicit-matmul attention and autograd soft cross-entropy; DFlash / DSpark:
autograd over checkpointed full-vocab chunks), `fast` (the defaults, eager) and `compiled` (the defaults with
the compiled kernels, what `loop.compile: auto` runs on CUDA); tokens/s, MFU (FLOPs counted by torch's
FlopCounterMode over 989 TFLOP/s bf16), the first step's loss and gradient norm (same weights, batch and
anchors in every row: the rows' agreement), the warm-up time (compilation), the target forward alone, and a
torch-profiler table of each step's top CUDA ops.
Also the GPU bf16 difference between the `exact` (latent) and the raw EAGLE-3 probabilities.
`single`: every algorithm x batch size, co-located, remote with the default encodings and with `compact`:
training tokens/s after a warm-up, target wait %, GPU memory, reply bytes/token. `jobs`: N concurrent
training processes against the one server (a start barrier lines up their timed phases): per-job and
aggregate tokens/s. Every part appends JSON lines to OUT/*.jsonl; `report` writes the tables.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from draftfeed.bench import read_jsonl

SMOL = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0,
)  # fmt: skip
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096,
)  # fmt: skip
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, tie_word_embeddings=False, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=500000.0,
)  # fmt: skip
DIMS = {"smollm2-135m": SMOL, "llama-3.1-8b": LLAMA_8B, "tiny": TINY}
PEAK_BF16 = 989e12  # H100/H200 dense bf16
ALGOS = ("eagle3", "dflash", "dspark")


_TRAINER_DEVICE: torch.device | None = None  # set by main() from --trainer-device


def resolve_device(spec: str | None, cuda_count: int) -> str:
    """'auto' / None -> cuda:0 (or cpu without a GPU); 'cuda' -> cuda:0; 'cuda:N' checked against the GPUs there."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda:0" if cuda_count else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec.partition(":")[2] or "0"
        if not index.isdigit():
            raise SystemExit(f"device {spec!r}: expected cpu, cuda or cuda:N (N a GPU index)")
        if int(index) >= cuda_count:
            raise SystemExit(
                f"device {spec!r}: this machine has {cuda_count} GPU(s) (cuda:0..cuda:{cuda_count - 1}); "
                "pick one of those, or cpu"
            )
        return f"cuda:{int(index)}"
    raise SystemExit(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def placement(server_device: str | None, trainer_device: str | None, cuda_count: int) -> dict:
    """Where the server and the trainer run: resolved device names and whether they share one device."""
    trainer = resolve_device(trainer_device, cuda_count)
    server = trainer if server_device is None else resolve_device(server_device, cuda_count)
    return dict(server=server, trainer=trainer, shared=server == trainer)


def device() -> torch.device:
    if _TRAINER_DEVICE is not None:
        return _TRAINER_DEVICE
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_trainer_device(spec: str | None) -> torch.device:
    """Make `spec` this process's trainer device (and the current CUDA device, so that the loop's autocast,
    synchronize and memory statistics refer to it)."""
    global _TRAINER_DEVICE
    _TRAINER_DEVICE = torch.device(resolve_device(spec, torch.cuda.device_count()))
    if _TRAINER_DEVICE.type == "cuda":
        torch.cuda.set_device(_TRAINER_DEVICE)
    return _TRAINER_DEVICE


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def append(out: Path, name: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def make_target(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = "tiny" if args.tiny else args.dims
    torch.manual_seed(0)
    cfg = LlamaConfig(**DIMS[dims])
    cfg.architectures = ["LlamaForCausalLM"]
    t0 = time.perf_counter()
    with torch.device(resolve_device(args.device, torch.cuda.device_count())):  # an 8B init is fast on a GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to("cpu").save_pretrained(args.dir)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"random-weight target ({dims} dims, {n / 1e9:.2f}B params) at {args.dir} in {time.perf_counter() - t0:.0f} s"
    )


def describe_target(target_dir: str) -> str:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(target_dir)
    return (
        f"{c.num_hidden_layers} layers, H {c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} heads, "
        f"I {c.intermediate_size}, V {c.vocab_size}"
    )


def start_server(target_dir: str, server_device: str, log_path: Path, timeout: float = 900):
    """`draftfeed serve` on `server_device` as a subprocess on free ports: (process, url, admin url)."""
    import re

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    cmd = [sys.executable, "-m", "draftfeed.server.cli", "serve", "--model", target_dir]
    cmd += ["--dtype", "bfloat16", "--device", server_device, "--port", "0", "--admin-port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(
            r"draftfeed: serving on (grpc://[0-9.]+:[0-9]+), admin on (\S+?)[,;]", log_path.read_text()
        )
        if m:
            return proc, m.group(1), m.group(2)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not come up in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc) -> None:
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


class Server:
    """The server a run talks to: `--url` as given, else one started on `--server-device` for the run."""

    def __init__(self, args):
        self.where = placement(args.server_device, args.trainer_device, torch.cuda.device_count())
        self.proc = None
        self.url, self.admin_url = args.url, args.admin_url
        if self.url is None:
            self.proc, self.url, self.admin_url = start_server(
                args.target, self.where["server"], Path(args.out) / "server.log"
            )

    def labels(self) -> dict:
        return dict(server_device=self.where["server"], trainer_device=self.where["trainer"])

    def close(self):
        stop_server(self.proc)


class RandomBatches:
    """Endless random `TokenBatch`es: ids in [3, V). Unpacked (the default): full rows, loss on all but the
    first eighth of each. `packed`: documents of S/16 to S/2 tokens laid end to end as `draftfeed train`
    packs real conversations (`trainer.data.collate`: position ids restart per document, the rest of a row
    is padding), loss on all but each document's first eighth: the attention masks real data takes."""

    def __init__(self, batch_size: int, seq_len: int, vocab: int, seed: int = 0, packed: bool = False):
        self.b, self.s, self.v, self.packed = batch_size, seq_len, vocab, packed
        self.g = torch.Generator().manual_seed(seed)
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        from draftfeed.trainer.data import TokenBatch, collate

        self.n += 1
        if self.packed:
            rows = [self._packed_row() for _ in range(self.b)]
            return collate(rows, self.s, pad_token_id=0, pack=True, data_state={"n": self.n})
        ids = torch.randint(3, self.v, (self.b, self.s), generator=self.g)
        attn = torch.ones(self.b, self.s, dtype=torch.long)
        loss = attn.clone()
        loss[:, : self.s // 8] = 0
        return TokenBatch(ids, attn, loss, data_state={"n": self.n})

    def _packed_row(self) -> list[tuple[list[int], list[int]]]:
        docs, left = [], self.s
        lo, hi = max(2, self.s // 16), max(3, self.s // 2)
        while left >= lo:
            n = min(left, int(torch.randint(lo, hi + 1, (), generator=self.g)))
            ids = torch.randint(3, self.v, (n,), generator=self.g).tolist()
            docs.append((ids, [0] * (n // 8) + [1] * (n - n // 8)))
            left -= n
        return docs

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def train_config(algo, out, target_dir, url, b, s, encodings, seconds, job, draft_vocab, prefetch=2):
    from draftfeed.trainer.config import DataConfig, Eagle3Config, LoopConfig, TargetConfig, TrainConfig

    return TrainConfig(
        out=str(out),
        algorithm=algo,
        target=TargetConfig(
            url=[url] if url else [], model=target_dir, encodings=encodings, job_name=job, dtype="bfloat16"
        ),
        data=DataConfig(seq_len=s, batch_size=b),
        eagle3=Eagle3Config(draft_vocab_size=draft_vocab),
        loop=LoopConfig(
            steps=10**6, time_limit=seconds, log_every=max(1, 32 // b), progress="off", export=False,
            tensorboard=False, prefetch=prefetch,
        ),
    )  # fmt: skip


def build(algo, target_dir, url, b, s, encodings, seconds, out, job, model=None, prefetch=2, packed=False):
    """(trainer, backend, byte counter) for one run; `model` = the co-located target (else remote)."""
    from transformers import AutoConfig

    from draftfeed.trainer.algorithms import ALGORITHMS
    from draftfeed.trainer.loop import Trainer

    conf = AutoConfig.from_pretrained(target_dir)
    vocab = conf.vocab_size
    cfg = train_config(
        algo, out, target_dir, url, b, s, encodings, seconds, job, min(8192, vocab // 2), prefetch
    )
    algorithm = ALGORITHMS[algo](cfg)
    backend = algorithm.open_backend(model, device())
    counts = torch.arange(vocab, 0, -1).float()
    torch.manual_seed(0)
    draft = algorithm.build_draft(backend, conf, counts if algorithm.needs_token_counts(vocab) else None, [0])
    batches = RandomBatches(b, s, vocab, packed=packed)
    trainer = Trainer(cfg, algorithm, draft, backend, batches, 10**6, device=device())
    trainer.save_checkpoint = lambda: None  # not part of what is measured
    wire = {"bytes": 0, "tokens": 0}
    if model is None:
        decode = backend._batch

        def counting(reply):
            got = decode(reply)
            wire["bytes"] += sum(t.numel() * t.element_size() for t in reply.tensors.values())
            wire["tokens"] += got.input_ids.numel()
            return got

        backend._batch = counting
    return trainer, backend, wire, cfg


class GpuBusy:
    """The GPU's mean utilization over a span (NVML: the share of each sample period in which any kernel of
    any process ran), sampled every 50 ms on a thread; None without NVML (`nvidia-ml-py`) or a GPU. Below 100%
    while a GPU-bound trainer shares the card with the server, the card sat idle: neither had work queued."""

    def __init__(self, index: int = 0):
        import threading

        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle, self._nvml = pynvml.nvmlDeviceGetHandleByIndex(index), pynvml
        except Exception:  # noqa: BLE001 - no NVML here: the column stays empty
            self._handle = None
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return round(statistics.fmean(self.samples) / 100, 3) if self.samples else None


def rows_label(args) -> str:
    """What the rows of a run hold: "packed" documents (as real data trains) or "full" random rows."""
    return "packed" if getattr(args, "packed", False) else "full"


def timed_train(trainer, cfg, seconds, warm_steps=2, barrier=None):
    """Warm up `warm_steps` optimizer steps, then train for `seconds`: (tok/s, target wait, peak bytes,
    steps, the GPU's mean utilization over the timed part or None)."""
    trainer.total_steps = warm_steps
    cfg.loop.time_limit = None
    trainer.train()
    if barrier is not None:
        barrier()
    metrics = cfg.out_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.total_steps = 10**6
    cfg.loop.time_limit = seconds
    busy = GpuBusy(torch.cuda.current_device()) if torch.cuda.is_available() else None
    result = trainer.train()
    gpu_busy = busy.stop() if busy is not None else None
    records = read_jsonl(metrics)
    spans = [1 / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    wait = sum(r["target_wait"] * w for r, w in zip(records, spans, strict=False)) / max(sum(spans), 1e-9)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return result.tokens / max(result.seconds, 1e-9), wait, peak, result.steps, gpu_busy


def server_load(admin_url: str | None) -> dict | None:
    """The server's cumulative load counters from its admin `/status.json` (None without an admin URL)."""
    if not admin_url:
        return None
    import urllib.request

    with urllib.request.urlopen(admin_url.rstrip("/") + "/status.json", timeout=10) as r:
        doc = json.load(r)
    up, load = doc["server"]["uptime_s"], doc["load"]
    return dict(
        t=up,
        busy_s=load["busy_fraction"] * up,
        forward_s=load["forward_ms_mean"] * load["forwards"] / 1e3,
        forwards=load["forwards"],
        tokens=load["tokens"],
    )


def snapshot(into: list, admin_url: str | None) -> None:
    """Append the server's load counters to `into`; an admin port that does not answer costs the row its
    server columns, not the row."""
    try:
        into.append(server_load(admin_url))
    except OSError as err:
        print(
            f"server load: {admin_url}/status.json did not answer ({err}); the row goes without it",
            flush=True,
        )
        into.append(None)


def load_between(a: dict | None, b: dict | None) -> dict:
    """Over a timed run: the share of the time the server's worker (its GPU) was busy, and its forwards'
    mean duration and tokens (how long the target took in the server while the trainer shared the GPU)."""
    if a is None or b is None or b["forwards"] <= a["forwards"]:
        return {}
    n = b["forwards"] - a["forwards"]
    return dict(
        server_busy=round((b["busy_s"] - a["busy_s"]) / max(b["t"] - a["t"], 1e-9), 3),
        server_forward_ms=round(1e3 * (b["forward_s"] - a["forward_s"]) / n, 1),
        server_forward_tokens=round((b["tokens"] - a["tokens"]) / n),
    )


def gpu_used() -> int:
    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def single(args):
    out = Path(args.out)
    server = Server(args)
    try:
        _single(args, out, server, {**server.labels(), "target": describe_target(args.target)})
    finally:
        server.close()


def _single(args, out, server, labels):
    from draftfeed.target.loading import load_target

    model = load_target(args.target, dtype="bfloat16", device=device())
    for b in [int(x) for x in args.batches.split(",")]:
        for algo, rep in itertools.product(args.algos.split(","), range(args.repeats)):
            # the co-located run, then the remote ones: exact at each --prefetch depth, compact at the first
            first = args.prefetch[0]
            modes = [("co-located", None, first)] + [("remote", "exact", p) for p in args.prefetch]
            if b not in args.no_compact_at:
                modes.append(("remote", "compact", first))
            for mode, enc, prefetch in modes:
                t0 = time.perf_counter()
                trainer = None
                try:
                    trainer, backend, wire, cfg = build(
                        algo, args.target, None if mode == "co-located" else server.url, b, args.seq, enc,
                        args.seconds, out / "runs" / f"{algo}_{b}_{mode}_{enc}_{prefetch}", f"{algo}-{b}-{enc}",
                        model if mode == "co-located" else None, prefetch, args.packed,
                    )  # fmt: skip
                    loads: list = []
                    snap = functools.partial(snapshot, loads, server.admin_url) if mode == "remote" else None
                    tps, wait, peak, steps, busy = timed_train(trainer, cfg, args.seconds, barrier=snap)
                    if snap is not None:
                        snap()
                    if args.profile_loop:
                        tag = f"{algo}_{b}_{rows_label(args)}_{mode}_{enc or '-'}"
                        profile_loop(trainer, args.profile_loop, out / f"profile_loop_{tag}.txt")
                    rec = dict(
                        algo=algo, B=b, S=args.seq, mode=mode, encodings=enc or "-", tok_s=round(tps),
                        target_wait=round(wait, 3), steps=steps, trainer_peak_gib=round(peak / 2**30, 2),
                        gpu_used_gib=round(gpu_used() / 2**30, 2),
                        bytes_per_token=round(wire["bytes"] / wire["tokens"]) if wire["tokens"] else None,
                        wall_s=round(time.perf_counter() - t0, 1), rep=rep, prefetch=prefetch, gpu_busy=busy,
                        rows=rows_label(args),
                        **(load_between(*loads) if len(loads) == 2 else {}), **labels,
                    )  # fmt: skip
                    if mode == "remote":
                        backend.close()
                except Exception as err:  # noqa: BLE001 - one failed config must not end the table
                    rec = dict(
                        algo=algo,
                        B=b,
                        S=args.seq,
                        mode=mode,
                        encodings=enc or "-",
                        prefetch=prefetch,
                        rows=rows_label(args),
                        error=repr(err)[:300],
                        rep=rep,
                        **labels,
                    )
                append(out, "single.jsonl", rec)
                del trainer
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def job(args):
    """One training process of a concurrent-jobs run: warm up, wait for the others, train, write JSON."""
    out = Path(args.out)
    trainer, backend, wire, cfg = build(
        args.algo, args.target, args.url, args.batch, args.seq, args.encodings, args.seconds,
        out / "runs" / f"job{args.index}_{args.algo}", f"job{args.index}-{args.algo}", packed=args.packed,
    )  # fmt: skip
    ready = out / f"ready_{args.group}_{args.index}"

    def barrier():
        ready.touch()
        deadline = time.time() + 120
        while len(list(out.glob(f"ready_{args.group}_*"))) < args.of and time.time() < deadline:
            time.sleep(0.05)

    tps, wait, peak, steps, _ = timed_train(trainer, cfg, args.seconds, barrier=barrier)
    backend.close()
    rec = dict(
        group=args.group, jobs=args.of, index=args.index, algo=args.algo, B=args.batch, S=args.seq,
        encodings=args.encodings, tok_s=round(tps), target_wait=round(wait, 3), steps=steps,
        trainer_peak_gib=round(peak / 2**30, 2),
        bytes_per_token=round(wire["bytes"] / wire["tokens"]) if wire["tokens"] else None,
        server_device=args.server_device, trainer_device=str(device()), target=describe_target(args.target),
        rows=rows_label(args),
    )  # fmt: skip
    append(out, "jobs.jsonl", rec)


def jobs(args):
    algos = args.algos.split(",")
    procs = []
    group = f"{len(algos)}jobs_b{args.batch}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    server = Server(args)
    try:
        for i, algo in enumerate(algos):
            cmd = [
                sys.executable, __file__, "job", "--target", args.target, "--url", server.url, "--algo", algo,
                "--batch", str(args.batch), "--seq", str(args.seq), "--seconds", str(args.seconds),
                "--encodings", args.encodings, "--index", str(i), "--of", str(len(algos)), "--group", group,
                "--out", args.out, "--server-device", server.where["server"],
                "--trainer-device", server.where["trainer"], *(["--packed"] if args.packed else []),
            ]  # fmt: skip
            log = open(Path(args.out) / f"{group}_{i}.log", "w")  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait()
    finally:
        server.close()


# ---- the draft step alone ----


STEP_IMPLS = ("reference", "fast", "compiled")


def _use_impl(algs, impl: str, draft, originals: dict) -> None:
    """Point the algorithms at `impl`'s step: `reference` (EAGLE-3: explicit-matmul attention and autograd soft
    cross-entropy; DFlash / DSpark: autograd over checkpointed full-vocab chunks), `fast` (the defaults,
    eager) or `compiled` (the defaults with the compiled kernels, as `loop.compile: auto` runs on CUDA)."""
    from draftfeed.trainer import compiling

    for (module, name), fn in originals.items():
        setattr(module, name, fn if impl != "reference" else partial(fn, fused=False))
    if impl == "reference" and hasattr(draft, "midlayer"):
        draft.midlayer.self_attn.impl = "reference"
    compiling.set_compile(impl == "compiled")


def step_bench(args):
    from draftfeed.target.loading import load_target
    from draftfeed.trainer import algorithms as algs
    from draftfeed.trainer import compiling
    from draftfeed.trainer.algorithms import ALGORITHMS

    out = Path(args.out)
    dev = device()
    model = load_target(args.target, dtype="bfloat16", device=dev)
    conf = model.config
    b, s = args.batch, args.seq
    batches = RandomBatches(b, s, conf.vocab_size, packed=args.packed)
    tb = next(batches)
    # the loss each trainer-side algorithm module calls, patched there for the reference rows
    homes = {"eagle3_batch_loss": algs.eagle3, "dflash_loss": algs.dflash, "dspark_loss": algs.dspark}
    originals = {(module, n): getattr(module, n) for n, module in homes.items()}
    fidelity(args, model, tb, out)
    for algo in args.algos.split(","):
        cfg = train_config(
            algo, out / "steps", args.target, None, b, s, None, 1, "steps", min(8192, conf.vocab_size // 2)
        )
        algorithm = ALGORITHMS[algo](cfg)
        backend = algorithm.open_backend(model, dev)
        counts = torch.arange(conf.vocab_size, 0, -1).float()
        draft0 = algorithm.build_draft(
            backend, conf, counts if algorithm.needs_token_counts(conf.vocab_size) else None, [0]
        )
        algorithm.prepare_backend(backend, draft0)
        with torch.no_grad():
            sync()
            target = backend.generate_batch(**tb.backend_kwargs())
            sync()
            t1 = time.perf_counter()
            target = backend.generate_batch(**tb.backend_kwargs())
            sync()
            target_s = time.perf_counter() - t1
        target = type(target)(**{k: v.clone() for k, v in target.to(dev).tensors().items()})
        for impl in args.impls.split(","):
            torch.manual_seed(0)
            draft = algorithm.build_draft(
                backend, conf, counts if algorithm.needs_token_counts(conf.vocab_size) else None, [0]
            ).to(dev)
            _use_impl(algs, impl, draft, originals)
            params = [p for p in draft.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            if getattr(algorithm, "generator", None) is not None:
                algorithm.generator.manual_seed(0)  # the same anchors in every row's first step
            step = partial(_train_step, algorithm, draft, target, params, opt, dev)

            rec = dict(algo=algo, impl=impl, B=b, S=s, rows=rows_label(args))
            try:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                o, norm = step()  # the first step: same weights, batch and anchors in every row
                rec.update(first_loss=round(float(o.loss.detach()), 5), first_grad_norm=round(norm, 5))
                for _ in range(args.warmup - 1):
                    o, _ = step()
                sync()
                rec["warmup_s"] = round(time.perf_counter() - t0, 1)  # compile time included
                t0 = time.perf_counter()
                n = args.steps
                for _ in range(n):
                    o, _ = step()
                sync()
                dt = (time.perf_counter() - t0) / n
                from torch.utils.flop_counter import FlopCounterMode

                compiling.set_compile(False)  # FLOPs of the same step, counted eagerly
                with FlopCounterMode(display=False) as fc:
                    step()
                compiling.set_compile(impl == "compiled")
                flops = fc.get_total_flops()
                rec.update(
                    step_ms=round(dt * 1e3, 1), tok_s=round(b * s / dt), target_fwd_ms=round(target_s * 1e3, 1),
                    colocated_tok_s=round(b * s / (dt + target_s)), tflop_per_step=round(flops / 1e12, 2),
                    mfu=round(flops / dt / PEAK_BF16, 3), loss=round(float(o.loss.detach()), 4),
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0,
                )  # fmt: skip
                if dev.type == "cuda" and args.profile:
                    profile(step, out / f"profile_{algo}_{impl}.txt")
            except Exception as err:  # noqa: BLE001
                rec["error"] = repr(err)[:300]
            append(out, "steps.jsonl", rec)
            del draft, opt, step
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _use_impl(algs, "fast", draft0, originals)


def _train_step(algorithm, draft, target, params, opt, dev):
    from draftfeed.trainer.algorithms import DistContext

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = algorithm.loss(draft, target, DistContext())
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out, float(norm)


def profile(step, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            step()
        sync()
    averages = p.key_averages()
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            path.write_text(averages.table(sort_by=key, row_limit=15, max_name_column_width=60))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def profile_loop(trainer, steps: int, path: Path) -> None:
    """`steps` more optimizer steps of the real loop under the torch profiler: the host's time by op (where a
    loop that leaves the GPU idle spends it) and, where torch records them, by Python function."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    trainer.total_steps = trainer.step + steps
    trainer.cfg.loop.time_limit = None
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as p:
        trainer.train()
        sync()
    averages = p.key_averages()
    text = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    frames = [a for a in averages if ".py(" in a.key and not a.key.startswith(("torch/", "threading", "<"))]
    frames.sort(key=lambda a: -a.cpu_time_total)  # Python functions: host time inclusive of what they call
    text += f"\n\nHost ms inside each Python function over {steps} steps (inclusive), calls:\n"
    text += "\n".join(f"{a.cpu_time_total / 1e3:10.1f}  {a.count:6d}  {a.key[:110]}" for a in frames[:40])
    if not frames:  # seen with torch 2.11 and CUDA activities: the op table above is what there is
        text += "(this torch recorded no Python function events)"
    path.write_text(text)


def fidelity(args, model, tb, out):
    """GPU bf16: the EAGLE-3 probabilities rebuilt from the latent reply against the raw reply."""
    if not args.url:
        return
    from draftfeed.client.remote import RemoteEagle3TargetModel
    from draftfeed.client.vocab import build_token_map

    vocab = model.config.vocab_size
    sel, mask = build_token_map(torch.arange(vocab, 0, -1).float(), min(8192, vocab // 2), [0])
    got = {}
    for enc in ("raw", "exact"):
        r = RemoteEagle3TargetModel.from_urls([args.url], device=device(), encodings=enc, cache_dir=None)
        r.set_vocab_mapping(sel, mask)
        kw = {k: v[:4] for k, v in tb.backend_kwargs().items()}
        got[enc] = r.generate_batch(**kw)
        r.close()
    p, q = got["raw"].target_probs.float(), got["exact"].target_probs.float()
    kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)
    append(
        out,
        "fidelity.jsonl",
        dict(
            what="EAGLE-3 target_probs, exact (latent, rebuilt on the trainer) vs raw, bf16 target on the GPU",
            rows=int(p.shape[0] * p.shape[1]),
            bit_equal=bool(torch.equal(p, q)),
            equal_fraction=round(float((p == q).float().mean()), 4),
            max_abs=float((p - q).abs().max()),
            kl_mean=float(kl.mean()),
            kl_max=float(kl.max()),
            top1_agree=float((p.argmax(-1) == q.argmax(-1)).float().mean()),
            position_mask_equal=bool(torch.equal(got["raw"].position_mask, got["exact"].position_mask)),
        ),  # fmt: skip
    )


# ---- report ----


def _rows(path: Path) -> list[dict]:
    return read_jsonl(path)


def _where(rows: list[dict], key: str) -> str:
    return ", ".join(sorted({str(r[key]) for r in rows if r.get(key)}))


def report(args):
    out = Path(args.out)
    every = _rows(out / "single.jsonl") + _rows(out / "jobs.jsonl")
    lines = [
        f"# {args.title}",
        "",
        f"Device: {args.device}. Date: {time.strftime('%Y-%m-%d')}. Command: `{args.command}`.",
        f"Target: random-weight LlamaConfig ({_where(every, 'target') or 'see the target directory'}), bf16; "
        f"server (`draftfeed serve`, CUDA graphs on, data plane) on {_where(every, 'server_device') or 'the same GPU'}, "
        f"trainer(s) and the co-located target on {_where(every, 'trainer_device') or 'the same GPU'}; "
        "random token rows, S as given. tok/s = training tokens per second",
        "after a warm-up (the real loop: bf16 autocast, AdamW; prefetch = target batches in flight); target wait = time",
        "the loop waited on the target; GPU busy = the card's mean NVML utilization over the run (below 100%: idle",
        "gaps); bytes/token = reply payload per token; trainer peak = the trainer process's max allocated;",
        "server busy = the share of a remote run with server work (forward, post stage, reply copy) on the GPU;",
        "server forward ms = those forwards' mean GPU time (both from its admin /status.json; on a shared card they",
        "include the trainer's time slices; before 2026-12-06d the forward ms was the host time to issue one).",
        "",
    ]
    steps = _rows(out / "steps.jsonl")
    if steps:
        lines += ["## Draft step alone (one target batch, forward + backward + AdamW)", ""]
        lines += [
            "| algorithm | step | B x S | ms/step | draft tok/s | MFU | TFLOP/step | peak GiB | target fwd ms | co-located tok/s (fwd + step) | first loss | first grad norm | warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in steps:
            if "error" in r:
                lines.append(
                    f"| {r['algo']} | {r['impl']} | {r['B']}x{r['S']}{' packed' if r.get('rows') == 'packed' else ''} | error: {r['error']} |"
                )
                continue
            lines.append(
                f"| {r['algo']} | {r['impl']} | {r['B']}x{r['S']}{' packed' if r.get('rows') == 'packed' else ''} | {r['step_ms']} | {r['tok_s']:,} | {r['mfu']} | "
                f"{r['tflop_per_step']} | {r['peak_gib']} | {r['target_fwd_ms']} | {r['colocated_tok_s']:,} | "
                f"{r.get('first_loss', r['loss'])} | {r.get('first_grad_norm', '')} | {r.get('warmup_s', '')} |"
            )
        lines.append("")
    fid = _rows(out / "fidelity.jsonl")
    for r in fid:
        lines += [
            "## exact (latent) vs raw EAGLE-3 probabilities, bf16 on the GPU",
            "",
            "```",
            json.dumps(r, indent=1),
            "```",
            "",
        ]
    single_rows = _rows(out / "single.jsonl")
    if single_rows:
        lines += ["## One job: co-located vs remote", ""]
        lines += [
            "| algorithm | B | mode | encodings | prefetch | tok/s | remote / co-located | target wait | GPU busy | bytes/token | trainer peak GiB | GPU used GiB | server busy | server forward ms |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        # each remote row against the co-located row of the same repeat (--repeats interleaves them)
        coloc = {
            (r["algo"], r["B"], r.get("rows"), r.get("rep", 0)): r.get("tok_s")
            for r in single_rows
            if r["mode"] == "co-located"
        }
        ratios: dict[tuple, list[float]] = {}
        for r in single_rows:
            if "error" in r:
                lines.append(
                    f"| {r['algo']} | {r['B']} | {r['mode']} | {r['encodings']} | error: {r['error']} |"
                )
                continue
            base = coloc.get((r["algo"], r["B"], r.get("rows"), r.get("rep", 0)))
            b_label = f"{r['B']} packed" if r.get("rows") == "packed" else r["B"]
            ratio = f"{r['tok_s'] / base:.2f}" if base and r["mode"] == "remote" else ""
            if ratio:
                key = (r["algo"], b_label, r["encodings"], r.get("prefetch", 2))
                ratios.setdefault(key, []).append(r["tok_s"] / base)
            busy = f"{100 * r['gpu_busy']:.0f}%" if r.get("gpu_busy") is not None else ""
            lines.append(
                f"| {r['algo']} | {b_label} | {r['mode']} | {r['encodings']} | {r.get('prefetch', 2)} | {r['tok_s']:,} | "
                f"{ratio} | {100 * r['target_wait']:.0f}% | {busy} | "
                f"{r['bytes_per_token'] if r['bytes_per_token'] is not None else ''} | "
                f"{r['trainer_peak_gib']} | {r['gpu_used_gib']} | "
                + (
                    f"{100 * r['server_busy']:.0f}% | {r['server_forward_ms']} |"
                    if "server_busy" in r
                    else " | |"
                )
            )
        lines.append("")
        if any(len(v) > 1 for v in ratios.values()):
            lines += [
                "Remote / co-located over the repeats (each remote run against the co-located run just before it):",
                "",
                "| algorithm | B | encodings | prefetch | runs | median | min | max |",
                "|---|---:|---|---:|---:|---:|---:|---:|",
            ]
            for (algo, b, enc, prefetch), v in ratios.items():
                lines.append(
                    f"| {algo} | {b} | {enc} | {prefetch} | {len(v)} | **{statistics.median(v):.3f}** | {min(v):.3f} | {max(v):.3f} |"
                )
            lines.append("")
    job_rows = _rows(out / "jobs.jsonl")
    if job_rows:
        # the same job alone: the single-job run's remote row of its algorithm, B and encodings
        lone_runs: dict[tuple, list[int]] = {}
        for r in single_rows:
            # the jobs prefetch 2: their lone speed is the remote rows at that depth
            if r["mode"] == "remote" and "error" not in r and r.get("prefetch", 2) == 2:
                lone_runs.setdefault((r["algo"], r["B"], r["encodings"]), []).append(r["tok_s"])
        alone = {k: round(statistics.median(v)) for k, v in lone_runs.items()}
        lines += [
            "## Concurrent jobs against one server (one process each)",
            "",
            "alone = the same job (algorithm, B, encodings) training alone against the server, from the table",
            "above; shared / alone = the share of its lone speed it keeps. Their sum is the work done per second",
            "in units of one job alone: 1.0 is what running the jobs one after another gives.",
            "",
            "| jobs | job | algorithm | B | tok/s | alone tok/s | shared / alone | target wait | bytes/token |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for group in sorted({r["group"] for r in job_rows}):
            rows = sorted((r for r in job_rows if r["group"] == group), key=lambda r: r["index"])
            kept = []
            for r in rows:
                lone = alone.get((r["algo"], r["B"], r["encodings"]))
                kept.append(r["tok_s"] / lone if lone else None)
                lines.append(
                    f"| {r['jobs']} | {r['index']} | {r['algo']} | {r['B']} | {r['tok_s']:,} | "
                    f"{f'{lone:,}' if lone else ''} | {f'{kept[-1]:.2f}' if lone else ''} | "
                    f"{100 * r['target_wait']:.0f}% | {r['bytes_per_token']} |"
                )
            gain = f"**{sum(kept):.2f}x one job**" if all(k is not None for k in kept) else ""
            lines.append(
                f"| {rows[0]['jobs']} | all | aggregate | {rows[0]['B']} | **{sum(r['tok_s'] for r in rows):,}** "
                f"| | {gain} | | |"
            )
        lines.append("")
    (out / "train_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mt = sub.add_parser("make-target")
    mt.add_argument("--dir", required=True)
    mt.add_argument("--tiny", action="store_true", help="the same as --dims tiny")
    mt.add_argument("--dims", choices=sorted(DIMS), default="smollm2-135m")
    mt.add_argument(
        "--device", default="cpu", help="where to initialise the weights (cuda:N is faster for 8B)"
    )
    for name in ("steps", "single", "jobs", "job"):
        q = sub.add_parser(name)
        q.add_argument("--target", required=True)
        q.add_argument("--url", default=None)
        q.add_argument(
            "--admin-url", default=None, help="the --url server's admin HTTP (its load over each remote run)"
        )
        q.add_argument("--out", required=True)
        q.add_argument("--seq", type=int, default=2048)
        q.add_argument("--seconds", type=float, default=4.0)
        q.add_argument(
            "--repeats",
            type=int,
            default=1,
            help="single: each co-located / remote pair N times, interleaved",
        )
        q.add_argument("--algos", default=",".join(ALGOS))
        q.add_argument("--batch", type=int, default=16)
        q.add_argument("--batches", default="16,4,1")
        q.add_argument("--no-compact-at", type=lambda x: [int(v) for v in x.split(",") if v], default=[1])
        q.add_argument("--steps", type=int, default=5)
        q.add_argument(
            "--impls", default=",".join(STEP_IMPLS), help="steps: which step implementations (rows) to time"
        )
        q.add_argument("--warmup", type=int, default=3, help="steps: untimed steps first (compilation)")
        q.add_argument("--profile", type=int, default=1, help="steps: 1 = a torch-profiler table per row")
        q.add_argument(
            "--profile-loop", type=int, default=0,
            help="single: N more steps of each run under the torch profiler (host time by op and by function)",
        )  # fmt: skip
        q.add_argument("--encodings", default="exact")
        q.add_argument(
            "--packed", action="store_true",
            help="rows of packed documents (S/16 to S/2 tokens), as `draftfeed train` packs real data, "
            "instead of full random rows: the attention masks real training takes",
        )  # fmt: skip
        q.add_argument(
            "--prefetch", type=lambda x: [int(v) for v in x.split(",") if v], default=[2],
            help="single: target batches in flight; several (2,4) give one remote exact row each",
        )  # fmt: skip
        q.add_argument("--algo", default="eagle3")
        q.add_argument("--index", type=int, default=0)
        q.add_argument("--of", type=int, default=1)
        q.add_argument("--group", default="g")
        q.add_argument("--trainer-device", default="auto", help="auto (cuda:0, else cpu), cpu, cuda:N")
        q.add_argument(
            "--server-device", default=None,
            help="where the server runs: started there by the bench without --url (default: the trainer's device)",
        )  # fmt: skip
    rp = sub.add_parser("report")
    rp.add_argument("--out", required=True)
    rp.add_argument("--command", default="")
    rp.add_argument(
        "--title", default="Draft training throughput: remote vs co-located (bench/train_throughput.py)"
    )
    rp.add_argument("--device", default=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.cmd in ("steps", "single", "jobs", "job"):
        set_trainer_device(args.trainer_device)
    {
        "make-target": make_target,
        "steps": step_bench,
        "single": single,
        "jobs": jobs,
        "job": job,
        "report": report,
    }[args.cmd](args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # grpc / loader threads must not hold the process open


if __name__ == "__main__":
    main()
