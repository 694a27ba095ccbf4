"""Draft algorithms as the training loop sees them: which backend feeds them, how the draft is built,
how one batch is scored, and how the result is exported.

The loop (`loop.py`) is one for every algorithm; an algorithm is a `DraftAlgorithm` subclass and a
one-line entry in `ALGORITHMS`. EAGLE-3 is here; DFlash / DSpark (issue 8) add theirs the same way
(their losses take `den_reduce` / `world_size`, which `DistContext` provides).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
from torch import nn

from draftfeed.client.vocab import build_token_map

from .export import export_eagle3
from .losses import eagle3_batch_loss
from .models.common import text_config_dict
from .models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

__all__ = ["StepOutput", "DistContext", "DraftAlgorithm", "Eagle3Algorithm", "ALGORITHMS"]


@dataclass
class StepOutput:
    """`loss` is differentiable; `metrics` are detached scalars (averaged over micro-batches and ranks)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy); the identity in a single process."""
        if self.world_size == 1:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t


class DraftAlgorithm(ABC):
    """What the loop needs from an algorithm. `cfg` is the whole `TrainConfig`."""

    name: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    @abstractmethod
    def open_backend(self, model: nn.Module | None, device: torch.device):
        """The in-process backend over `model` when given, else the remote client for `cfg.target.url`."""

    def needs_token_counts(self, vocab_size: int) -> bool:
        """True when `build_draft` needs the supervised-token counts of the training data."""
        return False

    @abstractmethod
    def build_draft(
        self, backend, target_config: Any, token_counts: torch.Tensor | None, special_ids: list[int]
    ) -> nn.Module:
        """A freshly initialised draft (the caller seeds the RNG first)."""

    def prepare_backend(self, backend, draft: nn.Module) -> None:  # noqa: B027 - optional
        """Session state the backend needs before the first batch (called again after a resume)."""

    @abstractmethod
    def loss(self, draft: nn.Module, batch, dist: DistContext) -> StepOutput:
        """Score one target batch."""

    @abstractmethod
    def export(self, draft: nn.Module, out_dir: Path, target_config: Any, backend) -> Path:
        """Write the draft in the layout serving engines load."""

    def state_dict(self) -> dict:
        """Algorithm-owned state to checkpoint (e.g. an anchor-sampling generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional
        pass


class Eagle3Algorithm(DraftAlgorithm):
    """EAGLE-3: TTT-unrolled single-layer draft, soft cross-entropy (ALGORITHMS.md section 1)."""

    name = "eagle3"

    def open_backend(self, model, device):
        t = self.cfg.target
        if model is not None:
            from draftfeed.server.backends import HFEagle3TargetModel

            return HFEagle3TargetModel(model, aux_layer_ids=t.layer_ids)
        from draftfeed.client.remote import RemoteEagle3TargetModel

        return RemoteEagle3TargetModel.from_urls(
            t.url,
            device=device,
            aux_layer_ids=t.layer_ids,
            max_in_flight=self.cfg.loop.prefetch,
            **t.client_kwargs(),
        )

    def _draft_vocab(self, vocab_size: int) -> int:
        return min(self.cfg.eagle3.draft_vocab_size, vocab_size)

    def needs_token_counts(self, vocab_size):
        return self._draft_vocab(vocab_size) < vocab_size

    def build_draft(self, backend, target_config, token_counts, special_ids):
        e = self.cfg.eagle3
        vocab = int(text_config_dict(target_config)["vocab_size"])
        vd = self._draft_vocab(vocab)
        dcfg = Eagle3DraftConfig.from_target_config(
            target_config, draft_vocab_size=vd, norm_output=e.norm_output, fc_norm=e.fc_norm
        )
        embed = backend.get_input_embeddings().weight
        draft = Eagle3DraftModel(dcfg, embed_weight=embed)
        if vd < vocab:
            if token_counts is None:
                raise ValueError(
                    "a draft vocab smaller than the target's needs the training data's token counts"
                )
            ids, mask = build_token_map(token_counts, vd, special_ids)
            draft.set_vocab_mapping(ids, mask)
        return draft

    def prepare_backend(self, backend, draft):
        if draft.config.draft_vocab_size < draft.config.vocab_size:
            backend.set_vocab_mapping(draft.selected_token_ids().cpu(), draft.t2d.cpu())

    def loss(self, draft, batch, dist):
        e = self.cfg.eagle3
        out = eagle3_batch_loss(
            draft, batch.to_trainer_inputs(), e.ttt_steps, normalization=e.normalization, decay=e.decay
        )
        metrics = {"loss": out.loss.detach(), "accuracy": out.accuracy, "tau_sim": out.tau_sim}
        for k, acc in enumerate(out.step_accuracies):
            metrics[f"acc_{k}"] = acc
        return StepOutput(loss=out.loss, metrics=metrics)

    def export(self, draft, out_dir, target_config, backend):
        num_layers = int(text_config_dict(target_config)["num_hidden_layers"])
        return export_eagle3(draft, out_dir, target_config, list(backend.aux_layer_ids), num_layers)


ALGORITHMS: dict[str, type[DraftAlgorithm]] = {
    "eagle3": Eagle3Algorithm,
}
