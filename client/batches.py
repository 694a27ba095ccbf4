"""What a target backend returns per batch, one dataclass per draft algorithm.

Shapes use B = batch, S = sequence length, H = target hidden size, V = target vocab,
Vd = draft vocab, K = number of captured target layers. Semantics: docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["Eagle3TargetBatch", "DFlashTargetBatch", "DSparkTargetBatch", "PACKING_FIELDS"]

PACKING_FIELDS = ("position_ids", "seq_lens", "doc_remaining")


def _tensors(batch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch) if getattr(batch, f.name) is not None}


class _Batch:
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field that is set, by name."""
        return _tensors(self)

    def to(self, device: torch.device | str, non_blocking: bool = False):
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        return type(self)(**moved)


@dataclass
class Eagle3TargetBatch(_Batch):
    """EAGLE-3 supervision for one batch.

    `aux_hidden_states` [B,S,3H] (model dtype, not shifted); `input_ids` and `loss_mask` [B,S]
    shifted left by one with a zero tail; `attention_mask` [B,S] not shifted. Exactly one
    supervision source: `logits` [B,S,V] (shifted, full vocab) or `target_probs` [B,S,Vd] fp32
    with `position_mask` [B,S,1] bool. Packing metadata, when the batch is packed, is unshifted.
    """

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    position_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    def __post_init__(self):
        has_logits = self.logits is not None
        has_probs = self.target_probs is not None or self.position_mask is not None
        if has_logits == has_probs:
            raise ValueError(
                "Eagle3TargetBatch needs exactly one supervision source: either `logits`, or "
                "`target_probs` together with `position_mask`"
                + (" (got both)" if has_logits else " (got neither)")
            )
        if has_probs and (self.target_probs is None or self.position_mask is None):
            missing = "position_mask" if self.position_mask is None else "target_probs"
            raise ValueError(
                f"Eagle3TargetBatch: `target_probs` and `position_mask` go together; `{missing}` is missing"
            )

    @property
    def projected(self) -> bool:
        """True when the batch carries draft-vocab `target_probs` rather than full logits."""
        return self.target_probs is not None

    def to_trainer_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments an EAGLE-3 draft training step consumes.

        Always: `hidden_states` (the aux states), `input_ids`, `attention_mask`, `loss_mask`;
        then either `target` (full logits) or `target_probs` + `position_mask`; then the packing
        fields that are set.
        """
        out = {
            "hidden_states": self.aux_hidden_states,
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
        }
        if self.logits is not None:
            out["target"] = self.logits
        else:
            out["target_probs"] = self.target_probs
            out["position_mask"] = self.position_mask
        for name in PACKING_FIELDS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class DFlashTargetBatch(_Batch):
    """DFlash features: `hidden_states` [B,S,K*H] = decoder-layer outputs of the target layer ids,
    concatenated in id order; `input_ids`, `attention_mask`, `loss_mask` [B,S] unshifted; optional
    full unshifted `logits` [B,S,V]."""

    hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None


@dataclass
class DSparkTargetBatch(_Batch):
    """DSpark features: `target_hidden_states` [B,S,K*H] (id -1 = input of the first decoder layer,
    0..N-2 = decoder-layer outputs, N-1 = final-norm output); `target_last_hidden_states` [B,S,H] =
    final-norm output (what `lm_head` consumes); `input_ids`, `loss_mask` [B,S] unshifted. No
    attention mask."""

    target_hidden_states: torch.Tensor
    target_last_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None
