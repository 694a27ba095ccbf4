"""`draftfeed demo`: the default target in-process on a few chat prompts, per algorithm."""

from __future__ import annotations

import time

import torch

from draftfeed.client.vocab import TokenCounter, build_token_map

from .backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from .loading import load_target, load_tokenizer

__all__ = ["DEMO_PROMPTS", "chat_batch", "run_inprocess_demo"]

DEMO_PROMPTS = [
    (
        "What is speculative decoding?",
        "A small draft model proposes tokens and the large model verifies them.",
    ),
    ("Write a haiku about GPUs.", "Silicon rivers / thousands of cores hum at once / matrices bloom bright."),
    ("Name three prime numbers.", "Two, three and five are prime numbers."),
    ("How do I reverse a list in Python?", "Use `my_list[::-1]` for a copy or `my_list.reverse()` in place."),
]


def chat_batch(tokenizer, prompts=DEMO_PROMPTS) -> dict[str, torch.Tensor]:
    """Right-padded token batch of chats, with the loss mask on the assistant replies."""
    rows, masks = [], []
    for user, reply in prompts:
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        )
        prefix, full = list(_ids(prefix)), list(_ids(full))
        rows.append(full)
        masks.append([0] * len(prefix) + [1] * (len(full) - len(prefix)))
    s = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (s - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (s - len(r)) for r in rows])
    loss = torch.tensor([m + [0] * (s - len(m)) for m in masks])
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _ids(out):
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def run_inprocess_demo(model_path: str | None, device: str, draft_vocab: int = 8192) -> None:
    tokenizer = load_tokenizer(model_path)
    model = load_target(model_path, device=device, dtype="bfloat16" if device.startswith("cuda") else None)
    batch = chat_batch(tokenizer)
    b, s = batch["input_ids"].shape
    print(
        f"target: {type(model).__name__}, {model.config.num_hidden_layers} layers, dtype {model.dtype}, {device}"
    )
    print(f"batch: {b} chats x {s} tokens, {int(batch['loss_mask'].sum())} supervised tokens")
    counter = TokenCounter(model.get_output_embeddings().weight.shape[0])
    counter.update(batch["input_ids"], batch["loss_mask"])
    specials = [
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    ]
    eagle = HFEagle3TargetModel(model)
    eagle.set_vocab_mapping(*build_token_map(counter.counts, draft_vocab, specials))
    backends = {
        "eagle3": eagle,
        "dflash": HFDFlashTargetModel(model),
        "dspark": HFDSparkTargetModel(model),
    }
    for name, backend in backends.items():
        backend.generate_batch(**batch)  # warm-up
        start = time.perf_counter()
        out = backend.generate_batch(**batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        ids = getattr(backend, "aux_layer_ids", None) or backend.target_layer_ids
        shapes = ", ".join(
            f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in out.tensors().items()
        )
        print(f"{name:7s} layers {ids}: {ms:7.1f} ms ({b * s / ms * 1e3:,.0f} tok/s)\n        {shapes}")
