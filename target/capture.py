"""Find a target's decoder layers and final norm, and capture their outputs in one forward pass.

Capture uses forward hooks on just the modules asked for, removed afterwards even when the forward
raises; it never uses `output_hidden_states=True`, which keeps all N layer outputs alive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from draftfeed.client.errors import InvalidArgument

__all__ = ["TargetLayout", "Captured", "discover", "text_config", "run_target", "capturing"]

# Where decoder-layer lists live, in the order they are tried (docs/architecture.md, layer discovery).
_LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.layers",
    "layers",
    "transformer.h",
)
_BASE_LAYER_ATTRS = ("layers", "h")
_NORM_ATTRS = ("norm", "ln_f", "final_layer_norm")


def text_config(config):
    """The config that describes the decoder (`text_config` when nested)."""
    get = getattr(config, "get_text_config", None)
    sub = get() if get is not None else None
    return sub if sub is not None else getattr(config, "text_config", None) or config


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _as_layer_list(obj) -> list[nn.Module] | None:
    if isinstance(obj, nn.ModuleList):
        return list(obj)
    if isinstance(obj, nn.ModuleDict):
        return [obj[str(i)] for i in range(len(obj))]
    return None


@dataclass
class TargetLayout:
    """Where a target keeps what draftfeed captures."""

    layers: list[nn.Module]
    final_norm: nn.Module
    layers_path: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    final_logit_softcapping: float | None = None


def discover(model: nn.Module) -> TargetLayout:
    """Locate the decoder layers and the final norm that feeds `lm_head`."""
    layers, where, container = None, None, None
    for path in _LAYER_PATHS:
        found = _as_layer_list(_get_path(model, path))
        if found:
            layers, where = found, path
            container = _get_path(model, path.rsplit(".", 1)[0]) if "." in path else model
            break
    if layers is None:
        base = getattr(model, "base_model", None)
        for attr in _BASE_LAYER_ATTRS:
            found = _as_layer_list(getattr(base, attr, None)) if base is not None else None
            if found:
                layers, where, container = found, f"base_model.{attr}", base
                break
    searched = ", ".join(f"model.{p}" for p in _LAYER_PATHS) + ", model.base_model.{layers,h}"
    if layers is None:
        raise InvalidArgument(
            f"cannot find the decoder layers of {type(model).__name__}: searched {searched}; "
            "draftfeed serves HF decoder-only causal LMs"
        )
    norm = None
    for owner in (container, getattr(model, "base_model", None), model):
        for attr in _NORM_ATTRS:
            cand = getattr(owner, attr, None) if owner is not None else None
            if isinstance(cand, nn.Module):
                norm = cand
                break
        if norm is not None:
            break
    if norm is None:
        raise InvalidArgument(
            f"cannot find the final norm of {type(model).__name__} next to its decoder layers ({where}): "
            f"looked for attributes {', '.join(_NORM_ATTRS)}"
        )
    cfg = text_config(model.config)
    num_layers = cfg.num_hidden_layers
    if num_layers != len(layers):
        raise InvalidArgument(
            f"{type(model).__name__}: config says {num_layers} decoder layers but {where} holds {len(layers)}"
        )
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    vocab = model.get_output_embeddings().weight.shape[0]
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return TargetLayout(layers, norm, where, num_layers, hidden, vocab, softcap)


@dataclass
class Captured:
    """One forward's captures: decoder-layer outputs by id, the input of layer 0, the final-norm
    output, the full logits and their full-vocab argmax `top1` [B,S] (int64), each only when asked for."""

    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    first_input: torch.Tensor | None = None
    final: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    top1: torch.Tensor | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every captured tensor."""
        yield from self.layers.values()
        yield from (t for t in (self.first_input, self.final, self.logits, self.top1) if t is not None)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Captured:
        """The same captures with `fn` applied to each tensor (a slice of rows, a copy)."""
        keep = lambda t: None if t is None else fn(t)  # noqa: E731
        return Captured(
            {i: fn(t) for i, t in self.layers.items()},
            keep(self.first_input),
            keep(self.final),
            keep(self.logits),
            keep(self.top1),
        )


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


@contextmanager
def _hooks(
    layout: TargetLayout, layer_ids: Iterable[int], want_first_input: bool, want_final: bool, out: Captured
):
    # Hooks live on the shared modules; a forward of the same model in another thread (an
    # in-process backend next to a server) must not write into this capture.
    me = threading.get_ident()
    handles = []
    try:
        for i in sorted(set(layer_ids)):

            def keep(_mod, _args, output, i=i):
                if threading.get_ident() == me:
                    out.layers[i] = _first(output)

            handles.append(layout.layers[i].register_forward_hook(keep))
        if want_first_input:

            def keep_input(_mod, args, kwargs):
                if threading.get_ident() == me:
                    out.first_input = args[0] if args else kwargs["hidden_states"]

            handles.append(layout.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True))
        if want_final:

            def keep_final(_mod, _args, output):
                if threading.get_ident() == me:
                    out.final = _first(output)

            handles.append(layout.final_norm.register_forward_hook(keep_final))
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capturing(
    layout: TargetLayout,
    *,
    layer_ids: Iterable[int] = (),
    want_first_input: bool = False,
    want_final: bool = False,
):
    """Capture what is asked for during the forwards of the model that this thread runs inside the block
    (e.g. a KV-cached decode step); the hooks are removed on exit, even on error. Yields the `Captured`."""
    with _hooks(layout, layer_ids, want_first_input, want_final, Captured()) as out:
        yield out


@torch.inference_mode()
def run_target(
    model: nn.Module,
    layout: TargetLayout,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | dict | None,
    position_ids: torch.Tensor | None = None,
    *,
    layer_ids: Iterable[int] = (),
    want_first_input: bool = False,
    want_final: bool = False,
    want_logits: bool = False,
    want_top1: bool = False,
) -> Captured:
    """One forward of the target capturing exactly what is asked for.

    `attention_mask` is the [B,S] padding mask, or a prepared 4-D block-causal mask (or a dict of
    them by layer type) for packed rows. Without `want_logits` / `want_top1` the base model runs alone, so the
    [B,S,V] logits are never computed; with `want_top1` alone they are reduced to their argmax and dropped
    (a CUDA graph of the forward then keeps [B,S] ids, not [B,S,V] logits, as its output).
    """
    out = Captured()
    with _hooks(layout, layer_ids, want_first_input, want_final, out):
        kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        if want_logits or want_top1:
            logits = model(**kwargs).logits
            out.logits = logits if want_logits else None
            out.top1 = logits.argmax(dim=-1) if want_top1 else None
        else:
            model.base_model(**kwargs)
    return out
