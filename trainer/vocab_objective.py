"""The block drafts' full-vocab objective with its gradient written out (docs/architecture.md sections 2-3).

Per supervised row: z = softcap(h W^T) + e W2^T (the Markov bias e = W1[prev], DSpark only), ce = lse(z) -
z[y], hit = argmax(z) == y, and for DSpark tv = sum_v |softmax(z) - softmax(softcap(t W^T))| against the
teacher state t. Rows go through in chunks; a chunk's [rows, V] logits exist only while that chunk is
scored: the forward keeps h, e, t, the labels and the two log-normalisers, and the backward recomputes the
chunk's logits and writes

    dz = g_ce (q - onehot(y)) + g_tv q (s - <q, s>),   q = softmax(z), s = sign(q - p_teacher)

(times 1 - tanh^2 through the softcap for the lm_head part), so each chunk costs two lm_head products in the
forward (student, teacher) and three in the backward (both again, and dz W), with no autograd graph over
[rows, V]. The elementwise bodies are pure functions that `compiling` fuses into one kernel each (on by
default on CUDA): each [rows, V] logits chunk is then read once or twice per pass. The frozen lm_head W is
cast to the compute dtype once per call (bf16 under autocast), not per chunk.
"""

from __future__ import annotations

import torch

from .compiling import Compiled

__all__ = ["vocab_objective"]


def _logits(zr, br, cap: float | None):
    z = zr.float()
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    return z if br is None else z + br.float()


def _forward(zr, br, tr, labels, cap: float | None):
    """(ce, tv or None, hit, lse, teacher lse or None) of one chunk from its raw [rows, V] products."""
    z = _logits(zr, br, cap)
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(-1, labels[:, None]).squeeze(-1)
    hit = z.argmax(-1) == labels
    if tr is None:
        return ce, None, hit, lse, None
    zt = _logits(tr, None, cap)
    lse_t = torch.logsumexp(zt, dim=-1)
    tv = (torch.exp(z - lse[:, None]) - torch.exp(zt - lse_t[:, None])).abs().sum(-1)
    return ce, tv, hit, lse, lse_t


def _backward(zr, br, tr, labels, lse, lse_t, g_ce, g_tv, cap: float | None):
    """(dz of the lm_head product, dz of the Markov bias) in the products' dtype (the same tensor twice
    without a softcap)."""
    z = _logits(zr, br, cap)
    q = torch.exp(z - lse[:, None])
    onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == labels[:, None]
    dz = g_ce[:, None] * (q - onehot.float())
    if tr is not None:
        p = torch.exp(_logits(tr, None, cap) - lse_t[:, None])
        s = torch.sign(q - p)
        dz = dz + g_tv[:, None] * q * (s - (q * s).sum(-1, keepdim=True))
    if cap is None:
        out = dz.to(zr.dtype)
        return out, out
    t = torch.tanh(zr.float() / cap)
    return (dz * (1 - t * t)).to(zr.dtype), dz.to(zr.dtype)


_forward_kernel = Compiled(_forward)
_backward_kernel = Compiled(_backward)


class _VocabChunk(torch.autograd.Function):
    """One chunk. Inputs: h [R,H], e [R,r] or None, w2 [V,r] (trainable, fp32 gradient) or None, w2c (w2 in
    the compute dtype, no grad), w [V,H] (frozen, compute dtype), labels [R], t [R,H] or None."""

    @staticmethod
    def forward(ctx, h, e, w2, w2c, w, labels, t, cap, dtype):
        hc = h.to(dtype)
        ec = None if e is None else e.to(dtype)
        zr = hc @ w.T
        br = None if ec is None else ec @ w2c.T
        tr = None if t is None else t.to(dtype) @ w.T
        ce, tv, hit, lse, lse_t = _forward_kernel(zr, br, tr, labels, cap)
        ctx.cap, ctx.dtype = cap, dtype
        ctx.h_dtype = h.dtype
        ctx.e_dtype = None if e is None else e.dtype
        ctx.save_for_backward(hc, ec, w2c, w, labels, t, lse, lse_t)
        ctx.mark_non_differentiable(hit)
        if tv is None:
            tv = ce.new_zeros(0)
        return ce, tv, hit

    @staticmethod
    def backward(ctx, g_ce, g_tv, _):
        hc, ec, w2c, w, labels, t, lse, lse_t = ctx.saved_tensors
        zr = hc @ w.T
        br = None if ec is None else ec @ w2c.T
        tr = None if t is None else t.to(ctx.dtype) @ w.T
        if g_ce is None:
            g_ce = lse.new_zeros(lse.shape)
        if tr is not None and g_tv is None:
            g_tv = lse.new_zeros(lse.shape)
        dz, db = _backward_kernel(zr, br, tr, labels, lse, lse_t, g_ce.float(), g_tv, ctx.cap)
        dh = (dz @ w).to(ctx.h_dtype)
        de = dw2 = None
        if ec is not None:
            de = (db @ w2c).to(ctx.e_dtype)
            dw2 = (db.T @ ec).float()
        return dh, de, dw2, None, None, None, None, None, None


def vocab_objective(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    markov_embed: torch.Tensor | None = None,
    markov_weight: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    final_logit_softcapping: float | None = None,
    chunk_rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ce [R] fp32, tv [R] fp32 or None without a teacher, hit [R] bool) for hidden [R,H], labels [R].

    `markov_embed` [R,r] = W1[prev] and `markov_weight` W2 [V,r] add the Markov bias; `teacher_hidden`
    [R,H] adds the TV term. Products run in the autocast dtype when autocast is on, else in hidden's.
    """
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    w = lm_head_weight.detach().to(dtype)
    w2c = None if markov_weight is None else markov_weight.detach().to(dtype)
    cap = None if final_logit_softcapping is None else float(final_logit_softcapping)
    step = max(1, chunk_rows)
    ces, tvs, hits = [], [], []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, hidden.shape[0], step):
            part = slice(start, start + step)
            ce, tv, hit = _VocabChunk.apply(
                hidden[part],
                None if markov_embed is None else markov_embed[part],
                markov_weight,
                w2c,
                w,
                labels[part],
                None if teacher_hidden is None else teacher_hidden[part],
                cap,
                dtype,
            )
            ces.append(ce)
            tvs.append(tv)
            hits.append(hit)
    if not ces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (None if teacher_hidden is None else empty), labels.new_zeros(0, dtype=torch.bool)
    tv = None if teacher_hidden is None else torch.cat(tvs)
    return torch.cat(ces), tv, torch.cat(hits)
