"""The EAGLE-3 supervision formulas, one copy for the server, the client and the trainer (docs/architecture.md, EAGLE-3).

`shift_left` moves a [B,S,...] tensor one position left and zero-fills the tail. With a vocab mapping
(`selected_token_ids` [Vd] int64: draft index -> target id; `selected_token_mask` [V] bool), full-vocab
logits become `target_probs` (softmax over the draft vocab, in fp32: `draft_probs`) and `position_mask`
(the full-vocab argmax is a draft token, `draft_hits`, and the position is supervised).
"""

from __future__ import annotations

import torch

__all__ = [
    "shift_left",
    "draft_probs",
    "draft_hits",
    "target_distribution",
    "project_supervision",
    "draft_supervision",
    "draft_position_mask",
    "top1_position_mask",
]


def shift_left(t: torch.Tensor) -> torch.Tensor:
    """`cat(t[:, 1:], zeros)` along the sequence dimension: the next position's value at each slot."""
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def draft_probs(
    logits: torch.Tensor, selected_token_ids: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax over the draft vocab in fp32: `softmax(logits[..., ids].float())` ([..., V] -> [..., Vd]);
    without ids, over the last dim as given (logits already of the draft vocab). `out`: an fp32 tensor of
    the result's shape to write into (the same kernel, so the same bits, without a copy)."""
    if selected_token_ids is not None:
        logits = logits.index_select(-1, selected_token_ids.to(logits.device))
    if out is not None:
        return torch.softmax(logits.float(), dim=-1, out=out)
    return torch.softmax(logits.float(), dim=-1)


def draft_hits(logits: torch.Tensor, selected_token_mask: torch.Tensor) -> torch.Tensor:
    """Bool [...]: the full-vocab argmax of `logits` [..., V] is a draft token."""
    return selected_token_mask.to(logits.device)[logits.argmax(dim=-1)]


def target_distribution(
    logits: torch.Tensor,
    loss_mask: torch.Tensor,
    selected_token_ids: torch.Tensor | None = None,
    selected_token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [B,S,Vd] fp32, M [B,S] bool) from full shifted target logits [B,S,V] and shifted loss_mask.

    Without a vocab map (Vd == V): P = softmax(logits), M = loss_mask. With one, as the service does:
    P = softmax(logits[..., selected_token_ids]), M = selected_token_mask[argmax over the full vocab] & loss_mask.
    """
    lm = loss_mask.bool()
    if selected_token_ids is None:
        return draft_probs(logits), lm
    return draft_probs(logits, selected_token_ids), draft_hits(logits, selected_token_mask) & lm


def project_supervision(
    shifted_logits: torch.Tensor,
    shifted_loss_mask: torch.Tensor,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`target_probs` [B,S,Vd] fp32, `position_mask` [B,S,1] bool) from shifted full logits [B,S,V].

    The argmax that decides `position_mask` is over the FULL vocab; the probabilities are
    renormalised over the draft vocab.
    """
    probs, mask = target_distribution(
        shifted_logits, shifted_loss_mask, selected_token_ids, selected_token_mask
    )
    return probs, mask.unsqueeze(-1)


def draft_supervision(
    logits: torch.Tensor,
    loss_mask: torch.Tensor,
    selected_token_ids: torch.Tensor,
    selected_token_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`project_supervision(shift_left(logits), shift_left(loss_mask), ...)` without materialising
    the shifted [B,S,V] logits: project the unshifted logits, shift the small results, and give the
    zero-logit tail row what the shifted reference gives it."""
    probs = draft_probs(logits, selected_token_ids)
    tail = draft_probs(torch.zeros_like(logits[:, :1, :1]).expand(-1, -1, probs.shape[-1]))
    probs = torch.cat([probs[:, 1:], tail], dim=1)
    return probs, draft_position_mask(logits, loss_mask, selected_token_mask)


def draft_position_mask(
    logits: torch.Tensor, loss_mask: torch.Tensor, selected_token_mask: torch.Tensor
) -> torch.Tensor:
    """Shifted `position_mask` [B,S,1] from unshifted logits [B,S,V]: the full-vocab argmax of the next
    position is a draft token and the next position is supervised (the zero-logit tail row argmaxes to id 0)."""
    return top1_position_mask(logits.argmax(dim=-1), loss_mask, selected_token_mask)


def top1_position_mask(
    top1: torch.Tensor, loss_mask: torch.Tensor, selected_token_mask: torch.Tensor
) -> torch.Tensor:
    """`draft_position_mask` from the logits' full-vocab argmax `top1` [B,S] alone."""
    hit = selected_token_mask.to(top1.device)[top1]
    tail_hit = selected_token_mask.to(top1.device)[torch.zeros_like(hit[:, :1], dtype=torch.long)]
    pmask = torch.cat([hit[:, 1:], tail_hit], dim=1) & shift_left(loss_mask).bool()
    return pmask.unsqueeze(-1)
