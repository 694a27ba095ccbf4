"""Pieces the draft models share (math only): activations, RMSNorm, rotary embeddings, packed documents.

EAGLE-3 (`eagle3.py`) and the block drafts (`dflash.py`, `dspark.py`) import these; none of them keeps
its own copy. RoPE is rotate-half (Llama / Qwen layout) with angles in fp32 whatever the model dtype.
RMSNorm, RoPE and silu(gate) * up are autograd Functions with their gradients written out, whose bodies are
pure functions that `compiling` fuses into one kernel each (forward and backward) when `loop.compile` is on;
fp64 inputs take plain autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from draftfeed.client.packing import document_ids

from ..compiling import Compiled

__all__ = [
    "ACTIVATIONS",
    "RMSNorm",
    "rope_init",
    "rope_inv_freq",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "gated_activation",
    "document_ids",
    "tokens_left_in_document",
    "text_config_dict",
    "target_architectures",
]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's name for the same tanh approximation
}


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(weight * (x r).to(x.dtype), r) with r = rsqrt(mean(x^2) + eps) over the last dim, in fp32."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * r).to(x.dtype), r


def _rms_backward(x: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, dy: torch.Tensor):
    """(dx, dweight): dn = dy w; dx = r (dn - x r^2 mean(dn x)); dweight = sum over rows of dy n."""
    xf = x.float()
    dyf = dy.float()
    dn = dyf * weight.float()
    dx = r * (dn - xf * (r * r) * (dn * xf).mean(-1, keepdim=True))
    dw = (dyf * (xf * r).to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


_rms_forward_kernel = Compiled(_rms_forward)
_rms_backward_kernel = Compiled(_rms_backward)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out: saves x and the [..., 1] fp32 r (not an fp32 copy of x), and
    both bodies are one compiled kernel each when `compiling` is on."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = _rms_forward_kernel(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dx, dw = _rms_backward_kernel(x, weight, r, dy)
        return dx, dw, None


class RMSNorm(nn.Module):
    """Llama RMSNorm: computed in fp32, weight applied in the input dtype (output: the promoted dtype)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 or self.weight.dtype == torch.float64:
            y, _ = _rms_forward(x, self.weight, self.eps)  # fp64 (gradient checks): autograd throughout
            return y
        return _RMSNormFunction.apply(x, self.weight, float(self.eps))


def rope_init(
    head_dim: int,
    rope_parameters: dict,
    device: torch.device | str | None = None,
    *,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    max_position_embeddings: int = 2048,
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32, attention scaling) of a HF `rope_parameters` dict (its
    `rope_type` -- or legacy `type` -- and `rope_theta`). The scaled types are HF's own formulas
    (`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`: linear, dynamic, yarn, longrope, llama3, ...);
    "default" is the plain `1 / theta**(2i/d)` every HF model computes itself."""
    params = dict(rope_parameters)
    rope_type = params.pop("type", None) or params.get("rope_type") or "default"
    params["rope_type"] = rope_type
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
        return 1.0 / (theta**exponent), 1.0
    from transformers import Qwen3Config  # a config HF's rope functions read (head_dim, rope_parameters)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_type={rope_type!r}: expected 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    params["rope_theta"] = theta
    heads = num_attention_heads or 1
    hf = Qwen3Config(
        hidden_size=hidden_size or head_dim * heads,
        num_attention_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=params,
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, device)
    return inv_freq.float(), float(scaling)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32): default, linear or llama3 rope scaling (`rope_init`; these
    types keep the attention scaling at 1)."""
    if scaling is None:
        return rope_init(head_dim, {"rope_type": "default", "rope_theta": theta}, device)[0]
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"rope_type={rope_type!r}: expected None, 'linear' or 'llama3'")
    return rope_init(head_dim, {**scaling, "rope_type": rope_type, "rope_theta": theta}, device)[0]


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B,S,head_dim] for integer `positions` [B,S] (angles in fp32, times `scaling`)."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    if scaling == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dx = dy cos + R^T(dy sin) with R^T(u) = cat(u_2, -u_1), the transpose of `rotate_half`."""
    u = dy * sin.unsqueeze(1)
    half = u.shape[-1] // 2
    return dy * cos.unsqueeze(1) + torch.cat((u[..., half:], -u[..., :half]), dim=-1)


_rope_kernel = Compiled(_rope)
_rope_backward_kernel = Compiled(_rope_backward)


class _RopeFunction(torch.autograd.Function):
    """RoPE with its gradient written out (cos / sin take none): one compiled kernel each way."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_kernel(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_backward_kernel(dy, cos, sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [B,heads,S,d] with cos/sin [B,S,d] (broadcast over heads)."""
    if cos.requires_grad or sin.requires_grad or x.dtype == torch.float64:
        return _rope(x, cos, sin)
    return _RopeFunction.apply(x, cos, sin)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor):
    g = gate.float()
    s = torch.sigmoid(g)
    dyf = dy.float()
    return (dyf * up.float() * s * (1 + g * (1 - s))).to(gate.dtype), (dyf * g * s).to(up.dtype)


_silu_mul_kernel = Compiled(_silu_mul)
_silu_mul_backward_kernel = Compiled(_silu_mul_backward)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up with its gradient written out: one compiled kernel each way."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul_kernel(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _silu_mul_backward_kernel(gate, up, dy)


def gated_activation(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ACTIVATIONS[act](gate) * up (the gated MLPs); silu through `_SiluMul`."""
    if act == "silu" and gate.dtype == up.dtype and gate.dtype != torch.float64:
        return _SiluMul.apply(gate, up)
    return ACTIVATIONS[act](gate) * up


def tokens_left_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_remaining [B,S] from document ids [B,S]: how many slots of the same document follow each slot."""
    slots = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    last = torch.zeros(doc_ids.shape[0], int(doc_ids.max()) + 1, dtype=torch.long, device=doc_ids.device)
    last = last.scatter_reduce(1, doc_ids, slots, reduce="amax")
    return last.gather(1, doc_ids) - slots


# target-config names outside HF's `attribute_map` -> the field the drafts read (GPT-2 family)
_FIELD_ALIASES = {"n_inner": "intermediate_size", "activation_function": "hidden_act"}


def _attribute_map(config: Any, d: dict) -> dict:
    """HF's alias table (canonical name -> the config's own name) of `config`, or of a dict's `model_type`."""
    if not isinstance(config, dict):
        return dict(getattr(config, "attribute_map", None) or {})
    from transformers import CONFIG_MAPPING

    model_type = d.get("model_type")
    return dict(CONFIG_MAPPING[model_type].attribute_map) if model_type in CONFIG_MAPPING else {}


def text_config_dict(config: Any) -> dict:
    """The target's text config as a plain dict (a nested `text_config` is unwrapped), under the field
    names the drafts read: HF `attribute_map` aliases are replaced by the names they stand for (GPT-2's
    `n_layer`, `n_embd`, `n_head`, `n_positions` -> `num_hidden_layers`, `hidden_size`, ...), GPT-2's
    `n_inner` becomes `intermediate_size` (None: 4 * hidden_size, as its MLP) and `activation_function`
    becomes `hidden_act` (a config's own `to_dict()` keeps the aliases; only `getattr` resolves them)."""
    if isinstance(config, dict):
        d = dict(config)
        if isinstance(d.get("text_config"), dict):
            d = dict(d["text_config"])
    else:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    for canonical, alias in _attribute_map(config, d).items():
        if alias in d:
            d[canonical] = d.pop(alias)
    if "n_inner" in d and d["n_inner"] is None:
        d["n_inner"] = 4 * int(d["hidden_size"])
    for alias, canonical in _FIELD_ALIASES.items():
        if alias in d:
            value = d.pop(alias)
            d.setdefault(canonical, value)
    return d


def target_architectures(config: Any) -> list[str]:
    """The target's `architectures` (the top-level config's, not a nested text config's); for a config that
    names none (built in memory, never saved) the causal-LM class transformers builds for its `model_type`."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    if get("architectures"):
        return list(get("architectures"))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(get("model_type"))
    return [name] if name else []
