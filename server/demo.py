"""`draftfeed demo`: a server on the default target and two jobs (EAGLE-3, DSpark) sharing it."""

from __future__ import annotations

import threading
import time

import torch

from draftfeed.client.remote import RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.client.vocab import TokenCounter, build_token_map
from draftfeed.target.loading import load_target, load_tokenizer

from .app import TargetServer
from .config import ServeConfig

__all__ = ["DEMO_PROMPTS", "chat_batch", "run_demo"]

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


def run_demo(cfg: ServeConfig, steps: int = 4, draft_vocab: int = 8192) -> int:
    """Serve the target on a free local port and run an EAGLE-3 and a DSpark job against it at once."""
    device = cfg.resolved_device()
    tokenizer = load_tokenizer(cfg.model)
    model = load_target(cfg.model, device=device, dtype="bfloat16" if device.startswith("cuda") else None)
    server = TargetServer(cfg, model=model, tokenizer=tokenizer).start()
    print(
        f"server: {type(model).__name__} ({server.info.num_hidden_layers} layers, {server.info.dtype}) on {server.url}"
    )
    batch = chat_batch(tokenizer)
    b, s = batch["input_ids"].shape
    counter = TokenCounter(server.info.vocab_size)
    counter.update(batch["input_ids"], batch["loss_mask"])
    specials = [
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    ]
    mapping = build_token_map(counter.counts, draft_vocab, specials)
    results: dict[str, tuple] = {}

    def job(name: str, backend) -> None:
        with backend:
            if name == "eagle3":
                backend.set_vocab_mapping(*mapping)
            backend.generate_batch(**batch)  # warm-up
            start = time.perf_counter()
            futures = [backend.generate_batch_async(**batch) for _ in range(steps)]
            out = [f.result() for f in futures][-1]
            st = server.sessions.get(backend.servers[0].session_id).stats
            results[name] = (
                time.perf_counter() - start,
                out,
                backend.layer_ids,
                st.bytes_sent / max(st.tokens, 1),
            )

    jobs = {
        "eagle3": RemoteEagle3TargetModel.from_urls([server.url], job_name="demo-eagle3", max_in_flight=2),
        "dspark": RemoteDSparkTargetModel.from_urls([server.url], job_name="demo-dspark", max_in_flight=2),
    }
    threads = [threading.Thread(target=job, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{steps} requests of {b} chats x {s} tokens per job, both jobs at once:")
    for name, (secs, out, layers, per_tok) in results.items():
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in out.tensors().items())
        print(
            f"  {name:7s} layers {layers}: {steps * b * s / secs:8,.0f} tok/s, {per_tok:,.0f} bytes/token\n          {shapes}"
        )
    server.stop(grace=1)
    return 0 if len(results) == len(jobs) else 1
