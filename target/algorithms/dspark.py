"""DSpark on the server: the captures a session needs and the features it gets (docs/architecture.md, DSpark).

Features of ids in {-1} u [0, N-1] (-1 = input of layer 0, N-1 = final-norm output) and the final-norm output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from draftfeed.client.batches import DSparkTargetBatch

from ..capture import Captured
from ..features import Needs, TokenBatch, concat_features
from . import ServerAlgorithm, register

__all__ = ["DSparkFeatures", "ALGORITHM"]


@dataclass
class DSparkFeatures:
    """DSpark: features of ids in {-1} u [0, N-1] (-1 = input of layer 0, N-1 = final-norm output)
    and the final-norm output itself."""

    target_layer_ids: list[int]
    num_layers: int
    _layers: frozenset[int] = field(init=False)
    takes_vocab_mapping: ClassVar[bool] = False

    @property
    def layer_ids(self) -> list[int]:
        return list(self.target_layer_ids)

    def __post_init__(self):
        self._layers = frozenset(i for i in self.target_layer_ids if 0 <= i < self.num_layers - 1)

    @property
    def needs(self) -> Needs:
        return Needs(layers=self._layers, first_input=-1 in self.target_layer_ids, final=True)

    def build(self, cap: Captured, tb: TokenBatch) -> DSparkTargetBatch:
        return DSparkTargetBatch(**self.fields(cap, tb))

    def fields(self, cap: Captured, tb: TokenBatch) -> dict[str, torch.Tensor]:
        return dict(
            target_hidden_states=concat_features(cap, self.target_layer_ids, self.num_layers),
            target_last_hidden_states=cap.final,
            input_ids=tb.input_ids,
            loss_mask=tb.loss_mask,
            **tb.packing(),
        )


ALGORITHM = register(ServerAlgorithm("dspark", lambda ids, n, capture_logits, latent: DSparkFeatures(ids, n)))
