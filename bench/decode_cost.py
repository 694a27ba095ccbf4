"""Trainer-side cost of `latent` supervision: decoding a reply vs one EAGLE-3 draft training step.

With `latent`, the server ships the shifted final-norm hidden state [B,S,H] (bf16 or fp8), fp8 aux
states, the bit-packed `position_mask` and narrow ids; the trainer rebuilds `target_probs` =
softmax(h @ lm_head[selected_token_ids].T) in fp32 from the lm_head rows it fetched once. This
times, at the same batch and on the same device:

  decode   `decode_fields` of that reply (fp8 aux, final state, mask, ids) + `latent_target_probs`
  probs    `latent_target_probs` alone
  step     one draft training step: `eagle3_batch_loss` forward + backward + AdamW step on
           trainer/models/eagle3.py's draft (bf16 autocast on GPU as trainer/loop.py does, fp32 on CPU)

for SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B dimensions (random weights; draft vocab 32000 where
the target vocab allows). Target (issue 6): decode < 5% of a step.

    python bench/decode_cost.py --out bench/results            # CPU here: small batches
    python bench/decode_cost.py --seq 2048 --out $OUT          # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from draftfeed.client.encodings import latent_target_probs
from draftfeed.client.payload import decode_fields, encode_fields, resolve_encodings
from draftfeed.trainer.losses import eagle3_batch_loss
from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

DIMS = {  # hidden, heads, kv heads, intermediate, vocab
    "smollm2-135m": (576, 9, 3, 1536, 49152),
    "llama-3.2-1b": (2048, 32, 8, 8192, 128256),
    "llama-3.1-8b": (4096, 32, 8, 14336, 128256),
}
CPU_SEQ = {"smollm2-135m": 256, "llama-3.2-1b": 128, "llama-3.1-8b": 64}  # 2-core CPU: a step in seconds
LATENT = {"hidden": "fp8", "final": "bf16", "probs": "latent", "mask": "bits", "ids": "narrow"}
DRAFT_VOCAB = 32000
TTT_STEPS = 4  # trainer/config.py's default


def _timed(fn, device: torch.device, iters: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `iters` runs after `warmup` (synchronised on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(name: str, batch: int, seq: int, device: torch.device, iters: int) -> dict:
    hidden, heads, kv, inter, vocab = DIMS[name]
    vd = min(DRAFT_VOCAB, vocab)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the target's dtype
    sel = torch.randperm(vocab, generator=g)[:vd].sort().values
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[sel] = True
    lm_head_rows = (torch.randn(vd, hidden, generator=g) * 0.02).to(device, dtype)  # cached once per job

    # the reply as the server encodes it, on the host, as the trainer receives it
    aux = torch.randn(batch, seq, 3 * hidden, generator=g).to(dtype)
    final = torch.randn(batch, seq, hidden, generator=g).to(dtype)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ones = torch.ones(batch, seq, dtype=torch.long)
    fields = dict(
        aux_hidden_states=aux, input_ids=ids, attention_mask=ones, loss_mask=ones,
        final_hidden=final, position_mask=torch.rand(batch, seq, 1, generator=g) > 0.3,
    )  # fmt: skip
    tensors, meta = encode_fields(fields, resolve_encodings(LATENT), hidden, vocab_size=vocab)
    if device.type == "cuda":
        tensors = {k: v.pin_memory() for k, v in tensors.items()}

    def decode():
        out = decode_fields(tensors, meta, device)
        out["target_probs"] = latent_target_probs(out.pop("final_hidden"), lm_head_rows)
        return out

    decoded = decode()
    h_final = final.to(device)

    cfg = Eagle3DraftConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
        vocab_size=vocab, draft_vocab_size=vd, max_position_embeddings=max(2048, seq),
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        draft = Eagle3DraftModel(cfg)
    draft.set_vocab_mapping(sel.to(device), mask.to(device))
    optim = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-4)
    inputs = {
        "hidden_states": decoded["aux_hidden_states"],
        "input_ids": decoded["input_ids"],
        "attention_mask": decoded["attention_mask"],
        "loss_mask": decoded["loss_mask"],
        "target_probs": decoded["target_probs"],
        "position_mask": decoded["position_mask"],
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with autocast:
            loss = eagle3_batch_loss(draft, inputs, ttt_steps=TTT_STEPS).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step_s = _timed(step, device, iters)
    decode_s = _timed(decode, device, iters)
    probs_s = _timed(lambda: latent_target_probs(h_final, lm_head_rows), device, iters)
    return dict(
        name=name, batch=batch, seq=seq, vd=vd, hidden=hidden, step_s=step_s, decode_s=decode_s,
        probs_s=probs_s, frac=decode_s / step_s, probs_frac=probs_s / step_s,
    )  # fmt: skip


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default=",".join(DIMS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--seq", type=int, default=None, help="tokens per row (default: 2048 on a GPU, small on CPU)"
    )
    ap.add_argument("--iters", type=int, default=None, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    iters = args.iters or (10 if device.type == "cuda" else 3)
    rows = []
    for name in args.dims.split(","):
        seq = args.seq or (2048 if device.type == "cuda" else CPU_SEQ[name])
        r = measure(name, args.batch, seq, device, iters)
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(
            f"{name:13s} B={r['batch']} S={r['seq']:5d} Vd={r['vd']}: step {1e3 * r['step_s']:9.1f} ms, "
            f"decode {1e3 * r['decode_s']:8.2f} ms ({100 * r['frac']:.2f}% of a step), "
            f"latent probs alone {1e3 * r['probs_s']:8.2f} ms ({100 * r['probs_frac']:.2f}%)",
            flush=True,
        )
    write(rows, device, args)
    return rows


def write(rows: list[dict], device: torch.device, args) -> Path:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    date = datetime.date.today().isoformat()
    cmd = "python bench/decode_cost.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Trainer-side decode of `latent` supervision vs one EAGLE-3 draft training step ({date})",
        "",
        f"Device: {name}; torch {torch.__version__}. Command: `{cmd}`.",
        "Random weights. `decode` = `decode_fields` of a latent+fp8 reply (fp8 aux, bf16 final state, bit-packed",
        "mask, narrow ids) onto the device + `latent_target_probs` (fp32 softmax over the draft vocab from the",
        "cached lm_head rows); `step` = `eagle3_batch_loss` (TTT 4) forward + backward + AdamW step on the",
        f"EAGLE-3 draft ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}); medians. Target: decode < 5% of a step.",
        "",
        "| dims | B x S | draft vocab | step ms | decode ms | decode / step | latent probs ms | probs / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['batch']} x {r['seq']} | {r['vd']} | {1e3 * r['step_s']:.1f} | "
            f"{1e3 * r['decode_s']:.2f} | {100 * r['frac']:.2f}% | {1e3 * r['probs_s']:.2f} | {100 * r['probs_frac']:.2f}% |"
        )
    tag = "cpu" if device.type == "cpu" else name.replace(" ", "_")
    out = Path(args.out) / f"decode_cost-{tag}-{date}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
