"""EAGLE-3 training objective: soft cross-entropy over the TTT unroll, step weights, metrics.

Per slot t and step k (docs/architecture.md section 1): l_t = -sum_v P_t(v) log softmax(logits_t)(v),
in fp32, where P, the position mask M and the loss mask LM are shifted left k times at step k (done
here by slicing: step k compares logits_k[:, :S-k] with P[:, k:]). In a packed batch slot t at step
k is supervised only while k < doc_remaining[t], so no prediction crosses a document boundary.

Two normalisations, as the sources disagree:
- "masked_mean" (default; NeMo AutoModel): L_k = sum_t M l / max(1, sum M); L = sum_k w_k L_k / sum_k w_k.
- "full_mean" (EAGLE / SpecForge): L_k = mean over all B*S slots of M l; L = sum_k w_k L_k (unnormalised).
with w_k = decay**k (decay 0.8).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from draftfeed.client.supervision import target_distribution

from .compiling import Compiled
from .models.eagle3 import Eagle3DraftModel, document_ids, tokens_left_in_document

__all__ = [
    "NORMALIZATIONS",
    "Eagle3Loss",
    "soft_cross_entropy",
    "fused_soft_cross_entropy",
    "ttt_step_weights",
    "target_distribution",
    "eagle3_ttt_loss",
    "eagle3_batch_loss",
    "decode_walk",
]

NORMALIZATIONS = ("masked_mean", "full_mean")


@dataclass
class Eagle3Loss:
    """`loss` is differentiable; the rest are detached metrics.

    step_losses [K] (fp32; L_k under the chosen normalisation), step_counts [K] int64 (supervised
    slots per step), step_accuracies [K] (argmax(logits) == argmax(P) over M), `accuracy` over all
    steps' supervised slots, `tau_sim` the simulated acceptance length (bonus token included).
    `chain_run` [B,S] int64: per slot, how many chained draft steps hit from it (0..K), `valid` [B,S] the
    step-0 supervised slots (in-document), for `decode_walk`.
    """

    loss: torch.Tensor
    step_losses: torch.Tensor
    step_counts: torch.Tensor
    step_accuracies: torch.Tensor
    accuracy: torch.Tensor
    tau_sim: torch.Tensor
    chain_run: torch.Tensor | None = None
    valid: torch.Tensor | None = None


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_v P(v) log softmax(logits)(v) over the last dim, in fp32 (fp64 stays fp64): [..., V] -> [...]."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return -(target_probs.to(dtype) * torch.log_softmax(logits.to(dtype), dim=-1)).sum(-1)


def _sce_forward(logits: torch.Tensor, target_probs: torch.Tensor):
    """(loss, lse, mass) of the fused soft cross-entropy: one pass over the logits and the targets."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    mass = target_probs.sum(-1, dtype=torch.float32)
    return lse * mass - (target_probs * z).sum(-1), lse, mass


def _sce_backward(logits, target_probs, lse, mass, grad):
    """dl/dlogits = (softmax(z) sum(P) - P) grad, in the logits' dtype."""
    p = torch.exp(logits.float() - lse[..., None])
    return ((p * mass[..., None] - target_probs) * grad[..., None]).to(logits.dtype)


_sce_forward_kernel = Compiled(_sce_forward)
_sce_backward_kernel = Compiled(_sce_backward)


class _SoftCrossEntropy(torch.autograd.Function):
    """`soft_cross_entropy` with its gradient written out: saves the logits (in their dtype) and the
    fp32 log-normaliser, not the [..., V] fp32 log-probabilities, and needs no autograd graph of the
    elementwise steps. l = lse(z) sum(P) - <P, z>; dl/dz = softmax(z) sum(P) - P. Both bodies are
    compiled (one fused kernel each) when `compiling` is on."""

    @staticmethod
    def forward(ctx, logits, target_probs):
        loss, lse, mass = _sce_forward_kernel(logits, target_probs)
        ctx.save_for_backward(logits, target_probs, lse, mass)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, target_probs, lse, mass = ctx.saved_tensors
        return _sce_backward_kernel(logits, target_probs, lse, mass, grad), None


def fused_soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """`soft_cross_entropy` (fp32 math) through `_SoftCrossEntropy`: the same values, a smaller and
    cheaper backward. fp64 inputs (and targets that need a gradient) take the reference."""
    if logits.dtype == torch.float64 or target_probs.requires_grad:
        return soft_cross_entropy(logits, target_probs)
    return _SoftCrossEntropy.apply(logits, target_probs)


def ttt_step_weights(num_steps: int, decay: float = 0.8) -> list[float]:
    """w_k = decay**k for k = 0..num_steps-1."""
    return [decay**k for k in range(num_steps)]


def eagle3_ttt_loss(
    step_logits: Iterable[torch.Tensor],
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    doc_remaining: torch.Tensor | None = None,
    normalization: str = "masked_mean",
    decay: float = 0.8,
    fused: bool = True,
) -> Eagle3Loss:
    """The TTT loss over `step_logits` (logits_k [B,S,Vd] for k = 0..K-1, a list or a generator).

    `target_probs` P [B,S,Vd], `position_mask` M [B,S] or [B,S,1], `loss_mask` LM [B,S] are the
    step-0 (once-shifted) service tensors; `doc_remaining` [B,S] (packed batches) = tokens left in
    the slot's document after it. Normalisation: see the module docstring ("masked_mean" default).

    Simulated tau (AutoModel): hit_k = AND_{i<=k} correct_i at the same slot, valid_k = AND_{i<=k} LM_i;
    tau_sim = 1 + sum_k sum(hit_k) / max(1, sum(valid_k)).

    `fused` (default) scores each step with `fused_soft_cross_entropy`; False runs the reference
    `soft_cross_entropy` (same values within float rounding).
    """
    sce = fused_soft_cross_entropy if fused else soft_cross_entropy
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; expected one of {NORMALIZATIONS}")
    if position_mask.dim() == 3:
        position_mask = position_mask.squeeze(-1)
    m0, lm0 = position_mask.bool(), loss_mask.bool()
    bsz, seq_len = m0.shape
    hit = torch.ones_like(m0)
    valid = torch.ones_like(m0)
    run = torch.zeros(m0.shape, dtype=torch.long, device=m0.device)
    valid0 = None
    total = weights = None
    losses, counts, correct_counts, tau_terms = [], [], [], []
    with torch.no_grad():
        target_top = target_probs.argmax(-1)  # once, not per step
    for k, logits in enumerate(step_logits):
        n = max(seq_len - k, 0)  # slots whose target is still inside the row
        m, lm = m0[:, k:], lm0[:, k:]
        if doc_remaining is not None:
            in_doc = doc_remaining[:, :n] > k
            m, lm = m & in_doc, lm & in_doc
        step_logits_k = logits[:, :n]
        probs = target_probs[:, k:]
        per_slot = sce(step_logits_k, probs)
        masked_sum = (per_slot * m).sum()
        count = m.sum()
        denom = count.clamp_min(1) if normalization == "masked_mean" else bsz * seq_len
        step_loss = masked_sum / denom
        w = decay**k
        total = step_loss * w if total is None else total + step_loss * w
        weights = w if weights is None else weights + w
        with torch.no_grad():
            correct = (step_logits_k.argmax(-1) == target_top[:, k:]) & m
            hit[:, :n] &= correct
            hit[:, n:] = False
            valid[:, :n] &= lm
            valid[:, n:] = False
            tau_terms.append(hit.sum() / valid.sum().clamp_min(1))
            run += hit
            if valid0 is None:
                valid0 = valid.clone()
            losses.append(step_loss.detach())
            counts.append(count)
            correct_counts.append(correct.sum())
    if total is None:
        raise ValueError("eagle3_ttt_loss got no step logits (ttt_steps must be >= 1)")
    loss = total / weights if normalization == "masked_mean" else total
    counts_t = torch.stack(counts)
    correct_t = torch.stack(correct_counts)
    return Eagle3Loss(
        loss=loss,
        step_losses=torch.stack(losses),
        step_counts=counts_t,
        step_accuracies=correct_t / counts_t.clamp_min(1),
        accuracy=correct_t.sum() / counts_t.sum().clamp_min(1),
        tau_sim=1 + torch.stack(tau_terms).sum(),
        chain_run=run,
        valid=valid0,
    )


def decode_walk(
    chain_run: torch.Tensor, valid: torch.Tensor, max_tokens: int | None = None
) -> tuple[int, int]:
    """(rounds, tokens) of greedy speculative decoding over the supervised spans of a batch, read off the
    TTT unroll: in every contiguous run of `valid` slots (an answer), start at its first slot, accept
    `chain_run[s]` drafts, commit them and the bonus token (`chain_run[s] + 1`, at most up to the span's
    end), continue after them. `max_tokens`: decode only the first that many tokens of each answer, as
    `draftfeed eval --max-new-tokens` does (its first token comes from the prompt's forward, so the walk
    covers the span's first max_tokens - 1 slots). Decoding the span's prompt with K = the unroll's steps
    accepts exactly this, round for round, when the span is the target's own greedy answer
    (bench/tau_sim_vs_decode.py checked every round on the CPU). tau_sim averages over every slot instead, including the slots a
    decoding round skips, which reads higher when easy tokens come in stretches. One host sync."""
    runs, ok = chain_run.cpu().tolist(), valid.cpu().tolist()
    rounds = tokens = 0
    for run, v in zip(runs, ok, strict=True):
        s, n = 0, len(v)
        while s < n:
            if not v[s]:
                s += 1
                continue
            e = s
            while e < n and v[e]:
                e += 1
            stop = e if max_tokens is None else min(e, s + max_tokens - 1)
            t = s
            while t < stop:
                rounds += 1
                tokens += min(run[t] + 1, stop - t)
                t += run[t] + 1
            s = e
    return rounds, tokens


def eagle3_batch_loss(
    draft: Eagle3DraftModel,
    inputs: Mapping[str, torch.Tensor],
    ttt_steps: int,
    normalization: str = "masked_mean",
    decay: float = 0.8,
    fused: bool = True,
) -> Eagle3Loss:
    """Unroll `draft` on one `Eagle3TargetBatch.to_trainer_inputs()` dict and score it.

    Supervision is `target_probs` + `position_mask`, or full `target` logits (projected with the
    draft's own d2t/t2d when its vocab is smaller than the target's, see `target_distribution`).
    A packed batch without `doc_remaining` gets it from `position_ids` / `seq_lens`. The logits of
    each step are consumed as they are produced.
    """
    if "target" in inputs:
        logits = inputs["target"]
        if draft.config.draft_vocab_size == logits.shape[-1]:
            probs, mask = target_distribution(logits, inputs["loss_mask"])
        else:
            probs, mask = target_distribution(
                logits, inputs["loss_mask"], draft.selected_token_ids(), draft.t2d
            )
    else:
        probs, mask = inputs["target_probs"], inputs["position_mask"]
    doc_remaining = inputs.get("doc_remaining")
    if doc_remaining is None and ("position_ids" in inputs or "seq_lens" in inputs):
        docs = document_ids(inputs["input_ids"].shape[1], inputs.get("position_ids"), inputs.get("seq_lens"))
        doc_remaining = tokens_left_in_document(docs)
    steps = draft.unroll(
        inputs["hidden_states"],
        inputs["input_ids"],
        inputs["attention_mask"],
        ttt_steps,
        position_ids=inputs.get("position_ids"),
        seq_lens=inputs.get("seq_lens"),
    )
    return eagle3_ttt_loss(
        steps,
        probs,
        mask,
        inputs["loss_mask"],
        doc_remaining,
        normalization=normalization,
        decay=decay,
        fused=fused,
    )
