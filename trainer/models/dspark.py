"""DSpark draft (math only): the DFlash backbone plus a Markov head and a confidence head.

docs/architecture.md section 3. The backbone (`fc`, `hidden_norm`, `layers`, `norm`) is DFlash's
`BlockDraftBackbone`; DSpark adds its own frozen copies of the target's `embed_tokens` / `lm_head`, a
vanilla low-rank Markov head B(prev) = W2 W1[prev] (`markov_head.markov_w1` Embedding(V,r),
`markov_head.markov_w2` Linear(r->V)) and a confidence head `confidence_head.proj` Linear(H+r -> 1) on
[h_k; W1[prev_k]]. Slot k (0..bs-1) predicts x_{a+k+1}; its logits are z_k = softcap(lm_head(h_k)) + B(prev_k)
with prev_0 = x_a and prev_k = x_{a+k} (teacher forcing) or d_k (inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .common import target_architectures
from .dflash import BlockDraftBackbone, DFlashConfig, _read, _write, run_block

__all__ = [
    "DSparkConfig",
    "DSparkDraft",
    "DSparkProposal",
    "MarkovHead",
    "ConfidenceHead",
    "softcap",
    "propose_block",
    "block_proposal",
    "export_dspark",
    "load_dspark",
]


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """tanh(logits / cap) * cap (Gemma-style `final_logit_softcapping`); identity for None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


@dataclass
class DSparkConfig(DFlashConfig):
    """DFlash's fields plus DSpark's heads. `markov_rank` 0 turns the Markov head off (and with it the
    confidence head's Markov input). `architecture` is the draft class written to the export's
    `architectures`: `from_target_config` takes it from the registry (`draftfeed.trainer.algorithms.dspark`,
    by the target's `config.architectures`) and fails there for a family that has no entry."""

    block_size: int = 7
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    final_logit_softcapping: float | None = None
    architecture: str | None = None

    algorithm: ClassVar[str] = "dspark"
    min_block_size: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0 (0 = no Markov head), got {self.markov_rank}")
        if self.markov_rank and self.markov_head_type != "vanilla":
            raise ValueError(f"markov_head_type={self.markov_head_type!r} is not implemented; use 'vanilla'")
        if self.enable_confidence_head and self.confidence_head_with_markov and not self.markov_rank:
            raise ValueError("confidence_head_with_markov=True needs markov_rank > 0")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError(
                f"final_logit_softcapping must be positive or None, got {self.final_logit_softcapping}"
            )

    @classmethod
    def from_target_config(cls, target_config, **kwargs):
        """DFlash's `from_target_config`; `architecture` None -> the registry's draft class for the target
        (InvalidArgument naming the registered families when the target's has none)."""
        if kwargs.get("architecture") is None:
            from ..algorithms.dspark import dspark_draft_architecture

            kwargs["architecture"] = dspark_draft_architecture(target_architectures(target_config))
        return super().from_target_config(target_config, **kwargs)

    @classmethod
    def _target_extras(cls, d: dict) -> dict:
        cap = d.get("final_logit_softcapping")
        return {"final_logit_softcapping": float(cap) if cap else None}

    @classmethod
    def _export_extras(cls, d: dict) -> dict:
        return {"architecture": (d.get("architectures") or [None])[0]}

    def to_export_dict(self) -> dict:
        """config.json in the DeepSpec/AutoModel `Qwen3DSparkModel` layout (fields top level), with
        `architectures: [self.architecture]`."""
        if not self.architecture:
            raise ValueError(
                "DSparkConfig.architecture is not set, so the export cannot name its draft class: build the "
                "config with DSparkConfig.from_target_config (the registry in draftfeed.trainer.algorithms.dspark "
                "picks it) or pass architecture= explicitly"
            )
        out = self._base_export_dict()
        out.pop("dflash_config", None)
        out.update(
            architectures=[self.architecture],
            mask_token_id=self.mask_token_id,
            target_layer_ids=list(self.target_layer_ids),
            num_anchors=self.num_anchors,
            markov_rank=self.markov_rank,
            markov_head_type=self.markov_head_type,
            enable_confidence_head=self.enable_confidence_head,
            confidence_head_with_markov=self.confidence_head_with_markov,
            final_logit_softcapping=self.final_logit_softcapping,
        )
        return out


class MarkovHead(nn.Module):
    """Vanilla low-rank Markov head: bias(prev) = W2 W1[prev] [.., V]."""

    def __init__(self, vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_ids.long())

    def forward(self, prev_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(self.prev_embed(prev_ids))


class ConfidenceHead(nn.Module):
    def __init__(self, in_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


class DSparkDraft(BlockDraftBackbone):
    """DSpark draft; state_dict keys match the export layout exactly."""

    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        v, h, r = config.vocab_size, config.hidden_size, config.markov_rank
        self.embed_tokens = nn.Embedding(v, h)
        self.lm_head = nn.Linear(h, v, bias=False)
        self.markov_head = MarkovHead(v, r) if r else None
        self.confidence_head = None
        if config.enable_confidence_head:
            self.confidence_head = ConfidenceHead(h + (r if config.confidence_head_with_markov else 0))
        for module in (self.embed_tokens, self.lm_head, self.markov_head, self.confidence_head):
            if module is not None:
                module.apply(self._init_weights)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)

    @torch.no_grad()
    def copy_target_weights(self, embed_tokens: nn.Module, lm_head: nn.Module) -> DSparkDraft:
        """Copy the target's embedding and lm_head (from the backend) into the draft's frozen copies."""
        for mine, theirs, name in (
            (self.embed_tokens, embed_tokens, "embed_tokens"),
            (self.lm_head, lm_head, "lm_head"),
        ):
            if theirs.weight.shape != mine.weight.shape:
                raise ValueError(
                    f"target {name}.weight has shape {tuple(theirs.weight.shape)}, expected {tuple(mine.weight.shape)}"
                )
            mine.weight.copy_(theirs.weight.detach())
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """U = softcap(lm_head(h)), without the Markov bias."""
        return softcap(self.lm_head(hidden), self.config.final_logit_softcapping)

    def markov_bias(self, prev_ids: torch.Tensor) -> torch.Tensor | int:
        return 0 if self.markov_head is None else self.markov_head(prev_ids)

    def confidence_logits(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """conf_k (pre-sigmoid) from [h_k; W1[prev_k]] (or h_k alone without Markov input); None when off."""
        if self.confidence_head is None:
            return None
        features = hidden
        if self.config.confidence_head_with_markov:
            features = torch.cat([hidden, self.markov_head.prev_embed(prev_ids).to(hidden.dtype)], dim=-1)
        return self.confidence_head(features).float()


@dataclass
class DSparkProposal:
    """`tokens` [B,bs] greedy d_1..d_bs; `confidence` [B,bs] sigmoid(c_k) (None without the head);
    `lengths` [B] how many drafts to verify: the first k with c_k < threshold, else bs."""

    tokens: torch.Tensor
    confidence: torch.Tensor | None
    lengths: torch.Tensor


@torch.no_grad()
def propose_block(
    draft: DSparkDraft,
    context_features: torch.Tensor,
    anchor_ids: torch.Tensor,
    *,
    confidence_threshold: float = 0.0,
) -> DSparkProposal:
    """Greedy DSpark proposal with Markov chaining d_{k+1} = argmax(U_k + B(prev)), prev = x_s then d_k.

    `context_features` [B,s,K*H] for x_0..x_{s-1}, `anchor_ids` [B] = x_s (see `dflash.run_block`; context
    K/V are recomputed each call). `confidence_threshold` theta > 0 stops at the first slot with
    sigmoid(c_k) < theta (0 = off: all bs drafts).
    """
    hidden = run_block(draft, context_features, anchor_ids)
    return block_proposal(draft, hidden, anchor_ids, confidence_threshold=confidence_threshold)


def block_proposal(
    draft: DSparkDraft, hidden: torch.Tensor, anchor_ids: torch.Tensor, *, confidence_threshold: float = 0.0
) -> DSparkProposal:
    """The proposal from a block's final hidden states [B,bs,H] (`run_block`) and its anchors [B]: fixed
    shapes, no host sync (a caller may capture it in a CUDA graph)."""
    base = draft.base_logits(hidden)
    prev = anchor_ids.to(hidden.device).long()
    tokens, confidence = [], []
    for k in range(draft.config.block_size):
        conf = draft.confidence_logits(hidden[:, k], prev)
        if conf is not None:
            confidence.append(torch.sigmoid(conf))
        prev = (base[:, k] + draft.markov_bias(prev)).argmax(-1)
        tokens.append(prev)
    tokens_t = torch.stack(tokens, dim=1)
    bs = draft.config.block_size
    lengths = torch.full((tokens_t.shape[0],), bs, dtype=torch.long, device=tokens_t.device)
    conf_t = torch.stack(confidence, dim=1) if confidence else None
    if conf_t is not None and confidence_threshold > 0:
        below = conf_t < confidence_threshold
        first = torch.where(below, torch.arange(bs, device=below.device), bs).min(dim=1).values
        lengths = first
    return DSparkProposal(tokens=tokens_t, confidence=conf_t, lengths=lengths)


def export_dspark(model: DSparkDraft, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors in the `Qwen3DSparkModel` layout (DFlash keys + embed_tokens,
    lm_head, markov_head.markov_w{1,2}, confidence_head.proj), `architectures` = the config's
    `architecture` (the registry's draft class for the target). `dtype` None keeps the model's dtype."""
    return _write(model, model.config.to_export_dict(), out_dir, dtype)


def load_dspark(path: str | Path, device: torch.device | str | None = None) -> DSparkDraft:
    """Load an `export_dspark` directory (or a DeepSpec/AutoModel one with the same keys)."""
    config_dict, tensors = _read(path)
    model = DSparkDraft(DSparkConfig.from_export_dict(config_dict))
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=next(iter(tensors.values())).dtype)
