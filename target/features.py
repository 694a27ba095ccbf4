"""What a draft algorithm takes from one target forward: the pieces every algorithm's features share.

An algorithm's features object (`target/algorithms/<name>.py`) says which captures it needs (`needs`, a
`Needs`) and turns a forward's `Captured` and the request's `TokenBatch` into its reply fields
(`fields`) or its batch dataclass (`build`); it also names its `layer_ids` and whether it
`takes_vocab_mapping` (then it has a `mapping`, a `VocabMapping` or None). The in-process backends run
one forward per call; the scheduler runs one forward for the union of several sessions' needs and hands
each its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import Captured

__all__ = [
    "TokenBatch",
    "Needs",
    "concat_features",
    "VocabMapping",
]


@dataclass
class TokenBatch:
    """One generate request's token tensors, as the trainer sent them."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.seq_lens is not None or self.position_ids is not None

    def packing(self) -> dict[str, torch.Tensor]:
        names = ("position_ids", "seq_lens", "doc_remaining")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device, non_blocking: bool = False) -> TokenBatch:
        return TokenBatch(
            **{
                k: (v.to(device, non_blocking=non_blocking) if v is not None else None)
                for k, v in vars(self).items()
            }
        )


@dataclass(frozen=True)
class Needs:
    """Captures one forward must make: decoder-layer outputs by id, the input of layer 0, the
    final-norm output, the full logits, and their full-vocab argmax alone (`top1`: what a latent
    EAGLE-3 session's position_mask needs, without keeping [B,S,V] logits)."""

    layers: frozenset[int] = frozenset()
    first_input: bool = False
    final: bool = False
    logits: bool = False
    top1: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.layers | other.layers,
            self.first_input or other.first_input,
            self.final or other.final,
            self.logits or other.logits,
            self.top1 or other.top1,
        )


@dataclass
class VocabMapping:
    selected_token_ids: torch.Tensor  # int64 [Vd]: draft index -> target id
    selected_token_mask: torch.Tensor  # bool [V]

    def to(self, device) -> VocabMapping:
        return VocabMapping(self.selected_token_ids.to(device), self.selected_token_mask.to(device))


def concat_features(cap: Captured, ids: list[int], num_layers: int | None = None) -> torch.Tensor:
    """The captures of layer `ids` concatenated in id order on the last dim: id i = output of decoder layer
    i; with `num_layers` N given (DSpark's ids), -1 = input of layer 0 and N-1 = the final-norm output."""
    parts = []
    for i in ids:
        if i == -1:
            parts.append(cap.first_input)
        elif num_layers is not None and i == num_layers - 1:
            parts.append(cap.final)
        else:
            parts.append(cap.layers[i])
    return torch.cat(parts, dim=-1)
