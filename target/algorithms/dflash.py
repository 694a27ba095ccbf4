"""DFlash on the server: the captures a session needs and the features it gets (docs/architecture.md, DFlash).

Concatenated decoder-layer outputs, unshifted inputs, optional full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from draftfeed.client.batches import DFlashTargetBatch

from ..capture import Captured
from ..features import Needs, TokenBatch, concat_features
from . import ServerAlgorithm, register

__all__ = ["DFlashFeatures", "ALGORITHM"]


@dataclass
class DFlashFeatures:
    """DFlash: concatenated decoder-layer outputs, unshifted inputs, optional full logits."""

    target_layer_ids: list[int]
    capture_logits: bool = False
    takes_vocab_mapping: ClassVar[bool] = False

    @property
    def layer_ids(self) -> list[int]:
        return list(self.target_layer_ids)

    @property
    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.target_layer_ids), logits=self.capture_logits)

    def build(self, cap: Captured, tb: TokenBatch) -> DFlashTargetBatch:
        return DFlashTargetBatch(**self.fields(cap, tb))

    def fields(self, cap: Captured, tb: TokenBatch) -> dict[str, torch.Tensor]:
        out = dict(
            hidden_states=concat_features(cap, self.target_layer_ids),
            input_ids=tb.input_ids,
            attention_mask=tb.attention_mask,
            loss_mask=tb.loss_mask,
            **tb.packing(),
        )
        if self.capture_logits:
            out["logits"] = cap.logits
        return out


ALGORITHM = register(
    ServerAlgorithm("dflash", lambda ids, n, capture_logits, latent: DFlashFeatures(ids, capture_logits))
)
