"""DFlash draft (math only): a small bidirectional Qwen3-style stack that drafts a block of tokens at once.

docs/architecture.md section 2. The draft reads the target's features F [B,S,K*H] of K captured layers,
projects them once to a context C = hidden_norm(fc(F)) [B,S,H], and runs `num_layers` decoder layers
over a block [x_a, MASK, ..., MASK]. In every layer the block's queries attend to keys/values computed
with the same projections from [C; x] (C is the same tensor in every layer and is not layer-normed);
RoPE puts the keys at [context; block] positions and the queries at block positions. Slot k of the block
(k = 1..bs-1) predicts x_{a+k}. The embedding and lm_head are the target's, frozen and passed in, never
saved. `BlockDraftBackbone` is shared with DSpark (`dspark.py`), which adds its own heads.

Which context each block sees (the training mask) is built in `trainer/block_drafting.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from draftfeed.client.algorithms import get_algorithm

from .common import (
    ACTIVATIONS,
    RMSNorm,
    apply_rope,
    gated_activation,
    rope_cos_sin,
    rope_init,
    text_config_dict,
)

__all__ = [
    "DFlashConfig",
    "BlockDraftBackbone",
    "DFlashDraft",
    "run_block",
    "propose_block",
    "block_drafts",
    "export_dflash",
    "load_dflash",
    "text_config_dict",
]

# target-config keys that describe the target's own stack, not the draft's
_DROPPED_TARGET_KEYS = ("architectures", "auto_map", "_name_or_path", "layer_types", "max_window_layers")


def _rope_parameters(d: dict) -> dict:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "rope_type" not in rope and "type" not in rope and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]  # per-layer-type rope (Gemma-style): drafts use full attention
    rope = dict(rope)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if "rope_theta" not in rope:
        rope["rope_theta"] = float(d.get("rope_theta", 10000.0))
    return rope


@dataclass
class DFlashConfig:
    """Draft dimensions (copied from the target) plus the draft's own fields.

    `num_target_layers` is the target's decoder-layer count N; `target_layer_ids` the K layers whose
    outputs form the features; `num_layers` the draft's depth. `target_config` keeps the target's text
    config so an export can start from it.
    """

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    num_layers: int = 5
    block_size: int = 16
    target_config: dict = field(default_factory=dict, repr=False, compare=False)

    algorithm: ClassVar[str] = "dflash"
    min_block_size: ClassVar[int] = 2  # slot 0 is the anchor, so DFlash needs one more slot to draft

    def __post_init__(self):
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        get_algorithm(self.algorithm).validate_layer_ids(self.target_layer_ids, self.num_target_layers)
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers (draft depth) must be >= 1, got {self.num_layers}")
        if self.block_size < self.min_block_size:
            raise ValueError(
                f"{self.algorithm} block_size must be >= {self.min_block_size}, got {self.block_size}"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is outside the vocab [0, {self.vocab_size})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        self.rope_parameters = _rope_parameters(
            {"rope_parameters": self.rope_parameters, "rope_theta": self.rope_theta}
        )
        self.rope_theta = float(self.rope_parameters["rope_theta"])

    @classmethod
    def from_target_config(
        cls,
        target_config: Any,
        *,
        mask_token_id: int | None = None,
        target_layer_ids: list[int] | None = None,
        num_target_features: int = 5,
        **draft_fields: Any,
    ):
        """Dimensions from the target's (text) config; `mask_token_id` None -> vocab_size - 1;
        `target_layer_ids` None -> the algorithm's default for `num_target_features` layers."""
        d = text_config_dict(target_config)
        n, vocab = int(d["num_hidden_layers"]), int(d["vocab_size"])
        if target_layer_ids is None:
            target_layer_ids = get_algorithm(cls.algorithm).default_layer_ids(n, num_target_features)
        heads = int(d["num_attention_heads"])
        rope = _rope_parameters(d)
        dims = dict(
            hidden_size=int(d["hidden_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            intermediate_size=int(d["intermediate_size"]),
            vocab_size=vocab,
            num_target_layers=n,
            target_layer_ids=list(target_layer_ids),
            mask_token_id=vocab - 1 if mask_token_id is None else int(mask_token_id),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
            rope_theta=float(rope["rope_theta"]),
            rope_parameters=rope,
            max_position_embeddings=int(d.get("max_position_embeddings") or 32768),
            hidden_act=str(d.get("hidden_act") or d.get("hidden_activation") or "silu"),
            attention_bias=bool(d.get("attention_bias", False)),
            initializer_range=float(d.get("initializer_range") or 0.02),
            target_config=d,
        )
        dims.update(cls._target_extras(d))
        dims.update(draft_fields)
        return cls(**dims)

    @classmethod
    def _target_extras(cls, d: dict) -> dict:
        return {}

    @classmethod
    def _export_extras(cls, d: dict) -> dict:
        """Subclass fields that `from_export_dict` reads from an export's config.json."""
        return {}

    def to_export_dict(self) -> dict:
        """config.json in the DFlash layout (docs/architecture.md section 2, "Export")."""
        out = self._base_export_dict()
        out.update(
            architectures=["DFlashDraftModel"],
            auto_map={"AutoModel": "dflash.DFlashDraftModel"},
            dflash_config={
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "block_size": self.block_size,
            },
        )
        return out

    def _base_export_dict(self) -> dict:
        out = {k: v for k, v in self.target_config.items() if k not in _DROPPED_TARGET_KEYS}
        out.update(
            model_type="qwen3",
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=dict(self.rope_parameters),
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            initializer_range=self.initializer_range,
            num_hidden_layers=self.num_layers,
            num_target_layers=self.num_target_layers,
            block_size=self.block_size,
            layer_types=["full_attention"] * self.num_layers,
            max_window_layers=self.num_layers,
            use_sliding_window=False,
            tie_word_embeddings=False,
        )
        if self.rope_parameters.get("rope_type", "default") != "default":
            out["rope_scaling"] = dict(self.rope_parameters)
        return out

    @classmethod
    def from_export_dict(cls, d: dict):
        """Read a config.json written by `to_export_dict` (draft fields top level or in `dflash_config`)."""
        nested = {**(d.get("dflash_config") or {}), **(d.get("dspark_config") or {})}
        merged = {**d, **nested}
        draft = {
            f.name: merged[f.name] for f in fields(cls) if f.name in merged and f.name != "target_config"
        }
        draft["num_layers"] = int(d["num_hidden_layers"])
        draft.update(cls._export_extras(d))
        return cls.from_target_config(
            merged, **{**draft, "num_target_features": len(draft["target_layer_ids"])}
        )


def _inv_freq(config: DFlashConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies, always fp32, and the attention scaling of the rope type."""
    return rope_init(
        config.head_dim,
        config.rope_parameters,
        device,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
    )


class BlockAttention(nn.Module):
    """Queries from the block; keys/values from [context; block] through the same projections."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, x, context, rope_q, rope_k, mask):
        k, v = self.keys_values(torch.cat([context, x], dim=1))
        q, k = apply_rope(self.queries(x), *rope_q), apply_rope(k, *rope_k)
        return self.attend(q, k, v, mask)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """q_norm(q_proj(x)) [B,heads,Q,d], before RoPE."""
        b, n, _ = x.shape
        return self.q_norm(self.q_proj(x).view(b, n, self.num_heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, kv_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_norm(k_proj(kv_in)) (before RoPE) and v_proj(kv_in), [B,kv_heads,L,d]. Row-wise: a context row's
        keys / values depend on that row (and, after RoPE, its position) only."""
        b, n, _ = kv_in.shape
        k = self.k_norm(self.k_proj(kv_in).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(kv_in).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def attend(self, q, k, v, mask) -> torch.Tensor:
        """o_proj(softmax(q k^T / sqrt(d) | mask) v) [B,Q,H] for q [B,heads,Q,d], k / v [B,kv_heads,L,d]."""
        b, _, q_len, _ = q.shape
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]
        self.hidden_act = config.hidden_act

    def forward(self, x):
        return self.down_proj(gated_activation(self.hidden_act, self.gate_proj(x), self.up_proj(x)))


class BlockDecoderLayer(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BlockAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, context, rope_q, rope_k, mask):
        x = x + self.self_attn(self.input_layernorm(x), context, rope_q, rope_k, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockDraftBackbone(nn.Module):
    """fc, hidden_norm, the decoder layers and the final norm: what DFlash and DSpark share.

    `forward(block_embeds [B,Q,H], context_features [B,S,K*H], block_positions [B,Q],
    context_positions [B,S], attention_mask [B,1,Q,S+Q] bool or None)` -> final-normed hidden [B,Q,H].
    `attention_mask` True = may attend; None = every query sees every key (inference on one block).
    """

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps)
        self.layers = nn.ModuleList(BlockDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._rope_cache: dict[str, tuple[torch.Tensor, float]] = {}
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B,L,head_dim] for integer positions; angles in fp32 whatever the model dtype."""
        key = str(positions.device)
        if key not in self._rope_cache:
            self._rope_cache[key] = _inv_freq(self.config, positions.device)
        inv_freq, scaling = self._rope_cache[key]
        return rope_cos_sin(inv_freq, positions, dtype, scaling)

    def context(self, context_features: torch.Tensor) -> torch.Tensor:
        """C = hidden_norm(fc(F)) [B,S,H]."""
        return self.hidden_norm(self.fc(context_features.to(self.fc.weight.dtype)))

    def forward(
        self, block_embeds, context_features, block_positions, context_positions, attention_mask=None
    ):
        context = self.context(context_features)
        x = block_embeds.to(context.dtype)
        rope_q = self.rope(block_positions, x.dtype)
        rope_c = self.rope(context_positions, x.dtype)
        rope_k = (torch.cat([rope_c[0], rope_q[0]], dim=1), torch.cat([rope_c[1], rope_q[1]], dim=1))
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, context, rope_q, rope_k, attention_mask, use_reentrant=False)
            else:
                x = layer(x, context, rope_q, rope_k, attention_mask)
        return self.norm(x)


class DFlashDraft(BlockDraftBackbone):
    """The DFlash draft. `embed_tokens` / `lm_head` are the target's modules (from the backend's
    `get_input_embeddings()` / `get_output_embeddings()`), kept as plain attributes: frozen, outside
    `state_dict()` and `parameters()`, never saved."""

    def __init__(self, config: DFlashConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__(config)
        for name, module in (("embed_tokens", embed_tokens), ("lm_head", lm_head)):
            if tuple(module.weight.shape) != (config.vocab_size, config.hidden_size):
                raise ValueError(
                    f"target {name}.weight has shape {tuple(module.weight.shape)}, expected "
                    f"({config.vocab_size}, {config.hidden_size}) from the draft config"
                )
            module.requires_grad_(False)
            object.__setattr__(self, name, module)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.weight.to(hidden.dtype))


def run_block(
    draft: BlockDraftBackbone, context_features: torch.Tensor, anchor_ids: torch.Tensor
) -> torch.Tensor:
    """One inference block: hidden [B,bs,H] for [x_s, MASK x (bs-1)] at positions s..s+bs-1.

    `context_features` [B,s,K*H] are the target features of the committed tokens x_0..x_{s-1}, all at
    positions 0..s-1 (every row the same length); `anchor_ids` [B] is x_s (the last committed token,
    which the target has not run yet). No mask: the block sees all of its context and itself. There is no
    draft KV cache: the context K/V are recomputed from the features on every call (correct, O(s) per round;
    `trainer/static_drafting.py` keeps them in a cache, as they depend on each row's features alone).
    """
    b, s = context_features.shape[:2]
    bs = draft.config.block_size
    device = context_features.device
    ids = torch.full((b, bs), draft.config.mask_token_id, dtype=torch.long, device=device)
    ids[:, 0] = anchor_ids.to(device).long()
    ctx_pos = torch.arange(s, device=device).expand(b, s)
    block_pos = torch.arange(s, s + bs, device=device).expand(b, bs)
    return draft(draft.embed(ids), context_features, block_pos, ctx_pos, None)


@torch.no_grad()
def propose_block(
    draft: DFlashDraft, context_features: torch.Tensor, anchor_ids: torch.Tensor
) -> torch.Tensor:
    """Greedy DFlash proposal: d_1..d_{bs-1} [B,bs-1] (slot k predicts the token after k-1 drafts)."""
    return block_drafts(draft, run_block(draft, context_features, anchor_ids))


def block_drafts(draft: DFlashDraft, hidden: torch.Tensor) -> torch.Tensor:
    """d_1..d_{bs-1} [B,bs-1] from a block's final hidden states [B,bs,H] (`run_block`)."""
    return draft.logits(hidden[:, 1:]).argmax(-1)


def _write(model: nn.Module, config_dict: dict, out_dir: str | Path, dtype: torch.dtype | None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.cpu().contiguous().clone()
    saved = dtype or next(v.dtype for v in tensors.values() if v.is_floating_point())
    config_dict["torch_dtype"] = config_dict["dtype"] = str(saved).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return out


def _read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def export_dflash(model: DFlashDraft, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (keys: fc, hidden_norm, layers.{i}.*, norm; no embedding or
    lm_head) in the DFlash layout SGLang/vLLM load. `dtype` None keeps the model's dtype."""
    return _write(model, model.config.to_export_dict(), out_dir, dtype)


def load_dflash(
    path: str | Path, embed_tokens: nn.Module, lm_head: nn.Module, device: torch.device | str | None = None
) -> DFlashDraft:
    """Load an `export_dflash` directory into a `DFlashDraft` over the target's embedding and lm_head."""
    config_dict, tensors = _read(path)
    model = DFlashDraft(DFlashConfig.from_export_dict(config_dict), embed_tokens, lm_head)
    model.load_state_dict(tensors, strict=True)
    dtype = next(iter(tensors.values())).dtype
    return model.to(device=device, dtype=dtype)
