"""EAGLE-3 supervision math as pure tensor functions (DESIGN.md, EAGLE-3).

`shift_left` moves a [B,S,...] tensor one position left and zero-fills the tail. With a vocab
mapping, the full-vocab logits become `target_probs` (softmax over the draft vocab, fp32) and
`position_mask` (the full-vocab argmax is a draft token, and the position is supervised).
"""

from __future__ import annotations

import torch

from draftfeed.client.errors import InvalidArgument

__all__ = ["shift_left", "project_supervision", "check_vocab_mapping"]


def shift_left(t: torch.Tensor) -> torch.Tensor:
    """`cat(t[:, 1:], zeros)` along the sequence dimension."""
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


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
    ids = selected_token_ids.to(shifted_logits.device)
    mask = selected_token_mask.to(shifted_logits.device)
    top = shifted_logits.argmax(dim=-1)
    position_mask = (mask[top] & shifted_loss_mask.bool()).unsqueeze(-1)
    target_probs = torch.softmax(shifted_logits[..., ids].float(), dim=-1)
    return target_probs, position_mask


def check_vocab_mapping(
    selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor, vocab_size: int
) -> None:
    """Reject a mapping that cannot be applied to a target with `vocab_size` tokens."""
    if selected_token_ids.dim() != 1 or selected_token_ids.dtype != torch.int64:
        raise InvalidArgument(
            f"selected_token_ids must be int64 [Vd], got {selected_token_ids.dtype} with shape {tuple(selected_token_ids.shape)}"
        )
    if selected_token_mask.dim() != 1 or selected_token_mask.dtype != torch.bool:
        raise InvalidArgument(
            f"selected_token_mask must be bool [V], got {selected_token_mask.dtype} with shape {tuple(selected_token_mask.shape)}"
        )
    if selected_token_mask.numel() != vocab_size:
        raise InvalidArgument(
            f"selected_token_mask has {selected_token_mask.numel()} entries; the target's vocab has {vocab_size}"
        )
    if selected_token_ids.numel() == 0:
        raise InvalidArgument("selected_token_ids is empty; a draft vocab needs at least one token")
    lo, hi = int(selected_token_ids.min()), int(selected_token_ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidArgument(
            f"selected_token_ids holds id {bad}, outside the target vocab [0, {vocab_size})"
        )
    if selected_token_ids.unique().numel() != selected_token_ids.numel():
        raise InvalidArgument(
            "selected_token_ids holds duplicate ids; each draft index must map to a distinct target id"
        )
    if int(selected_token_mask.sum()) != selected_token_ids.numel() or not bool(
        selected_token_mask[selected_token_ids].all()
    ):
        raise InvalidArgument(
            "selected_token_mask disagrees with selected_token_ids: the mask must be True exactly at the selected ids"
        )
