"""DSpark in the trainer: the block draft plus Markov and confidence heads, 0.1 CE + 0.9 L1 + 1.0 BCE
(docs/architecture.md section 3). `DSPARK_DRAFTS` says which DSpark draft class fits a target, by the target's
`config.architectures` (one line per family)."""

from __future__ import annotations

from draftfeed.client.errors import InvalidArgument

from ..block_drafting import NoValidAnchors, dspark_loss
from ..models.dspark import DSparkConfig, DSparkDraft, export_dspark, load_dspark
from . import StepOutput, register
from .block import BlockAlgorithm

__all__ = ["DSparkAlgorithm", "DSPARK_DRAFTS", "dspark_draft_architecture"]

# target architecture -> the `architectures` name of the DSpark draft exported for it
DSPARK_DRAFTS = {
    "Qwen3ForCausalLM": "Qwen3DSparkModel",
    "Qwen3MoeForCausalLM": "Qwen3DSparkModel",
    "Qwen2ForCausalLM": "Qwen3DSparkModel",
    "LlamaForCausalLM": "Qwen3DSparkModel",
    "MistralForCausalLM": "Qwen3DSparkModel",
}


def dspark_draft_architecture(architectures: list[str] | None) -> str:
    """The DSpark draft architecture for a target; an unknown family names the known ones and the fix."""
    for arch in architectures or ():
        if arch in DSPARK_DRAFTS:
            return DSPARK_DRAFTS[arch]
    known = ", ".join(sorted(DSPARK_DRAFTS))
    raise InvalidArgument(
        f"no DSpark draft is registered for target architectures {architectures}; known: {known}. "
        "Add a line to draftfeed.trainer.algorithms.dspark.DSPARK_DRAFTS for this family (target architecture -> "
        "the DSpark draft class your serving engine loads for it), or train DFlash or EAGLE-3, which need none"
    )


@register
class DSparkAlgorithm(BlockAlgorithm):
    """DSpark: the block draft plus Markov and confidence heads, 0.1 CE + 0.9 L1 + 1.0 BCE (section 3)."""

    name = "dspark"
    backends = ("HFDSparkTargetModel", "RemoteDSparkTargetModel")
    metric_keys = ("loss", "ce", "tv", "conf", "accuracy", "tau_train", "conf_error", "blocks")
    architectures = ("Qwen3DSparkModel", "DSparkDraftModel")

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

    @staticmethod
    def loader(path, target, device):
        return load_dspark(path, device=device)

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
