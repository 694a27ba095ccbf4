"""Draft algorithms as the training loop sees them: which backend feeds them, how the draft is built,
how one batch is scored, and how the result is exported.

The loop (`loop.py`) is one for every algorithm; an algorithm is a `DraftAlgorithm` subclass and a
one-line entry in `ALGORITHMS`. EAGLE-3, DFlash and DSpark are here. The block drafts (DFlash, DSpark)
share `BlockAlgorithm`: their backend's frozen embedding / lm_head are fetched once when the draft is
built, anchors are drawn from a per-rank generator that checkpoints with the run, and their loss
denominators are all-reduced over ranks (`DistContext`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
from torch import nn

from draftfeed.client.algorithms import get_algorithm
from draftfeed.client.vocab import build_token_map

from .block_drafting import NoValidAnchors, dflash_loss, dspark_loss
from .export import export_eagle3
from .losses import eagle3_batch_loss
from .models.common import text_config_dict
from .models.dflash import DFlashConfig, DFlashDraft, export_dflash
from .models.dspark import DSparkConfig, DSparkDraft, export_dspark
from .models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

__all__ = [
    "StepOutput",
    "DistContext",
    "DraftAlgorithm",
    "Eagle3Algorithm",
    "BlockAlgorithm",
    "DFlashAlgorithm",
    "DSparkAlgorithm",
    "block_layer_ids",
    "ALGORITHMS",
]


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
        # always, also when the draft keeps the whole vocabulary (an identity mapping): a remote session
        # answers nothing before it has a mapping
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


def block_layer_ids(algorithm: str, num_layers: int, k: int) -> list[int]:
    """Default target layers of a block draft for K = `k` layers: the client's default of `algorithm`
    (DESIGN.md, `client/layers.py`), the same ids a server picks for a session opened without any.

    DFlash: K == 1 -> [N//2], else round(1 + i(N-4)/(K-1)). DSpark: K clamped to [1, N-1]; K == 1 -> [N-1],
    else sorted({round(1 + i(N-2)/(K-1))}), whose last id is N-1 (the final-norm output, which an SGLang
    deployment cannot capture: the validator warns; pass --layer-ids to choose others)."""
    return get_algorithm(algorithm).default_layer_ids(num_layers, k)


class BlockAlgorithm(DraftAlgorithm):
    """What DFlash and DSpark share: backends, layer ids, the anchor generator, the zero-block step."""

    backends: ClassVar[tuple[str, str]]  # (in-process class in draftfeed.server.backends, remote class)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.block_size = cfg.block.resolved_block_size(self.name)
        self.gamma = cfg.block.gamma(self.name)
        # anchors: a CPU generator per rank (same draws on any device), checkpointed with the run
        self.generator = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + cfg.dist.rank)

    def _layer_ids(self, num_layers: int) -> list[int]:
        t = self.cfg.target
        return (
            list(t.layer_ids)
            if t.layer_ids
            else block_layer_ids(self.name, num_layers, self.cfg.block.num_target_layers)
        )

    def open_backend(self, model, device):
        t = self.cfg.target
        local_name, remote_name = self.backends
        if model is not None:
            from draftfeed.server import backends
            from draftfeed.server.capture import discover

            ids = self._layer_ids(discover(model).num_layers)
            return getattr(backends, local_name)(model, target_layer_ids=ids)
        from draftfeed.client import remote

        cls = getattr(remote, remote_name)
        probe_layers = t.layer_ids  # None: ask the server for N first, then pick our default
        if probe_layers is None:
            from transformers import AutoConfig

            from draftfeed.server.loading import default_target_path

            conf = AutoConfig.from_pretrained(t.model or default_target_path(), local_files_only=True)
            probe_layers = self._layer_ids(int(text_config_dict(conf)["num_hidden_layers"]))
        return cls.from_urls(
            t.url,
            device=device,
            target_layer_ids=probe_layers,
            max_in_flight=self.cfg.loop.prefetch,
            **t.client_kwargs(),
        )

    def _draft_fields(self, backend, target_config) -> dict:
        b = self.cfg.block
        return dict(
            target_layer_ids=list(backend.target_layer_ids),
            mask_token_id=b.mask_token_id,
            num_layers=b.num_layers,
            block_size=self.block_size,
        )

    def export(self, draft, out_dir, target_config, backend):
        return self.exporter(draft, out_dir)

    def state_dict(self):
        return {"anchor_generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "anchor_generator" in state:
            self.generator.set_state(state["anchor_generator"])

    def _empty_step(self, draft, keys, dist: DistContext) -> StepOutput:
        """A batch without any valid anchor: a zero loss that still touches every trainable parameter (so
        DDP's gradient all-reduce sees them all), zero metrics, and this rank's part (0) of the loss
        denominator's all-reduce, which the other ranks' losses are waiting in."""
        loss = sum(p.sum() for p in draft.parameters() if p.requires_grad) * 0.0
        zero = torch.zeros((), device=loss.device)
        dist.all_reduce_sum(zero)
        return StepOutput(loss=loss, metrics={k: zero for k in keys})


class DFlashAlgorithm(BlockAlgorithm):
    """DFlash: block draft over the target's frozen embedding / lm_head, decayed CE (ALGORITHMS.md section 2)."""

    name = "dflash"
    backends = ("HFDFlashTargetModel", "RemoteDFlashTargetModel")
    metric_keys = ("loss", "ce", "accuracy", "accept_len", "blocks")

    def build_draft(self, backend, target_config, token_counts, special_ids):
        dcfg = DFlashConfig.from_target_config(target_config, **self._draft_fields(backend, target_config))
        return DFlashDraft(dcfg, backend.get_input_embeddings(), backend.get_output_embeddings())

    @staticmethod
    def exporter(draft, out_dir):
        return export_dflash(draft, out_dir)

    def loss(self, draft, batch, dist):
        b = self.cfg.block
        try:
            out = dflash_loss(
                draft, batch, num_anchors=b.num_anchors, gamma=self.gamma, generator=self.generator,
                chunk_rows=b.chunk_rows, den_reduce=dist.all_reduce_sum, world_size=dist.world_size,
            )  # fmt: skip
        except NoValidAnchors:
            return self._empty_step(draft, self.metric_keys, dist)
        m = out.metrics
        metrics = {"loss": out.parts["ce"], "ce": out.parts["ce"], "accuracy": m["accuracy"]}
        metrics.update(accept_len=m["accept_len"], blocks=m["blocks"])
        return StepOutput(loss=out.loss, metrics=metrics)


class DSparkAlgorithm(BlockAlgorithm):
    """DSpark: the block draft plus Markov and confidence heads, 0.1 CE + 0.9 L1 + 1.0 BCE (section 3)."""

    name = "dspark"
    backends = ("HFDSparkTargetModel", "RemoteDSparkTargetModel")
    metric_keys = ("loss", "ce", "tv", "conf", "accuracy", "tau_train", "conf_error", "blocks")

    def build_draft(self, backend, target_config, token_counts, special_ids):
        d = self.cfg.dspark
        dcfg = DSparkConfig.from_target_config(
            target_config,
            **self._draft_fields(backend, target_config),
            num_anchors=self.cfg.block.num_anchors,
            markov_rank=d.markov_rank,
            enable_confidence_head=d.confidence_head,
            confidence_head_with_markov=d.confidence_head_with_markov and d.confidence_head,
            final_logit_softcapping=backend.final_logit_softcapping,
        )
        draft = DSparkDraft(dcfg)
        return draft.copy_target_weights(backend.get_input_embeddings(), backend.get_output_embeddings())

    @staticmethod
    def exporter(draft, out_dir):
        return export_dspark(draft, out_dir)

    def loss(self, draft, batch, dist):
        b, d = self.cfg.block, self.cfg.dspark
        try:
            out = dspark_loss(
                draft, batch, num_anchors=b.num_anchors, gamma=self.gamma, ce_weight=d.ce_weight,
                tv_weight=d.tv_weight, conf_weight=d.conf_weight, generator=self.generator,
                chunk_rows=b.chunk_rows, den_reduce=dist.all_reduce_sum, world_size=dist.world_size,
            )  # fmt: skip
        except NoValidAnchors:
            return self._empty_step(draft, self.metric_keys, dist)
        p, m = out.parts, out.metrics
        total = d.ce_weight * p["ce"] + d.tv_weight * p["tv"] + d.conf_weight * p["conf"]
        metrics = {"loss": total, "ce": p["ce"], "tv": p["tv"], "conf": p["conf"]}
        metrics.update({k: m[k] for k in ("accuracy", "tau_train", "conf_error", "blocks")})
        return StepOutput(loss=out.loss, metrics=metrics)


ALGORITHMS: dict[str, type[DraftAlgorithm]] = {
    "eagle3": Eagle3Algorithm,
    "dflash": DFlashAlgorithm,
    "dspark": DSparkAlgorithm,
}
