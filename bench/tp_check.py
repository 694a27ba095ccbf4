"""Tensor-parallel check: the same target served TP=1 (`draftfeed serve`) and TP=K (`torchrun
--nproc-per-node K -m draftfeed.server.cli serve`), replies compared, tokens/s of each, and optionally a short
training job through each.

    python bench/tp_check.py --model DIR [--tp 2] [--dtype bfloat16] [--out FILE.md] [--train-seconds 10]

Both servers run as real subprocesses on free local ports (TP=1 on GPU 0; on the CPU both with gloo and
`--device cpu`); the remote clients (EAGLE-3 with a draft vocab, DFlash with full logits, DSpark) ask both the
same `--compare-batch` x `--compare-seq` tokens. Throughput: for each of `--throughput-algos`, one client with
4 requests in flight for `--seconds`, batches of `--batch` x `--seq` tokens, with `--encodings` (default: the
client's default, `exact`). `--train-seconds N`: the real training loop (bench/train_throughput.py, random
token rows, `--train-algo`, B=`--train-batch` x `--seq`) through the TP=K server and then the TP=1 server, on
`--trainer-device`: training tok/s, steps, last loss. A random-weight 8B-dims target for it:
`python bench/train_throughput.py make-target --dims llama-3.1-8b --device cuda:0 --dir DIR`.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time

import torch

from draftfeed.bench import read_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, env, log_path):
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, log_path


def _wait_serving(proc, log_path, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = open(log_path).read()
        m = re.search(r"draftfeed: serving on (grpc://[0-9.]+:[0-9]+)", text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    raise TimeoutError(open(log_path).read()[-4000:])


def _rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)), float((a - b).abs().max() / b.abs().max())


def _compare(url1, url2, vocab, batch, seq):
    from draftfeed.client.remote import (
        RemoteDFlashTargetModel,
        RemoteDSparkTargetModel,
        RemoteEagle3TargetModel,
    )

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    attn = torch.ones_like(ids)
    loss = torch.ones_like(ids)
    sel = torch.randperm(vocab, generator=g)[: min(8192, vocab)].sort().values
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[sel] = True
    rows = []
    for cls, kw in [
        (RemoteEagle3TargetModel, {}),
        (RemoteDFlashTargetModel, {"capture_logits": True}),
        (RemoteDSparkTargetModel, {}),
    ]:
        got = []
        for url in (url1, url2):
            with cls.from_urls([url], cache_dir=None, **kw) as r:
                if cls is RemoteEagle3TargetModel:
                    r.set_vocab_mapping(sel, mask)
                got.append((r.generate_batch(ids, attn, loss).tensors(), r.info.fingerprint))
        (a, fa), (b, fb) = got
        assert fa == fb, f"fingerprints differ: {fa} vs {fb}"
        for name in a:
            if a[name].is_floating_point():
                rel, mx = _rel(b[name], a[name])
                extra = ""
                if name in ("target_probs", "logits"):
                    pa = a[name].float().softmax(-1) if name == "logits" else a[name].float()
                    pb = b[name].float().softmax(-1) if name == "logits" else b[name].float()
                    top1 = float((pa.argmax(-1) == pb.argmax(-1)).float().mean())
                    kl = float((pa * (pa.clamp_min(1e-30).log() - pb.clamp_min(1e-30).log())).sum(-1).mean())
                    extra = f"top-1 agree {top1:.4f}, KL {kl:.2e}"
                rows.append((cls.algorithm, name, tuple(a[name].shape), rel, mx, extra))
            elif name == "position_mask" or not torch.equal(a[name], b[name]):
                agree = float((a[name] == b[name]).float().mean())
                rows.append((cls.algorithm, name, tuple(a[name].shape), 0.0, 0.0, f"agree {agree:.6f}"))
    return rows


def _remote_class(algo):
    from draftfeed.client.remote import (
        RemoteDFlashTargetModel,
        RemoteDSparkTargetModel,
        RemoteEagle3TargetModel,
    )

    classes = {
        "eagle3": RemoteEagle3TargetModel,
        "dflash": RemoteDFlashTargetModel,
        "dspark": RemoteDSparkTargetModel,
    }
    if algo not in classes:
        raise SystemExit(f"unknown algorithm {algo!r}: pick from {', '.join(classes)}")
    return classes[algo]


def _throughput(url, vocab, batch, seq, seconds, algo="dspark", encodings=None, device="cpu"):
    cls = _remote_class(algo)
    ids = torch.randint(3, vocab, (batch, seq))
    attn, loss = torch.ones_like(ids), torch.ones_like(ids)
    with cls.from_urls([url], device=device, cache_dir=None, max_in_flight=4, encodings=encodings) as r:
        if algo == "eagle3":
            sel = torch.arange(min(8192, vocab))
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[sel] = True
            r.set_vocab_mapping(sel, mask)
        for _ in range(3):
            r.generate_batch(ids, attn, loss)
        t0, n, futures = time.perf_counter(), 0, []
        while time.perf_counter() - t0 < seconds:
            futures.append(r.generate_batch_async(ids, attn, loss))
            if len(futures) >= 4:
                futures.pop(0).result()
                n += 1
        for f in futures:
            f.result()
            n += 1
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize(device)
        return n * batch * seq / (time.perf_counter() - t0)


def _train_through(url, args, label):
    """The real training loop through `url` for `args.train_seconds` (after 2 warm-up steps): a result line."""
    from pathlib import Path

    from draftfeed.bench import train_throughput as tt

    out = Path(args.logs) / f"train_{label.replace('=', '')}"
    try:
        trainer, backend, wire, cfg = tt.build(
            args.train_algo, args.model, url, args.train_batch, args.seq, args.encodings, args.train_seconds,
            out, f"tp-check-{label}",
        )  # fmt: skip
        tps, wait, _, steps, _ = tt.timed_train(trainer, cfg, args.train_seconds)
        backend.close()
    except Exception as err:  # noqa: BLE001 - a failed job is a result line, not the end of the report
        return f"- {label}: training failed: {err!r}"[:600]
    metrics = cfg.out_dir / "metrics.jsonl"
    records = read_jsonl(metrics)
    last = f"{records[-1]['loss']:.4f}" if records else "-"
    per_token = f", {wire['bytes'] / wire['tokens']:,.0f} reply bytes/token" if wire["tokens"] else ""
    return (
        f"- {label}: {tps:,.0f} training tok/s ({args.train_algo}, {args.train_batch}x{args.seq}, {steps} steps in "
        f"{args.train_seconds:g} s after 2 warm-up steps), target wait {100 * wait:.0f}%, last loss {last}{per_token}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto", help="the servers' device: auto, cuda, cpu (gloo)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--compare-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--compare-seq", type=int, default=None, help="default: --seq")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--throughput-algos", default="dspark", help="comma-separated: eagle3, dflash, dspark")
    p.add_argument("--encodings", default=None, help="client encodings for the throughput and training runs")
    p.add_argument("--train-seconds", type=float, default=0, help="0: no training job")
    p.add_argument("--train-algo", default="eagle3", choices=("eagle3", "dflash", "dspark"))
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument(
        "--trainer-device",
        default="auto",
        help="the training job's and throughput clients' device: auto, cpu, cuda:N",
    )
    p.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    p.add_argument("--logs", default="/tmp")
    args = p.parse_args(argv)
    for algo in args.throughput_algos.split(","):
        _remote_class(algo)  # a typo fails here, before two servers load
    from draftfeed.bench import train_throughput as tt

    dev = tt.set_trainer_device(args.trainer_device)  # the throughput clients decode there too
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["serve", "--model", args.model, "--dtype", args.dtype, "--device", args.device]
    p1, p2 = _free_port(), _free_port()
    env1 = dict(env, CUDA_VISIBLE_DEVICES="0") if torch.cuda.is_available() else env
    one = _start(
        [sys.executable, "-m", "draftfeed.server.cli", *common, "--port", str(p1)],
        env1,
        f"{args.logs}/tp1.log",
    )
    tp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}"]
    many = _start(
        [*tp_cmd, "-m", "draftfeed.server.cli", *common, "--port", str(p2)], env, f"{args.logs}/tpk.log"
    )
    procs = [one[0], many[0]]
    try:
        t0 = time.perf_counter()
        url1, url2 = _wait_serving(*one), _wait_serving(*many)
        from draftfeed.client.remote import RemoteDSparkTargetModel

        with RemoteDSparkTargetModel.from_urls([url1], cache_dir=None) as r:
            info = r.info
        emit(f"# Tensor parallel: TP={args.tp} vs TP=1 (bench/tp_check.py, {time.strftime('%Y-%m-%d')})")
        emit()
        emit(f"Command: `python bench/tp_check.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
        emit()
        emit(
            f"- target: {info.architectures[0]}, {info.num_hidden_layers} layers, hidden {info.hidden_size}, "
            f"vocab {info.vocab_size}, {info.dtype}, fingerprint {info.fingerprint}"
        )
        emit(
            f"- device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'} "
            f"x{torch.cuda.device_count()}; torch {torch.__version__}; both servers up in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        cb, cs = args.compare_batch or args.batch, args.compare_seq or args.seq
        emit(f"\n## TP={args.tp} vs TP=1 on one batch of {cb}x{cs} random tokens\n")
        emit("| algorithm | field | shape | rel. L2 error | max abs err / max abs | |")
        emit("|---|---|---|---|---|---|")
        for algo, name, shape, rel, mx, extra in _compare(url1, url2, info.vocab_size, cb, cs):
            emit(f"| {algo} | {name} | {list(shape)} | {rel:.2e} | {mx:.2e} | {extra} |")
        enc = args.encodings or "default (exact)"
        emit(
            f"\n## tokens/s (encodings {enc}, one client decoding on {dev}, 4 in flight, "
            f"{args.batch}x{args.seq} per request)\n"
        )
        emit(f"| algorithm | TP=1 tok/s | TP={args.tp} tok/s | TP={args.tp} / TP=1 |")
        emit("|---|---:|---:|---:|")
        for algo in args.throughput_algos.split(","):
            got = [
                _throughput(
                    url, info.vocab_size, args.batch, args.seq, args.seconds, algo, args.encodings, dev
                )
                for url in (url1, url2)
            ]
            emit(f"| {algo} | {got[0]:,.0f} | {got[1]:,.0f} | {got[1] / got[0]:.2f} |")
        if args.train_seconds > 0:
            emit(
                f"\n## A training job through each server (the real loop, random token rows, trainer on {dev})\n"
            )
            emit(_train_through(url2, args, f"TP={args.tp}"))
            emit(_train_through(url1, args, "TP=1"))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        emit(f"\nexit codes after SIGTERM: TP=1 {procs[0].returncode}, TP={args.tp} {procs[1].returncode}")
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # grpc / loader threads of the training jobs must not hold the process open
