"""The check of a vocab mapping against the target; the EAGLE-3 supervision formulas it serves (`shift_left`,
`project_supervision`) live in `draftfeed.client.supervision`, shared with the client and the trainer.
"""

from __future__ import annotations

import torch

from draftfeed.client.errors import InvalidArgument

__all__ = ["check_vocab_mapping"]


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
