"""EAGLE-3 in the trainer: TTT-unrolled single-layer draft, soft cross-entropy (docs/architecture.md section 1)."""

from __future__ import annotations

from draftfeed.client.vocab import build_token_map

from ..export import EAGLE3_ARCHITECTURE, export_eagle3, load_eagle3, read_eagle3_config
from ..losses import decode_walk, eagle3_batch_loss
from ..models.common import text_config_dict
from ..models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from . import DraftAlgorithm, StepOutput, register

__all__ = ["Eagle3Algorithm"]


@register
class Eagle3Algorithm(DraftAlgorithm):
    """EAGLE-3: TTT-unrolled single-layer draft, soft cross-entropy (docs/architecture.md section 1)."""

    name = "eagle3"
    architectures = (EAGLE3_ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaEagle3DraftModel")

    def open_backend(self, model, device):
        t = self.cfg.target
        if model is not None:
            from draftfeed.target.backends import HFEagle3TargetModel

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
        return StepOutput(
            loss=out.loss,
            metrics=metrics,
            decode_walk=lambda max_tokens=None: decode_walk(out.chain_run, out.valid, max_tokens),
        )

    def export(self, draft, out_dir, target_config, backend):
        num_layers = int(text_config_dict(target_config)["num_hidden_layers"])
        return export_eagle3(draft, out_dir, target_config, list(backend.aux_layer_ids), num_layers)

    @classmethod
    def load_export(cls, path, target, *, device=None, dtype=None):
        _, raw = read_eagle3_config(path)
        layers = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        draft = load_eagle3(path, target.get_input_embeddings().weight, device=device, dtype=dtype)
        return draft, list(layers) if layers else None

    @classmethod
    def drafter(cls, draft, confidence_threshold=0.0):
        from ..evaluate import Eagle3ChainDrafter

        return Eagle3ChainDrafter(draft)
