"""Encodings benchmark: bytes per token, encode/decode speed and fidelity on a target's real activations.

`run_encoding_bench(model, tokenizer, prompts, out_path)` runs one forward of a HuggingFace causal LM
(with `output_hidden_states`, fine for a benchmark), builds the EAGLE-3 reply tensors the server
would send (aux hidden states, shifted final-norm hidden state, draft-vocab `target_probs` over the
most frequent ids, `position_mask`, ids), encodes each with every encoding its kind supports, and
writes a markdown table to `out_path`. Wired later to `draftfeed bench encodings --model PATH`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from draftfeed.client.encodings import (
    Encoded,
    decode,
    encode,
    encoded_nbytes,
    fidelity,
    latent_target_probs,
    supported_encodings,
)
from draftfeed.client.layers import default_eagle3_layer_ids

__all__ = ["run_encoding_bench", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = [
    "Explain how speculative decoding speeds up inference of large language models.",
    "Write a short Python function that returns the n-th Fibonacci number, with a docstring.",
    "What are the main differences between TCP and UDP? Answer in three bullet points.",
    "Translate into French: The weather is lovely today, let us go for a walk by the river.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "List five prime numbers greater than one hundred and explain how you checked them.",
    "Describe the water cycle to a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
]

# Which encodings to try per tensor; ("fp8/layer") is fp8 with one scale per (token, layer) row.
_CASES = {
    "aux_hidden_states": ("hidden", ["raw", "bf16", "fp8", "fp8/layer", "zstd:1"]),
    "final_hidden_shifted": ("hidden", ["raw", "bf16", "fp8", "zstd:1"]),
    "target_probs": ("probs", ["raw", "bf16", "topk:16", "topk:64", "topk:256", "zstd:1"]),
    "position_mask": ("mask", ["raw", "bits"]),
    "input_ids": ("ids", ["raw", "narrow"]),
    "loss_mask": ("ids", ["raw", "narrow"]),
}
_LATENT = ["raw", "bf16", "fp8"]  # encodings of the final hidden state for latent target_probs


def _shift(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int):
    out = fn()  # warm-up (and the result)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


def _token_map(input_ids: torch.Tensor, mask: torch.Tensor, vocab: int, draft_vocab: int) -> torch.Tensor:
    """The `draft_vocab` most frequent supervised ids (ties and unseen ids by ascending id), sorted."""
    counts = torch.bincount(input_ids[mask.bool()].cpu(), minlength=vocab)
    order = torch.sort(-counts, stable=True).indices
    return order[: min(draft_vocab, vocab)].sort().values


@torch.no_grad()
def _reply_tensors(model, input_ids, attention_mask, draft_vocab):
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hs = out.hidden_states
    n = len(hs) - 1
    ids = default_eagle3_layer_ids(n) if n >= 7 else sorted({0, n // 2, n - 1})
    logits = _shift(out.logits)
    loss_mask = _shift(attention_mask)
    selected = _token_map(input_ids, attention_mask, logits.shape[-1], draft_vocab).to(logits.device)
    selected_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    selected_mask[selected] = True
    tensors = {
        "aux_hidden_states": torch.cat([hs[i + 1] for i in ids], dim=-1),
        "final_hidden_shifted": _shift(hs[n]),
        "target_probs": torch.softmax(logits[..., selected].float(), dim=-1),
        "position_mask": (selected_mask[logits.argmax(-1)] & loss_mask.bool()).unsqueeze(-1),
        "input_ids": _shift(input_ids),
        "loss_mask": loss_mask,
    }
    lm_head_rows = model.get_output_embeddings().weight[selected]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return tensors, lm_head_rows, softcap, len(ids)


def _encode_case(t: torch.Tensor, name: str, kind: str, layers: int) -> Encoded:
    if name == "fp8/layer":  # rows of H: one scale per token and layer
        return encode(t.reshape(*t.shape[:-1], layers, t.shape[-1] // layers), "fp8", kind)
    return encode(t, name, kind)


def _fmt_fidelity(fid: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fid.items())


def _projected_8b(layers: int = 3, hidden: int = 4096, draft_vocab: int = 32000) -> list[dict]:
    """Bytes per token of EAGLE-3 replies at Llama-3.1-8B dimensions (bf16 target), from encoding
    random tensors of those shapes: sizes do not depend on values except for zstd and narrow."""
    g = torch.Generator().manual_seed(0)
    tokens = 8
    aux = torch.randn(1, tokens, layers * hidden, generator=g).bfloat16()
    final = torch.randn(1, tokens, hidden, generator=g).bfloat16()
    probs = torch.softmax(torch.randn(1, tokens, draft_vocab, generator=g), -1)
    mask = torch.ones(1, tokens, 1, dtype=torch.bool)
    ids = torch.randint(0, 128256, (1, tokens), generator=g)

    def size(t, name, kind):
        return encoded_nbytes(encode(t, name, kind)) / tokens

    ids_raw = 3 * size(ids, "raw", "ids")  # input_ids, loss_mask, attention_mask
    ids_narrow = size(ids, "narrow", "ids") + 2 * size(mask.long().squeeze(-1), "narrow", "ids")
    aux_fp8 = size(aux, "fp8", "hidden")
    replies = {
        "raw reference (bf16 aux, fp32 probs)": size(aux, "raw", "hidden")
        + size(probs, "raw", "probs")
        + size(mask, "raw", "mask")
        + ids_raw,
        "fp8 aux + bf16 probs": aux_fp8 + size(probs, "bf16", "probs") + size(mask, "bits", "mask") + ids_narrow,
        "fp8 aux + topk:64": aux_fp8 + size(probs, "topk:64", "probs") + size(mask, "bits", "mask") + ids_narrow,
        "latent: bf16 final h + fp8 aux": aux_fp8 + size(final, "raw", "hidden") + size(mask, "bits", "mask")
        + ids_narrow,
        "latent: fp8 final h + fp8 aux": aux_fp8 + size(final, "fp8", "hidden") + size(mask, "bits", "mask")
        + ids_narrow,
    }  # fmt: skip
    raw = next(iter(replies.values()))
    return [{"reply": k, "bytes_per_token": v, "ratio": raw / v} for k, v in replies.items()]


def run_encoding_bench(
    model,
    tokenizer,
    prompts,
    out_path,
    *,
    draft_vocab: int = 32000,
    repeats: int = 3,
    max_length: int = 512,
) -> dict:
    """Benchmark every encoding on `model`'s activations for `prompts`; write markdown to `out_path`.

    `prompts`: strings (tokenised with `tokenizer`, chat template not applied) or, when `tokenizer` is
    None, a LongTensor [B,S] of ids. Returns {"rows": [...], "replies": [...], "projected_8b": [...]}.
    """
    model_device = next(model.parameters()).device
    if tokenizer is None:
        input_ids = torch.as_tensor(prompts, dtype=torch.long)
        attention_mask = torch.ones_like(input_ids)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(
            list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    input_ids, attention_mask = input_ids.to(model_device), attention_mask.to(model_device)
    tensors, lm_head_rows, softcap, layers = _reply_tensors(model, input_ids, attention_mask, draft_vocab)
    tokens = input_ids.numel()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    rows = []
    for field, (kind, names) in _CASES.items():
        for name in names:
            if name.startswith("zstd") and not any(n.startswith("zstd") for n in supported_encodings()[kind]):
                continue  # zstandard is not installed here
            valid = attention_mask if field == "aux_hidden_states" else tensors["loss_mask"]
            rows.append(
                _bench_one(field, kind, name, tensors[field], valid, layers, devices, repeats, tokens)
            )
    for name in _LATENT:
        rows.append(_bench_latent(name, tensors, lm_head_rows, softcap, devices, repeats, tokens))

    by = {(r["tensor"], r["encoding"]): r["bytes_per_token"] for r in rows}
    small = by[("input_ids", "narrow")] + by[("loss_mask", "narrow")] * 2 + by[("position_mask", "bits")]
    replies = {
        "raw reference": by[("aux_hidden_states", "raw")]
        + by[("target_probs", "raw")]
        + by[("position_mask", "raw")]
        + by[("input_ids", "raw")]
        + 2 * by[("loss_mask", "raw")],
        "fp8 aux + topk:64": by[("aux_hidden_states", "fp8")] + by[("target_probs", "topk:64")] + small,
        "latent: raw final h + fp8 aux": by[("aux_hidden_states", "fp8")] + by[("latent", "raw final h")] + small,
        "latent: fp8 final h + fp8 aux": by[("aux_hidden_states", "fp8")] + by[("latent", "fp8 final h")] + small,
    }  # fmt: skip
    raw = replies["raw reference"]
    reply_rows = [{"reply": k, "bytes_per_token": v, "ratio": raw / v} for k, v in replies.items()]
    result = {"rows": rows, "replies": reply_rows, "projected_8b": _projected_8b()}
    text = _markdown(model, tokens, len(lm_head_rows), devices, result)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(text)
    print(text)
    return result


def _bench_one(field, kind, name, ref, valid, layers, devices, repeats, tokens) -> dict:
    """One tensor, one encoding; fidelity over the `valid` [B,S] rows (real or supervised tokens)."""
    row = {"tensor": field, "encoding": name}
    nbytes = ref.numel() * ref.element_size()
    for device in devices:
        if name.startswith("zstd") and device.type != "cpu":
            continue  # CPU-only codec
        t = ref.to(device)
        enc, t_enc = _timed(lambda t=t: _encode_case(t, name, kind, layers), device, repeats)
        dec, t_dec = _timed(lambda enc=enc, d=device: decode(enc, d).reshape(ref.shape), device, repeats)
        row[f"enc_GBps_{device.type}"] = nbytes / t_enc / 1e9
        row[f"dec_GBps_{device.type}"] = nbytes / t_dec / 1e9
        if device.type == "cpu":
            row["bytes_per_token"] = encoded_nbytes(enc) / tokens
            valid = valid.cpu().bool()
            if field == "aux_hidden_states":  # per (token, layer) rows: an outlier layer hides nothing
                split = (*ref.shape[:-1], layers, ref.shape[-1] // layers)
                per_layer = valid.unsqueeze(-1).expand(*valid.shape, layers)
                row["fidelity"] = fidelity(
                    ref.cpu().reshape(split), dec.cpu().reshape(split), kind, per_layer
                )
            elif kind in ("hidden", "probs"):
                row["fidelity"] = fidelity(ref.cpu(), dec.cpu(), kind, valid)
            else:
                row["fidelity"] = fidelity(ref.cpu(), dec.cpu(), kind)
    return row


def _bench_latent(name, tensors, lm_head_rows, softcap, devices, repeats, tokens) -> dict:
    """target_probs rebuilt from the shifted final hidden state sent with hidden encoding `name`."""
    ref_probs, h = tensors["target_probs"], tensors["final_hidden_shifted"]
    row = {"tensor": "latent", "encoding": f"{name} final h"}
    nbytes = ref_probs.numel() * ref_probs.element_size()
    for device in devices:
        enc = encode(h.to(device), name, "hidden")
        rows_d = lm_head_rows.to(device)

        def rebuild(enc=enc, rows_d=rows_d, device=device):
            return latent_target_probs(decode(enc, device), rows_d, final_logit_softcapping=softcap)

        probs, t_dec = _timed(rebuild, device, repeats)
        row[f"dec_GBps_{device.type}"] = nbytes / t_dec / 1e9
        row[f"dec_us_per_token_{device.type}"] = t_dec / tokens * 1e6
        if device.type == "cpu":
            row["bytes_per_token"] = encoded_nbytes(enc) / tokens
            row["fidelity"] = fidelity(
                ref_probs.cpu(), probs.cpu(), "probs", tensors["loss_mask"].cpu().bool()
            )
    return row


def _markdown(model, tokens, draft_vocab, devices, result) -> str:
    cfg = model.config
    name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    dtype = next(model.parameters()).dtype
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = [
        f"# Encodings benchmark: {name}",
        "",
        f"- model dtype {dtype}, hidden size {cfg.hidden_size}, vocab {cfg.vocab_size}, draft vocab {draft_vocab}",
        f"- {tokens} tokens; devices: {', '.join(d.type for d in devices)} (GPU: {gpu}); torch {torch.__version__}",
        "- fidelity over supervised positions (shifted loss mask; attention mask for aux hidden states);",
        "  hidden-state errors are per row, and for aux_hidden_states a row is one token of one layer [H]:",
        "  `fp8` scales each token's [3H] row once, `fp8/layer` encodes aux as [B,S,3,H] (a scale per layer).",
        "- GB/s = bytes of the original tensor / best-of-N wall time (encode includes the NaN/inf check);",
        "  latent decode = fp8/bf16 decode + `latent_target_probs`, rated on the fp32 target_probs it rebuilds.",
        "",
        "| tensor | encoding | bytes/token | enc GB/s CPU | dec GB/s CPU | enc GB/s GPU | dec GB/s GPU | fidelity |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def num(row, key):
        return f"{row[key]:.3g}" if key in row else "-"

    for r in result["rows"]:
        lines.append(
            f"| {r['tensor']} | {r['encoding']} | {r['bytes_per_token']:.1f} | {num(r, 'enc_GBps_cpu')} | "
            f"{num(r, 'dec_GBps_cpu')} | {num(r, 'enc_GBps_cuda')} | {num(r, 'dec_GBps_cuda')} | "
            f"{_fmt_fidelity(r['fidelity'])} |"
        )
    lines += [
        "",
        "## EAGLE-3 reply per token (this model)",
        "",
        "| reply | bytes/token | x fewer |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {r['reply']} | {r['bytes_per_token']:.1f} | {r['ratio']:.2f} |" for r in result["replies"]]
    lines += [
        "",
        "## Projected at Llama-3.1-8B dimensions (H=4096, 3 aux layers, Vd=32000, bf16)",
        "",
        "| reply | KB/token | x fewer |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {r['reply']} | {r['bytes_per_token'] / 1000:.1f} | {r['ratio']:.2f} |"
        for r in result["projected_8b"]
    ]
    lines += ["", "Latent decode (decode + `latent_target_probs`) per token:"]
    for r in result["rows"]:
        if r["tensor"] == "latent":
            costs = [
                f"{k.rsplit('_', 1)[1]} {v:.2f} us" for k, v in r.items() if k.startswith("dec_us_per_token")
            ]
            lines.append(f"- {r['encoding']}: {', '.join(costs)}")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="local HF checkpoint (default: the built-in SmolLM2-135M-Instruct)"
    )
    parser.add_argument(
        "--out", default=None, help="markdown output (default bench/results/encodings_<name>.md)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from draftfeed.target.loading import DEFAULT_TARGET_NAME, load_target, load_tokenizer

    model = load_target(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    name = Path(args.model).name if args.model else DEFAULT_TARGET_NAME
    out = args.out or Path("bench") / "results" / f"encodings_{name}.md"
    run_encoding_bench(model, tokenizer, DEFAULT_PROMPTS, out)


if __name__ == "__main__":
    main()
