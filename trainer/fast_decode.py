"""Fast greedy decoding of an HF target: a static KV cache, masks built on the device, CUDA graphs.

A small target decoding at batch 1 (evaluation) or a few hundred rows (regeneration) is launch-bound: the
HF forward issues hundreds of kernels per step and a `DynamicCache` grows by concatenation. Here the cache
is preallocated (`StaticKV`: the forward writes its new rows in place at columns the caller names), the
attention mask is a 4-D additive mask computed on the device from those columns (HF passes a 4-D mask
through unchanged), and a step of fixed shape is captured once as a CUDA graph (`Graphed`) and replayed:
one launch per step, no host sync inside. On CPU, or when a capture fails, the same functions run eagerly.

Columns: batch rows are left-padded to a common width; row b's tokens start at column `valid_from[b]`, a
query at column c sees the columns valid_from[b]..c. Entries past the current column (a rejected draft's
rows, stale text of an earlier prompt) are never seen, so nothing is ever cropped or cleared: the next
step overwrites them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

__all__ = ["StaticKV", "Graphed", "causal_mask", "static_forward", "greedy_generate"]

log = logging.getLogger("draftfeed.fast_decode")


class StaticKV:
    """A preallocated KV cache that HF attention layers write through `update` (duck-typed HF `Cache`).

    Before a forward the caller sets `columns` (long [m], on the device): the new keys / values of the
    forward's m positions go there, in rows `rows` (a slice, for a prefill in row chunks)."""

    def __init__(
        self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device
    ):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.columns: torch.Tensor | None = None
        self.rows = slice(None)

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> StaticKV:
        from draftfeed.target.capture import text_config

        cfg = text_config(model.config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch, kv_heads, max_len, head_dim, p.dtype, p.device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx][self.rows], self.values[layer_idx][self.rows]
        k.index_copy_(2, self.columns, key_states.to(k.dtype))
        v.index_copy_(2, self.columns, value_states.to(v.dtype))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def __len__(self) -> int:
        return len(self.keys)


def causal_mask(columns: torch.Tensor, valid_from: torch.Tensor, max_len: int, dtype) -> torch.Tensor:
    """Additive [B,1,m,L] mask: query column c of row b sees the columns valid_from[b]..c."""
    cols = torch.arange(max_len, device=columns.device)
    ok = (cols[None, None, :] <= columns[None, :, None]) & (cols[None, None, :] >= valid_from[:, None, None])
    mask = torch.zeros(ok.shape, dtype=dtype, device=columns.device)
    return mask.masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def static_forward(model, kv: StaticKV, ids, columns, valid_from, logits_to_keep: int = 0):
    """The model over ids [B,m] at cache `columns` [m] (row b's positions: columns - valid_from[b]).

    Steps of up to `GQA_MAX_QUERIES` tokens run their attention through `gqa_attention` (HF's sdpa and eager
    paths copy the whole cache to every query head when a mask is given); longer ones (a prefill) keep the
    model's own attention."""
    kv.columns = columns
    positions = (columns[None, :] - valid_from[:, None]).clamp_min(0)
    mask = causal_mask(columns, valid_from, kv.max_len, kv.keys[0].dtype)
    cfg = model.config
    before = getattr(cfg, "_attn_implementation", None)
    swap = ids.shape[1] <= GQA_MAX_QUERIES and before in ("sdpa", "eager")
    if swap:
        _register_gqa()
        cfg._attn_implementation = GQA_ATTENTION
    try:
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{_cache_kwarg(model): kv},
        ).logits
    finally:
        if swap:
            cfg._attn_implementation = before


GQA_ATTENTION = "draftfeed_gqa"
GQA_MAX_QUERIES = 16
_registered = False


def gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention with grouped KV heads without copying them: query [B,H,m,d], key / value [B,Hkv,L,d], an
    additive mask [B,1,m,L]. The g = H / Hkv query heads of a KV head are one [g*m, d] block against it.
    Returns [B,m,H,d] (HF's attention-interface convention)."""
    b, h, m, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    g = h // kvh
    scale = d**-0.5 if scaling is None else scaling
    scores = torch.matmul(query.reshape(b, kvh, g * m, d), key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length].float()  # [B,1,m,L]
        scores = (scores.view(b, kvh, g, m, length) + mask[:, :, None]).view(b, kvh, g * m, length)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).view(b, h, m, d)
    return out.transpose(1, 2).contiguous(), None


def _register_gqa() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(GQA_ATTENTION, gqa_attention)
        _registered = True


def _cache_kwarg(model) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier; later ones warn about it)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Graphed:
    """`fn` (no arguments: it reads and writes static tensors) captured as a CUDA graph on first `capture`,
    replayed by calling; eager on CPU, when disabled, or when the capture fails (one warning). Capturing runs
    `fn` twice for warm-up, so it must be harmless to run with whatever the buffers hold."""

    def __init__(self, fn: Callable[[], None], device: torch.device, enabled: bool = True, name: str = ""):
        self.fn, self.name = fn, name
        self.graph = None
        self.enabled = enabled and device.type == "cuda"

    def capture(self) -> Graphed:
        if not self.enabled or self.graph is not None:
            return self
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.fn()
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure means: run eagerly
            log.warning("CUDA graph capture of %s failed (%s); running it eagerly", self.name, err)
            torch.cuda.synchronize()
            self.enabled = False
        return self

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def _bucket(n: int, step: int = 64) -> int:
    return -(-n // step) * step


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    *,
    graphs: bool = True,
    check_every: int = 16,
    prefill_rows: int = 32,
) -> list[list[int]]:
    """Greedy continuations of token-id `prompts` (one batch), each cut after its first eos (kept) or at
    `max_new_tokens`. Rows are left-padded to a multiple of 64; the prefill runs `prefill_rows` rows at a
    time, then one graphed step per token for all rows; finished rows are checked every `check_every` steps."""
    device = next(model.parameters()).device
    b = len(prompts)
    width = _bucket(max(len(p) for p in prompts))
    kv = StaticKV.for_model(model, b, width + max_new_tokens)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    ids = ids.to(device)
    valid_from = torch.tensor([width - len(p) for p in prompts], device=device)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    tok = torch.empty((b, 1), dtype=torch.long, device=device)
    cols = torch.arange(width, device=device)
    for r in range(0, b, prefill_rows):
        kv.rows = slice(r, r + prefill_rows)
        logits = static_forward(model, kv, ids[kv.rows], cols, valid_from[kv.rows], logits_to_keep=1)
        tok[kv.rows] = logits[:, -1].argmax(-1, keepdim=True)
    kv.rows = slice(None)
    out[:, 0] = tok[:, 0]
    done = torch.isin(tok[:, 0], eos)
    column = torch.full((1,), width, dtype=torch.long, device=device)  # the column tok sits at

    def step():
        logits = static_forward(model, kv, tok, column, valid_from)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.index_copy_(1, column - width + 1, nxt)
        tok.copy_(nxt)
        done.logical_or_(torch.isin(nxt[:, 0], eos))
        column.add_(1)

    g = Graphed(step, device, graphs, name=f"greedy step {b}x{kv.max_len}")
    if max_new_tokens > 3 and g.enabled:  # the warm-up writes out[:, 1:3]
        saved = (tok.clone(), done.clone(), out.clone())
        g.capture()  # the warm-up steps ran: put the state back
        tok.copy_(saved[0]), done.copy_(saved[1]), out.copy_(saved[2]), column.fill_(width)
    for n in range(1, max_new_tokens):
        g()
        if n % check_every == 0 and bool(done.all()):
            break
    rows = out.cpu().tolist()
    eos_set = set(eos_ids)
    result = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result
