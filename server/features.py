"""What each draft algorithm takes from one target forward, and how its batch is built from it.

A `Features` object says which captures it needs (`Needs`) and turns a forward's `Captured` into
the algorithm's batch dataclass. The in-process backends run one forward per call; the scheduler
runs one forward for the union of several sessions' needs and hands each its own slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draftfeed.client.batches import DFlashTargetBatch, DSparkTargetBatch, Eagle3TargetBatch
from draftfeed.client.errors import FailedPrecondition
from draftfeed.client.supervision import draft_position_mask, draft_supervision, shift_left

from .capture import Captured

__all__ = [
    "TokenBatch",
    "Needs",
    "concat_features",
    "Eagle3Features",
    "DFlashFeatures",
    "DSparkFeatures",
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
    final-norm output, and the full logits."""

    layers: frozenset[int] = frozenset()
    first_input: bool = False
    final: bool = False
    logits: bool = False

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.layers | other.layers,
            self.first_input or other.first_input,
            self.final or other.final,
            self.logits or other.logits,
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


@dataclass
class Eagle3Features:
    """EAGLE-3: aux states of 3 layers and shifted supervision (full logits, or draft-vocab
    `target_probs` + `position_mask` once a vocab mapping is set)."""

    aux_layer_ids: list[int]
    mapping: VocabMapping | None = None
    require_mapping: bool = False
    latent: bool = False  # ship the shifted final-norm state instead of target_probs (client recomputes)

    @property
    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.aux_layer_ids), final=self.latent, logits=True)

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
            pmask = draft_position_mask(cap.logits, tb.loss_mask, self.mapping.selected_token_mask)
            return {**common, "final_hidden": shift_left(cap.final), "position_mask": pmask}
        probs, pmask = draft_supervision(
            cap.logits, tb.loss_mask, self.mapping.selected_token_ids, self.mapping.selected_token_mask
        )
        return {**common, "target_probs": probs, "position_mask": pmask}


@dataclass
class DFlashFeatures:
    """DFlash: concatenated decoder-layer outputs, unshifted inputs, optional full logits."""

    target_layer_ids: list[int]
    capture_logits: bool = False

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


@dataclass
class DSparkFeatures:
    """DSpark: features of ids in {-1} u [0, N-1] (-1 = input of layer 0, N-1 = final-norm output)
    and the final-norm output itself."""

    target_layer_ids: list[int]
    num_layers: int
    _layers: frozenset[int] = field(init=False)

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
