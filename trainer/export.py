"""EAGLE-3 draft export in the layout SGLang (`LlamaForCausalLMEagle3`) and vLLM (`Eagle3LlamaForCausalLM`)
load, and the loader that reads it back (docs/architecture.md section 1, "Export").

A directory with
- `config.json`: the target's text config with the draft's own dims written over it, plus
  `architectures: ["LlamaForCausalLMEagle3"]`, `model_type: "llama"`, `num_hidden_layers: 1`,
  `draft_vocab_size`, `tie_word_embeddings: false`, `target_hidden_size` when it differs from
  `hidden_size`, and `eagle_config.eagle_aux_hidden_state_layer_ids` (output-of-layer ids, SGLang's
  convention). For non-default aux ids vLLM's top-level `eagle_aux_hidden_state_layer_ids` is written as
  well, as input-of-layer ids (id + 1; inferred from vLLM's capture loop, see docs/architecture.md).
  Fields only draftfeed reads (num_target_layers, EAGLE-3.1 switches) sit under `draftfeed`.
- `model.safetensors`: `fc.weight`, `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
  `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`, `norm.weight`,
  `lm_head.weight`, `d2t` (int64), `t2d` (bool); `embed_tokens.weight` only when asked (SGLang always uses
  the target's embedding, vLLM uses it when the file has none).
The loader also accepts AutoModel-style names (`model.` prefix, `layers.0.` for `midlayer.`).

DFlash and DSpark write their own layouts (`models/dflash.py` `export_dflash`, `models/dspark.py`
`export_dspark`). `load_draft` reads an export of any of the three: `draft_algorithm` tells which from
config.json's `architectures` (each algorithm of `trainer/algorithms/` names its own).
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from draftfeed.client.layers import default_eagle3_layer_ids

from .models.common import rope_inv_freq, text_config_dict
from .models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

__all__ = [
    "EAGLE3_ARCHITECTURE",
    "eagle3_export_config",
    "export_eagle3",
    "load_eagle3",
    "read_eagle3_config",
    "draft_architectures",
    "draft_algorithm",
    "ExportedDraft",
    "load_draft",
]

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
_DROPPED_TARGET_KEYS = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "layer_types",
    "max_window_layers",
    "text_config",
    "vision_config",
    "quantization_config",
)


def eagle3_export_config(
    draft_cfg: Eagle3DraftConfig, target_config: Any, aux_layer_ids: list[int], num_target_layers: int
) -> dict:
    """config.json contents for a draft of `draft_cfg` trained on the target described by `target_config`."""
    out = {k: v for k, v in text_config_dict(target_config).items() if k not in _DROPPED_TARGET_KEYS}
    out.update(
        architectures=[EAGLE3_ARCHITECTURE],
        model_type="llama",
        num_hidden_layers=1,
        hidden_size=draft_cfg.hidden_size,
        num_attention_heads=draft_cfg.num_attention_heads,
        num_key_value_heads=draft_cfg.num_key_value_heads,
        head_dim=draft_cfg.head_dim,
        intermediate_size=draft_cfg.intermediate_size,
        vocab_size=draft_cfg.vocab_size,
        draft_vocab_size=draft_cfg.draft_vocab_size,
        rms_norm_eps=draft_cfg.rms_norm_eps,
        hidden_act=draft_cfg.hidden_act,
        attention_bias=draft_cfg.attention_bias,
        max_position_embeddings=draft_cfg.max_position_embeddings,
        tie_word_embeddings=False,
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids), "use_aux_hidden_state": True},
        draftfeed={
            "algorithm": "eagle3",
            "num_target_layers": int(num_target_layers),
            "norm_output": draft_cfg.norm_output,
            "fc_norm": draft_cfg.fc_norm,
        },
    )
    if draft_cfg.target_hidden_size != draft_cfg.hidden_size:
        out["target_hidden_size"] = draft_cfg.target_hidden_size
    if list(aux_layer_ids) != default_eagle3_layer_ids(num_target_layers):
        out["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in aux_layer_ids]
    return out


def export_eagle3(
    draft: Eagle3DraftModel,
    out_dir: str | Path,
    target_config: Any,
    aux_layer_ids: list[int],
    num_target_layers: int,
    *,
    dtype: torch.dtype | None = None,
    include_embeddings: bool = False,
) -> Path:
    """Write `config.json` + `model.safetensors`; `dtype` None keeps the draft's (floating tensors only)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config = eagle3_export_config(draft.config, target_config, aux_layer_ids, num_target_layers)
    tensors = {}
    for name, value in draft.state_dict().items():
        if name == "embed_tokens.weight" and not include_embeddings:
            continue
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.cpu().contiguous().clone()
    saved = dtype or draft.fc.weight.dtype
    config["torch_dtype"] = config["dtype"] = str(saved).removeprefix("torch.")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return out


def read_eagle3_config(path: str | Path) -> tuple[Eagle3DraftConfig, dict]:
    """(draft config, the raw config.json) of an exported draft."""
    path = Path(path).expanduser()
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an exported EAGLE-3 draft directory)")
    raw = json.loads(file.read_text())
    if EAGLE3_ARCHITECTURE not in (raw.get("architectures") or []):
        raise ValueError(
            f"{file}: architectures {raw.get('architectures')} do not include {EAGLE3_ARCHITECTURE!r}"
        )
    extra = raw.get("draftfeed") or {}
    aux = (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [0, 0, 0]
    cfg = Eagle3DraftConfig.from_target_config(
        types.SimpleNamespace(**raw),
        draft_vocab_size=int(raw.get("draft_vocab_size") or raw["vocab_size"]),
        target_hidden_size=int(raw.get("target_hidden_size") or raw["hidden_size"]),
        num_aux_layers=len(aux),
        norm_output=bool(extra.get("norm_output", False)),
        fc_norm=bool(extra.get("fc_norm", False)),
    )
    return cfg, raw


def _canonical(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0.") :]
    return name


def load_eagle3(
    path: str | Path,
    embed_weight: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Eagle3DraftModel:
    """An `Eagle3DraftModel` from an exported directory, with the saved weights and vocab map.

    The token embedding comes from the file when it has one, else from `embed_weight` (the target's
    [V,H] embedding), which is then required. `dtype` None keeps the saved floating dtype.
    """
    path = Path(path).expanduser()
    cfg, _ = read_eagle3_config(path)
    tensors = {_canonical(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    model = Eagle3DraftModel(cfg)
    if "embed_tokens.weight" not in tensors:
        if embed_weight is None:
            raise ValueError(
                f"{path} holds no embed_tokens.weight; pass the target's embedding (embed_weight=[V,H])"
            )
        tensors["embed_tokens.weight"] = embed_weight.detach().to("cpu", torch.float32)
    if "t2d" not in tensors:  # vLLM-style exports may leave it out: rebuild from d2t
        ids = torch.arange(cfg.draft_vocab_size) + tensors["d2t"].long()
        tensors["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        tensors["t2d"][ids] = True
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the config (missing {missing}, unexpected {unexpected})"
        )
    model = model.to(device=device, dtype=dtype or tensors["fc.weight"].dtype)
    # RoPE frequencies stay fp32 whatever the weights' dtype
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(model.inv_freq.device)
    model.embed_tokens.weight.requires_grad_(False)
    return model


def draft_architectures() -> dict[str, str]:
    """config.json `architectures` entry -> algorithm (SGLang / vLLM / AutoModel / DeepSpec / SpecForge names),
    from the trainer's algorithm registry; every draft class of the DSpark registry (`DSPARK_DRAFTS`) is a
    DSpark draft."""
    from .algorithms import ALGORITHMS
    from .algorithms.dspark import DSPARK_DRAFTS

    known = {arch: name for name, cls in ALGORITHMS.items() for arch in cls.architectures}
    return {**known, **dict.fromkeys(DSPARK_DRAFTS.values(), "dspark")}


def draft_algorithm(path: str | Path) -> str:
    """eagle3, dflash or dspark, from an exported draft's config.json: each algorithm names its export
    architectures (`DraftAlgorithm.architectures`, `draft_architectures`); SpecForge's DSpark writes a DFlash
    config with `dflash_config.projector_type: "dspark"`."""

    file = Path(path).expanduser() / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: no config.json (expected an exported draft directory)")
    raw = json.loads(file.read_text())
    known = draft_architectures()
    archs = raw.get("architectures") or []
    found = {known[a] for a in archs if a in known}
    if len(found) != 1:
        raise ValueError(
            f"{file}: architectures {archs} name no single known draft; expected one of {sorted(known)}"
        )
    algorithm = found.pop()
    if algorithm == "dflash" and (raw.get("dflash_config") or {}).get("projector_type") == "dspark":
        return "dspark"
    return algorithm


@dataclass
class ExportedDraft:
    """A loaded export: its algorithm, the draft module, and the target layer ids it reads."""

    algorithm: str
    draft: torch.nn.Module
    layer_ids: list[int]


def load_draft(
    path: str | Path, target, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> ExportedDraft:
    """Load an export of any registered algorithm (EAGLE-3, DFlash, DSpark) for `target` (the HF model:
    EAGLE-3 and DFlash borrow its embedding, DFlash its lm_head). `dtype` None keeps the saved dtype."""
    from .algorithms import ALGORITHMS

    algorithm = draft_algorithm(path)
    draft, layer_ids = ALGORITHMS[algorithm].load_export(path, target, device=device, dtype=dtype)
    return ExportedDraft(algorithm, draft, layer_ids)
