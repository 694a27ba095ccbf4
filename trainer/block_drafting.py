"""What the block drafts (DFlash, DSpark) share in training: anchors, block inputs, the block attention
mask, packing, and their losses (docs/architecture.md sections 2, 3, 5).

Slot conventions differ and are kept apart here: DFlash slot k (1..bs-1) predicts x_{a+k} (slot 0 is the
anchor, unsupervised); DSpark slot k (0..bs-1) predicts x_{a+k+1}.

Packed rows (any of `position_ids`, `seq_lens`, `doc_remaining` given) are split into documents: a block
sees context j only if j < a AND j is in the anchor's document, its RoPE positions restart with the
document, and neither its anchor's block (DFlash) nor its supervised labels (both) cross the document end.

Full-vocab logits are only ever built for a chunk of supervised rows at a time (`chunk_rows`): by default
through `vocab_objective.py` (the gradient written out, the chunk's logits recomputed in the backward), or,
with `fused=False`, the reference: autograd over each chunk under activation checkpointing. Either way
neither the teacher's nor the draft's [rows, V] logits exist for all rows at once, forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from draftfeed.client.batches import DFlashTargetBatch, DSparkTargetBatch
from draftfeed.client.packing import document_ids as packed_document_ids
from draftfeed.client.packing import same_document

from .vocab_objective import vocab_objective

__all__ = [
    "NoValidAnchors",
    "Blocks",
    "document_ids",
    "anchor_candidates",
    "sample_anchors",
    "make_blocks",
    "block_attention_mask",
    "block_hidden",
    "dflash_targets",
    "dspark_targets",
    "decay_weights",
    "accept_lengths",
    "tau_train",
    "dflash_objective",
    "dspark_objective",
    "DFlashLoss",
    "DSparkLoss",
    "dflash_loss",
    "dspark_loss",
]

ALGORITHMS = ("dflash", "dspark")


class NoValidAnchors(ValueError):
    """No row of the batch has a valid anchor (sequences shorter than a block, or nothing supervised)."""


def document_ids(
    batch_size: int,
    seq_len: int,
    *,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Document index [B,S] of each token of packed rows (None when not packed).

    From `seq_lens` [B,D] (zero-padded, rows sum to S) if given, else from `position_ids` (a document starts
    wherever the position does not continue the previous one), else from `doc_remaining` (a document ends
    where it is 0: real tokens left in the document after this one).
    """
    if seq_lens is not None:
        sums = seq_lens.long().sum(-1)
        if (sums != seq_len).any():
            raise ValueError(f"seq_lens rows must sum to the sequence length {seq_len}, got {sums.tolist()}")

    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device) if device is not None else t

    return packed_document_ids(
        seq_len, on_device(position_ids), on_device(seq_lens), on_device(doc_remaining)
    )


def _positions_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """t minus the start of t's document, [B,S]."""
    seq_len = doc_ids.shape[1]
    t = torch.arange(seq_len, device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start


def anchor_candidates(
    loss_mask: torch.Tensor, block_size: int, algorithm: str, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Valid anchors [B,S] bool. DFlash: a <= S-bs, loss_mask[a], and (packed) a+bs-1 in a's document.
    DSpark: a <= S-2, loss_mask[a] and loss_mask[a+1], and (packed) a+1 in a's document."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    b, s = loss_mask.shape
    lm = loss_mask > 0
    reach = block_size - 1 if algorithm == "dflash" else 1  # furthest token the block must own
    valid = torch.zeros(b, s, dtype=torch.bool, device=loss_mask.device)
    last = s - 1 - reach  # last anchor with a + reach <= S - 1
    if last < 0:
        return valid
    ok = lm[:, : last + 1].clone()
    if algorithm == "dspark":
        ok &= lm[:, 1 : last + 2]
    if doc_ids is not None:
        ok &= doc_ids[:, : last + 1] == doc_ids[:, reach : last + 1 + reach]
    valid[:, : last + 1] = ok
    return valid


def sample_anchors(
    candidates: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """n = min(num_anchors, max valid per row) distinct anchors per row, uniformly, sorted.

    Returns `anchors` [B,n] long and `keep` [B,n] bool; a row with fewer than n candidates is padded with
    blocks at anchor 0 and keep False. Raises `NoValidAnchors` when no row has one.
    """
    counts = candidates.sum(dim=1)
    n = min(int(num_anchors), int(counts.max().item()) if counts.numel() else 0)
    if n <= 0:
        raise NoValidAnchors(
            "no valid anchor in this batch: every row is shorter than a block or has too few supervised "
            "tokens (skip the batch, or use longer sequences / a smaller block_size)"
        )
    gen_device = generator.device if generator is not None else candidates.device
    keys = torch.rand(candidates.shape, generator=generator, device=gen_device).to(candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))
    picked = keys.argsort(dim=1)[:, :n]
    keep = torch.arange(n, device=candidates.device)[None, :] < counts[:, None]
    anchors = torch.where(keep, picked, torch.full_like(picked, candidates.shape[1]))
    anchors = anchors.sort(dim=1).values  # kept anchors first (pads sort last), ascending
    return torch.where(keep, anchors, torch.zeros_like(anchors)), keep


def block_attention_mask(
    anchors: torch.Tensor,
    keep: torch.Tensor,
    seq_len: int,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B,1,n*bs,S+n*bs] bool, True = may attend. A slot sees context j iff j < a, keep (and j in a's
    document); every slot sees all bs slots of its own block; pad blocks see only their own block."""
    b, n = anchors.shape
    device = anchors.device
    j = torch.arange(seq_len, device=device)
    ctx = (j[None, None, :] < anchors[:, :, None]) & keep[:, :, None]  # [B,n,S]
    if doc_ids is not None:
        anchor_doc = doc_ids.gather(1, anchors)
        ctx &= same_document(anchor_doc, doc_ids)
    ctx = ctx.repeat_interleave(block_size, dim=1)  # [B,n*bs,S]
    q_block = torch.arange(n * block_size, device=device) // block_size
    own = (q_block[:, None] == q_block[None, :]).expand(b, -1, -1)
    return torch.cat([ctx, own], dim=2).unsqueeze(1)


@dataclass
class Blocks:
    """The sampled blocks of a batch. `anchors`, `keep` [B,n]; `context_positions` [B,S] (RoPE positions
    of the context, restarting per document); `doc_ids` [B,S] or None when not packed."""

    anchors: torch.Tensor
    keep: torch.Tensor
    block_size: int
    context_positions: torch.Tensor
    doc_ids: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.anchors.shape[1]

    def offsets(self) -> torch.Tensor:
        return torch.arange(self.block_size, device=self.anchors.device)

    def block_positions(self) -> torch.Tensor:
        """[B,n*bs]: slot k of the block at a sits at position(a) + k."""
        base = self.context_positions.gather(1, self.anchors)
        return (base[:, :, None] + self.offsets()).flatten(1)

    def input_ids(self, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
        """[B,n*bs]: [x_a, MASK x (bs-1)] per block; pad blocks all MASK."""
        ids = torch.full(
            (*self.anchors.shape, self.block_size), mask_token_id, dtype=torch.long, device=input_ids.device
        )
        ids[:, :, 0] = torch.where(self.keep, input_ids.gather(1, self.anchors), mask_token_id)
        return ids.flatten(1)

    def attention_mask(self) -> torch.Tensor:
        return block_attention_mask(
            self.anchors, self.keep, self.context_positions.shape[1], self.block_size, self.doc_ids
        )

    def gather(self, x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x[a+k+shift] [B,n,bs] (clamped) and whether a+k+shift is inside the row, the anchor's document,
        and a kept block."""
        s = x.shape[1]
        idx = self.anchors[:, :, None] + self.offsets() + shift
        inside = (idx < s) & self.keep[:, :, None]
        safe = idx.clamp(max=s - 1)
        if self.doc_ids is not None:
            anchor_doc = self.doc_ids.gather(1, self.anchors)[:, :, None]
            inside &= self.doc_ids.gather(1, safe.flatten(1)).view_as(safe) == anchor_doc
        return x.gather(1, safe.flatten(1)).view_as(safe), inside


def make_blocks(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    algorithm: str,
    block_size: int,
    num_anchors: int,
    position_ids: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    doc_remaining: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Blocks:
    """Sample this step's blocks (anchors redrawn every call; `generator` makes them reproducible)."""
    b, s = input_ids.shape
    docs = document_ids(
        b,
        s,
        position_ids=position_ids,
        seq_lens=seq_lens,
        doc_remaining=doc_remaining,
        device=input_ids.device,
    )
    anchors, keep = sample_anchors(
        anchor_candidates(loss_mask, block_size, algorithm, docs), num_anchors, generator
    )
    if position_ids is not None:
        positions = position_ids.long().to(input_ids.device)
    elif docs is not None:
        positions = _positions_in_document(docs)
    else:
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
    return Blocks(anchors, keep, block_size, positions, docs)


def block_hidden(draft, features: torch.Tensor, input_ids: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """Run a block draft (DFlash or DSpark) on all blocks: final-normed hidden [B,n,bs,H]."""
    ids = blocks.input_ids(input_ids, draft.config.mask_token_id)
    hidden = draft(
        draft.embed(ids),
        features,
        blocks.block_positions(),
        blocks.context_positions,
        blocks.attention_mask(),
    )
    return hidden.view(*blocks.anchors.shape, blocks.block_size, -1)


def dflash_targets(blocks: Blocks, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """DFlash labels x_{a+k} [B,n,bs] and mask m = keep*[a+k<S]*loss_mask[a+k] (same document; slot 0 = 0)."""
    labels, inside = blocks.gather(input_ids, 0)
    lm, _ = blocks.gather(loss_mask, 0)
    m = (inside & (lm > 0)).float()
    m[:, :, 0] = 0.0
    return labels, m


def dspark_targets(blocks: Blocks, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """DSpark labels y_k = x_{a+k+1}, prev_k = x_{a+k} (teacher forcing), and E_k = cumprod_k of
    keep*[a+k+1<S]*loss_mask[a+k+1] (same document); each [B,n,bs]."""
    labels, inside = blocks.gather(input_ids, 1)
    prev, _ = blocks.gather(input_ids, 0)
    lm, _ = blocks.gather(loss_mask, 1)
    return labels, prev, (inside & (lm > 0)).float().cumprod(dim=-1)


def decay_weights(
    block_size: int, gamma: float | None, first_supervised_slot: int, device=None
) -> torch.Tensor:
    """[bs] w_k = exp(-(k - first)/gamma), 1 at the first supervised slot (DFlash first=1, DSpark 0);
    gamma None = uniform."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    if gamma is None:
        return torch.ones_like(k)
    return torch.exp(-(k - first_supervised_slot).clamp(min=0) / float(gamma))


def _chunked(fn: Callable, tensors: tuple[torch.Tensor, ...], chunk_rows: int) -> tuple[torch.Tensor, ...]:
    """fn over row chunks, each checkpointed when it needs grad; per-row outputs concatenated."""
    outs = []
    for start in range(0, tensors[0].shape[0], max(1, chunk_rows)):
        part = tuple(t[start : start + chunk_rows] for t in tensors)
        if torch.is_grad_enabled() and any(t.requires_grad for t in part):
            outs.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            outs.append(fn(*part))
    return tuple(torch.cat(x) for x in zip(*outs, strict=True))


def dflash_objective(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    chunk_rows: int = 2048,
    fused: bool = True,
):
    """Per-row CE and argmax hit for supervised rows: hidden [R,H], labels [R] -> (ce [R] fp32, hit [R] bool).

    `fused` (default): `vocab_objective` (gradient written out, compiled kernels); False: the reference
    (autograd over each chunk under activation checkpointing)."""
    if fused:
        ce, _, hit = vocab_objective(hidden, labels, lm_head_weight, chunk_rows=chunk_rows)
        return ce, hit

    def rows(h, y):
        logits = F.linear(h, lm_head_weight.to(h.dtype)).float()
        return F.cross_entropy(logits, y, reduction="none"), logits.detach().argmax(-1) == y

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32), torch.zeros(
            0, dtype=torch.bool, device=hidden.device
        )
    return _chunked(rows, (hidden, labels), chunk_rows)


def dspark_objective(
    hidden: torch.Tensor,
    prev: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    markov_head: torch.nn.Module | None = None,
    final_logit_softcapping: float | None = None,
    chunk_rows: int = 1024,
    fused: bool = True,
):
    """Per-row DSpark terms for supervised rows: hidden, teacher_hidden [R,H]; prev, labels [R].

    z = softcap(lm_head(h)) + B(prev); p_t = softmax(softcap(lm_head(teacher))) (no grad). Returns
    (ce [R], D [R] = sum_v |softmax(z) - p_t|, hit [R] argmax(z) == label), all computed in fp32.
    `fused` as in `dflash_objective`.
    """
    cap = final_logit_softcapping
    if fused:
        return vocab_objective(
            hidden, labels, lm_head_weight,
            markov_embed=None if markov_head is None else markov_head.prev_embed(prev),
            markov_weight=None if markov_head is None else markov_head.markov_w2.weight,
            teacher_hidden=teacher_hidden, final_logit_softcapping=cap, chunk_rows=chunk_rows,
        )  # fmt: skip

    def rows(h, p, y, th):
        w = lm_head_weight.to(h.dtype)
        z = F.linear(h, w).float()
        if cap is not None:
            z = torch.tanh(z / cap) * cap
        if markov_head is not None:
            z = z + markov_head(p).float()
        with torch.no_grad():
            zt = F.linear(th.to(w.dtype), w).float()
            p_t = torch.softmax(zt if cap is None else torch.tanh(zt / cap) * cap, dim=-1)
        logp = torch.log_softmax(z, dim=-1)
        ce = -logp.gather(-1, y[:, None]).squeeze(-1)
        tv = (logp.exp() - p_t).abs().sum(-1)
        return ce, tv, z.detach().argmax(-1) == y

    if hidden.shape[0] == 0:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return _chunked(rows, (hidden, prev, labels, teacher_hidden), chunk_rows)


def accept_lengths(hits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DFlash accept length per block [B,n]: 1 + the run of argmax hits from slot 1 (hits [B,n,bs] are 0
    on unsupervised slots, so the run stops there); 0 for pad blocks."""
    return (1.0 + hits[:, :, 1:].float().cumprod(dim=-1).sum(-1)) * keep.float()


def tau_train(c_star: torch.Tensor, e: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DSpark tau per block [B,n] = 1 + sum_k prod_{i<=k} c*_i E_i (0 for invalid blocks), and the valid
    blocks (kept with slot 0 supervised) [B,n] bool."""
    valid = keep & (e[:, :, 0] > 0)
    return (1.0 + (c_star * e).cumprod(dim=-1).sum(-1)) * valid.float(), valid


@dataclass
class DFlashLoss:
    """`loss` to backward; `parts` {"ce"}; `metrics` {"accept_len", "accuracy", "blocks", "supervised"};
    `weight_sum` the local loss denominator. All but `loss` detached."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    weight_sum: torch.Tensor


@dataclass
class DSparkLoss:
    """`loss` to backward; `parts` {"ce", "tv", "conf"}; `metrics` {"tau_train", "accuracy", "conf_error",
    "blocks", "supervised"}; `weight_sum` the local loss denominator. All but `loss` detached."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    weight_sum: torch.Tensor


def _normalizer(weight_sum, den_reduce, world_size):
    """1/den (den all-reduced when `den_reduce` is given) times world_size (DDP averages gradients)."""
    den = weight_sum.detach().clone()
    if den_reduce is not None:
        den = den_reduce(den)
    return float(world_size) / den.clamp(min=1e-6)


def _packing(batch) -> dict:
    return {k: getattr(batch, k) for k in ("position_ids", "seq_lens", "doc_remaining")}


def dflash_loss(
    draft,
    batch: DFlashTargetBatch,
    *,
    num_anchors: int = 512,
    gamma: float | None = 7.0,
    generator: torch.Generator | None = None,
    chunk_rows: int = 2048,
    den_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
    fused: bool = True,
) -> DFlashLoss:
    """One DFlash training step's loss: sum w_k m CE / sum w_k m, w_k = exp(-(k-1)/gamma).

    `den_reduce` (e.g. an all-reduce SUM over ranks) makes the denominator global; the loss is then
    multiplied by `world_size` so DDP's gradient averaging yields the global mean. `fused` False runs the
    reference objective (see `dflash_objective`).
    """
    bs = draft.config.block_size
    blocks = make_blocks(
        batch.input_ids, batch.loss_mask, algorithm="dflash", block_size=bs, num_anchors=num_anchors,
        generator=generator, **_packing(batch),
    )  # fmt: skip
    hidden = block_hidden(draft, batch.hidden_states, batch.input_ids, blocks)
    labels, m = dflash_targets(blocks, batch.input_ids, batch.loss_mask)
    w = m * decay_weights(bs, gamma, 1, device=m.device)
    sel = w > 0
    ce, hit = dflash_objective(
        hidden[sel], labels[sel], draft.lm_head.weight, chunk_rows=chunk_rows, fused=fused
    )
    weight_sum = w[sel].sum()
    loss = (w[sel] * ce).sum() * _normalizer(weight_sum, den_reduce, world_size) + hidden.sum() * 0.0
    with torch.no_grad():
        hits = torch.zeros_like(m)
        hits[sel] = hit.float()
        n_blocks, n_sup = blocks.keep.float().sum(), sel.sum().float()
        metrics = {
            "accept_len": accept_lengths(hits, blocks.keep).sum() / n_blocks.clamp(min=1),
            "accuracy": hit.float().sum() / n_sup.clamp(min=1),
            "blocks": n_blocks,
            "supervised": n_sup,
        }
        parts = {"ce": (w[sel] * ce).sum() / weight_sum.clamp(min=1e-6)}
    return DFlashLoss(loss=loss, parts=parts, metrics=metrics, weight_sum=weight_sum.detach())


def dspark_loss(
    draft,
    batch: DSparkTargetBatch,
    *,
    num_anchors: int | None = None,
    gamma: float | None = 4.0,
    ce_weight: float = 0.1,
    tv_weight: float = 0.9,
    conf_weight: float = 1.0,
    generator: torch.Generator | None = None,
    chunk_rows: int = 1024,
    den_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
    fused: bool = True,
) -> DSparkLoss:
    """One DSpark step: L = ce_weight L_ce + tv_weight L_tv + conf_weight L_conf, each sum w(.)/sum w with
    w_k = E_k exp(-k/gamma); the teacher is softmax(lm_head(target_last_hidden_states[a+k])).

    `num_anchors` None = the draft config's. `den_reduce` / `world_size` / `fused` as in `dflash_loss`.
    """
    cfg = draft.config
    bs = cfg.block_size
    blocks = make_blocks(
        batch.input_ids, batch.loss_mask, algorithm="dspark", block_size=bs,
        num_anchors=cfg.num_anchors if num_anchors is None else num_anchors, generator=generator, **_packing(batch),
    )  # fmt: skip
    hidden = block_hidden(draft, batch.target_hidden_states, batch.input_ids, blocks)
    labels, prev, e = dspark_targets(blocks, batch.input_ids, batch.loss_mask)
    w = e * decay_weights(bs, gamma, 0, device=e.device)
    sel = w > 0
    b_idx = torch.arange(e.shape[0], device=e.device)[:, None, None].expand_as(e)[sel]
    t_idx = (blocks.anchors[:, :, None] + blocks.offsets())[sel]  # teacher row for slot k: a + k
    teacher = batch.target_last_hidden_states[b_idx, t_idx]
    h_sel, p_sel = hidden[sel], prev[sel]
    ce, tv, hit = dspark_objective(
        h_sel, p_sel, labels[sel], teacher, draft.lm_head.weight, markov_head=draft.markov_head,
        final_logit_softcapping=cfg.final_logit_softcapping, chunk_rows=chunk_rows, fused=fused,
    )  # fmt: skip
    c_star = (1.0 - tv.detach() / 2.0).clamp(0.0, 1.0)
    conf = draft.confidence_logits(h_sel, p_sel)
    w_sel = w[sel]
    weight_sum = w_sel.sum()
    terms = {"ce": (w_sel * ce).sum(), "tv": (w_sel * tv).sum()}
    terms["conf"] = (
        (w_sel * F.binary_cross_entropy_with_logits(conf, c_star, reduction="none")).sum()
        if conf is not None
        else tv.new_zeros(())
    )
    total = ce_weight * terms["ce"] + tv_weight * terms["tv"] + conf_weight * terms["conf"]
    loss = total * _normalizer(weight_sum, den_reduce, world_size) + hidden.sum() * 0.0
    with torch.no_grad():
        full = torch.zeros_like(e)
        full[sel] = c_star
        tau, valid = tau_train(full, e, blocks.keep)
        n_blocks, n_sup = valid.float().sum(), sel.sum().float()
        den = weight_sum.clamp(min=1e-6)
        parts = {k: v.detach() / den for k, v in terms.items()}
        metrics = {
            "tau_train": tau.sum() / n_blocks.clamp(min=1),
            "accuracy": hit.float().sum() / n_sup.clamp(min=1),
            "conf_error": (
                (w_sel * (torch.sigmoid(conf) - c_star).abs()).sum() / den
                if conf is not None
                else tv.new_zeros(())
            ),
            "blocks": n_blocks,
            "supervised": n_sup,
        }
    return DSparkLoss(loss=loss, parts=parts, metrics=metrics, weight_sum=weight_sum.detach())
