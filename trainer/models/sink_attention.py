"""Attention over a shared key set plus per-slot "sink" keys, merged by log-sum-exp (math only).

EAGLE-3's TTT step k (`eagle3.py`) attends, at slot t, to the step-0 keys K_0 under the causal (padding,
document) mask and to the k keys K_1[t]..K_k[t] of the same slot from the earlier steps, all in one softmax.
Here the first part runs as one fused attention kernel that also returns its log-normaliser lse_0, and the
sinks are merged afterwards:

    s_i = scale Q[t].K_i[t];  lse = log(exp(lse_0) + sum_i exp(s_i))
    out = exp(lse_0 - lse) out_0 + sum_i exp(s_i - lse) V_i[t]

The backward calls the same kernel's backward with the merged `out` and `lse`: its probabilities
exp(S - lse) and its row term D = sum(dout * out) are then exactly those of the one softmax over both parts,
so it returns the K_0 / V_0 gradients and the K_0 part of dQ; the sinks' terms are elementwise:
dS_i = w_i (dout.V_i - D), dQ += scale dS_i K_i, dK_i = scale dS_i Q, dV_i = w_i dout.

Kernels (aten's own, the ones `scaled_dot_product_attention` dispatches to): flash on CUDA for a plain
causal mask in fp16 / bf16, flash's variable-length kernel there for packed documents (`DocumentSpans`: each
document plainly causal, nothing computed across documents), memory-efficient attention with an additive mask
otherwise, and the CPU flash kernel on the CPU. Nothing [B,h,S,S] is materialised beyond an additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftfeed.client.packing import DocumentSpans

__all__ = ["sink_attention"]


def _pad_bias(bias: torch.Tensor, keys: int) -> torch.Tensor:
    """The additive mask with its last dim padded to a multiple of 16 and sliced back (the alignment the
    memory-efficient kernel needs, as `scaled_dot_product_attention` does)."""
    pad = -keys % 16
    return bias if pad == 0 else F.pad(bias, (0, pad))[..., :keys]


class _Kernel:
    """The fused attention of the shared keys: forward -> (out, lse), backward with a given out / lse."""

    def __init__(self, q, k, v, bias, scale):
        self.spans = bias if isinstance(bias, DocumentSpans) else None
        self.bias, self.scale = (None if self.spans is not None else bias), scale
        self.causal = self.bias is None
        if self.spans is not None:
            if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    "packed documents (DocumentSpans) run flash's kernel: CUDA, fp16 or bf16 only"
                )
            self.kind = "varlen"
        elif q.device.type == "cpu":
            self.kind = "cpu"
        elif self.causal and q.dtype in (torch.float16, torch.bfloat16):
            self.kind = "flash"
        else:
            self.kind = "efficient"
        if self.kind == "efficient" and bias is not None:
            b, h, s, _ = q.shape
            self.bias = _pad_bias(bias.to(q.dtype), k.shape[2]).expand(b, h, s, k.shape[2])

    def forward(self, q, k, v):
        aten = torch.ops.aten
        if self.kind == "varlen":
            sp = self.spans
            out, lse, seed, offset, _ = aten._flash_attention_forward(
                sp.flat(q), sp.flat(k), sp.flat(v), sp.cu_seqlens, sp.cu_seqlens, sp.max_len, sp.max_len, 0.0,
                True, False, scale=self.scale,
            )  # fmt: skip
            self.extra = (seed, offset)
            return sp.unflat(out), sp.unflat_lse(lse)
        if self.kind == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, self.causal, attn_mask=self.bias, scale=self.scale
            )
        elif self.kind == "flash":
            res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, self.causal, False, scale=self.scale)
            out, lse = res[0], res[1]
            self.extra = res[2:8]  # cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused
        else:
            out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
                q, k, v, self.bias, True, 0.0, self.causal, scale=self.scale
            )
            self.extra = (seed, offset)
        return out, lse

    def backward(self, dout, q, k, v, out, lse):
        aten = torch.ops.aten
        if self.kind == "varlen":
            sp, (seed, offset) = self.spans, self.extra
            grads = aten._flash_attention_backward(
                sp.flat(dout), sp.flat(q), sp.flat(k), sp.flat(v), sp.flat(out), sp.flat_lse(lse),
                sp.cu_seqlens, sp.cu_seqlens, sp.max_len, sp.max_len, 0.0, True, seed, offset, scale=self.scale,
            )  # fmt: skip
            return tuple(sp.unflat(g) for g in grads)
        if self.kind == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, self.causal, attn_mask=self.bias, scale=self.scale
            )
        if self.kind == "flash":
            cq, ck, mq, mk, seed, offset = self.extra
            return aten._scaled_dot_product_flash_attention_backward(
                dout, q, k, v, out, lse, cq, ck, mq, mk, 0.0, self.causal, seed, offset, scale=self.scale
            )
        seed, offset = self.extra
        grads = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, self.bias, out, lse, seed, offset, 0.0, [True, True, True, False],
            self.causal, scale=self.scale,
        )  # fmt: skip
        return grads[:3]


def _like(template: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` copied into a tensor with `template`'s strides (the kernels' own output layouts)."""
    out = torch.empty_like(template)
    out.copy_(value)
    return out


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k0, v0, bias, scale, n_sinks, *sinks):
        ks, vs = sinks[:n_sinks], sinks[n_sinks:]
        kernel = _Kernel(q, k0, v0, bias, scale)
        out0, lse0 = kernel.forward(q, k0, v0)
        ctx.kernel, ctx.scale, ctx.n_sinks = kernel, scale, n_sinks
        if not ks:  # no sinks (step 0 of packed documents): the kernel's own answer
            ctx.save_for_backward(q, k0, v0, out0, lse0)
            return out0
        s = q.shape[2]
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
        lse0_rows = lse0[..., :s].to(acc)  # the efficient kernel pads lse's last dim
        qf = q.to(acc)
        scores = torch.stack([(qf * ki.to(acc)).sum(-1) for ki in ks], dim=-1) * scale  # [B,h,S,k]
        lse = torch.logaddexp(lse0_rows, torch.logsumexp(scores, dim=-1))
        w = torch.exp(scores - lse[..., None])
        merged = torch.exp(lse0_rows - lse)[..., None] * out0.to(acc)
        for i, vi in enumerate(vs):
            merged = merged + w[..., i, None] * vi.to(acc)
        out = _like(out0, merged)
        lse_full = lse0.clone()
        lse_full[..., :s] = lse.to(lse0.dtype)
        ctx.save_for_backward(q, k0, v0, out, lse_full, w, *ks, *vs)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.n_sinks == 0:
            q, k0, v0, out, lse = ctx.saved_tensors
            return *ctx.kernel.backward(_like(out, dout), q, k0, v0, out, lse), None, None, None
        q, k0, v0, out, lse_full, w, *sinks = ctx.saved_tensors
        ks, vs = sinks[: ctx.n_sinks], sinks[ctx.n_sinks :]
        dout = _like(out, dout)
        dq, dk0, dv0 = ctx.kernel.backward(dout, q, k0, v0, out, lse_full)
        acc = w.dtype
        g = dout.to(acc)
        d_row = (g * out.to(acc)).sum(-1)
        dq = dq.to(acc)
        dks, dvs = [], []
        qf = q.to(acc)
        for i, (ki, vi) in enumerate(zip(ks, vs, strict=True)):
            ds = w[..., i] * ((g * vi.to(acc)).sum(-1) - d_row) * ctx.scale
            dq = dq + ds[..., None] * ki.to(acc)
            dks.append((ds[..., None] * qf).to(ki.dtype))
            dvs.append((w[..., i, None] * g).to(vi.dtype))
        return dq.to(q.dtype), dk0, dv0, None, None, None, *dks, *dvs


def sink_attention(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    sinks: list[tuple[torch.Tensor, torch.Tensor]],
    bias: torch.Tensor | DocumentSpans | None,
    scale: float,
) -> torch.Tensor:
    """softmax over [scale Q K_0^T + bias, s_1..s_k] applied to [V_0; V_1[t]..V_k[t]], all [B,h,S,d].

    `bias` None = plainly causal, a `DocumentSpans` = packed documents, each plainly causal (CUDA, fp16 /
    bf16), else an additive mask [B,1,S,S] (0 allowed, a large negative value not allowed); `sinks` =
    [(K_i, V_i)], possibly none. Gradients for q, k0, v0 and every sink."""
    ks = [k for k, _ in sinks]
    vs = [v for _, v in sinks]
    return _SinkAttention.apply(q, k0, v0, bias, scale, len(sinks), *ks, *vs)
