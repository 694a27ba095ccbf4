"""DFlash in the trainer: block draft over the target's frozen embedding / lm_head, decayed CE (docs/architecture.md
section 2)."""

from __future__ import annotations

from ..block_drafting import NoValidAnchors, dflash_loss
from ..models.dflash import DFlashConfig, DFlashDraft, export_dflash, load_dflash
from . import StepOutput, register
from .block import BlockAlgorithm

__all__ = ["DFlashAlgorithm"]


@register
class DFlashAlgorithm(BlockAlgorithm):
    """DFlash: block draft over the target's frozen embedding / lm_head, decayed CE (docs/architecture.md section 2)."""

    name = "dflash"
    backends = ("HFDFlashTargetModel", "RemoteDFlashTargetModel")
    metric_keys = ("loss", "ce", "accuracy", "accept_len", "blocks")
    architectures = ("DFlashDraftModel", "Qwen3DFlashDraftModel")

    def build_draft(self, backend, target_config, token_counts, special_ids):
        dcfg = DFlashConfig.from_target_config(target_config, **self._draft_fields(backend, target_config))
        return DFlashDraft(dcfg, backend.get_input_embeddings(), backend.get_output_embeddings())

    @staticmethod
    def exporter(draft, out_dir):
        return export_dflash(draft, out_dir)

    @staticmethod
    def loader(path, target, device):
        return load_dflash(path, target.get_input_embeddings(), target.get_output_embeddings(), device=device)

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
