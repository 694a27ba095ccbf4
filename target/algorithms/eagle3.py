"""EAGLE-3 on the server: the captures a session needs and the supervision it gets (docs/architecture.md, EAGLE-3).

Aux states of 3 layers, shifted inputs, and shifted supervision: full logits, or draft-vocab `target_probs` +
`position_mask` once a vocab mapping is set (or the shifted final-norm state with the 'latent' probs encoding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from draftfeed.client.batches import Eagle3TargetBatch
from draftfeed.client.errors import FailedPrecondition
from draftfeed.client.supervision import draft_supervision, shift_left, top1_position_mask

from ..capture import Captured
from ..features import Needs, TokenBatch, VocabMapping, concat_features
from . import ServerAlgorithm, register

__all__ = ["Eagle3Features", "ALGORITHM"]


@dataclass
class Eagle3Features:
    """EAGLE-3: aux states of 3 layers and shifted supervision (full logits, or draft-vocab
    `target_probs` + `position_mask` once a vocab mapping is set)."""

    aux_layer_ids: list[int]
    mapping: VocabMapping | None = None
    require_mapping: bool = False
    latent: bool = False  # ship the shifted final-norm state instead of target_probs (client recomputes)
    takes_vocab_mapping: ClassVar[bool] = True

    @property
    def layer_ids(self) -> list[int]:
        return list(self.aux_layer_ids)

    @property
    def needs(self) -> Needs:
        # latent: the trainer rebuilds the probabilities from the final state; the server needs the logits'
        # full-vocab argmax alone (position_mask), so no [B,S,V] logits outlive the forward
        latent = self.latent and self.mapping is not None
        return Needs(layers=frozenset(self.aux_layer_ids), final=latent, logits=not latent, top1=latent)

    def build(self, cap: Captured, tb: TokenBatch) -> Eagle3TargetBatch:
        return Eagle3TargetBatch(**self.fields(cap, tb))

    def fields(self, cap: Captured, tb: TokenBatch) -> dict[str, torch.Tensor]:
        if self.mapping is None and self.require_mapping:
            raise FailedPrecondition(
                "generate_batch was called before set_vocab_mapping on a backend that projects onto a draft vocab; "
                "call set_vocab_mapping(selected_token_ids, selected_token_mask) first"
            )
        aux = concat_features(cap, self.aux_layer_ids)
        common = dict(
            aux_hidden_states=aux,
            input_ids=shift_left(tb.input_ids),
            attention_mask=tb.attention_mask,
            loss_mask=shift_left(tb.loss_mask),
            **tb.packing(),
        )
        if self.mapping is None:
            return {**common, "logits": shift_left(cap.logits)}
        if self.latent:
            pmask = top1_position_mask(cap.top1, tb.loss_mask, self.mapping.selected_token_mask)
            return {**common, "final_hidden": shift_left(cap.final), "position_mask": pmask}
        probs, pmask = draft_supervision(
            cap.logits, tb.loss_mask, self.mapping.selected_token_ids, self.mapping.selected_token_mask
        )
        return {**common, "target_probs": probs, "position_mask": pmask}


ALGORITHM = register(
    ServerAlgorithm(
        "eagle3",
        lambda ids, n, capture_logits, latent: Eagle3Features(ids, require_mapping=True, latent=latent),
    )
)
