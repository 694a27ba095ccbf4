"""Tensor-parallel check: the same target served TP=1 (`draftfeed serve`) and TP=K (`torchrun
--nproc-per-node K -m draftfeed.server.cli serve`), replies compared, tokens/s of each.

    python bench/tp_check.py --model DIR [--tp 2] [--dtype bfloat16] [--out FILE]

Both servers run as real subprocesses on free local ports; the remote clients (EAGLE-3 with a draft
vocab, DFlash with full logits, DSpark) ask both the same batches. Throughput: one DSpark client
with 4 requests in flight for `--seconds`, batches of `--batch`x`--seq` tokens.
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


def _throughput(url, vocab, batch, seq, seconds):
    from draftfeed.client.remote import RemoteDSparkTargetModel

    ids = torch.randint(3, vocab, (batch, seq))
    attn, loss = torch.ones_like(ids), torch.ones_like(ids)
    with RemoteDSparkTargetModel.from_urls([url], cache_dir=None, max_in_flight=4) as r:
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
        return n * batch * seq / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--logs", default="/tmp")
    args = p.parse_args(argv)
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
        url1, url2 = _wait_serving(*one), _wait_serving(*many)
        from draftfeed.client.remote import RemoteDSparkTargetModel

        with RemoteDSparkTargetModel.from_urls([url1], cache_dir=None) as r:
            info = r.info
        print(
            f"target: {info.architectures[0]}, {info.num_hidden_layers} layers, hidden {info.hidden_size}, "
            f"vocab {info.vocab_size}, {info.dtype}, fingerprint {info.fingerprint}"
        )
        print(
            f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'} "
            f"x{torch.cuda.device_count()}; torch {torch.__version__}"
        )
        print(f"\n## TP={args.tp} vs TP=1 on one batch of {args.batch}x{args.seq} random tokens\n")
        print("| algorithm | field | shape | rel. L2 error | max abs err / max abs | |")
        print("|---|---|---|---|---|---|")
        for algo, name, shape, rel, mx, extra in _compare(url1, url2, info.vocab_size, args.batch, args.seq):
            print(f"| {algo} | {name} | {list(shape)} | {rel:.2e} | {mx:.2e} | {extra} |")
        print(
            f"\n## tokens/s (DSpark default layers, raw, 4 in flight, {args.batch}x{args.seq} per request)\n"
        )
        for label, url in (("TP=1", url1), (f"TP={args.tp}", url2)):
            print(
                f"- {label}: {_throughput(url, info.vocab_size, args.batch, args.seq, args.seconds):,.0f} tok/s"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"\nexit codes after SIGTERM: TP=1 {procs[0].returncode}, TP={args.tp} {procs[1].returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
