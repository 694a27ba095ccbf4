"""Unpadded batches without reading the mask on the device.

The scheduler knows on the host, from the pinned request, whether a batch has padding. HF's sdpa
mask builder finds the same out by reading the [B,S] mask on the device (`fast_all(padding_mask)`:
one host sync per forward), and inside a CUDA graph capture it cannot read it at all, so it builds
a [B,1,S,S] mask instead of letting sdpa run its is_causal kernels: a different, slower attention.

Inside `no_padding()`, a plain causal mask request from a forward on this thread gets `None`, which
is exactly what HF's own function returns after reading an all-ones mask (sdpa then runs
is_causal). Every other request (another thread, a sliding-window, chunked or packed mask function,
a 4-D mask, an offset from a KV cache) goes to HF's function unchanged.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

__all__ = ["no_padding"]

_state = threading.local()
_install_lock = threading.Lock()
_hf_sdpa_mask = None  # HF's registered sdpa mask function, wrapped once
_causal = None  # HF's plain causal mask function: the only one answered here


def _sdpa_mask(*args, **kwargs):
    if (
        getattr(_state, "depth", 0)
        and not args  # HF passes every argument by name; anything else is not the call we know
        and kwargs.get("mask_function") is _causal
        and kwargs.get("allow_is_causal_skip", True)
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and kwargs.get("q_offset", 0) == 0
        and kwargs.get("kv_offset", 0) == 0
        and kwargs.get("local_size") is None
    ):
        _state.skipped += 1
        return None
    return _hf_sdpa_mask(*args, **kwargs)


def _install() -> None:
    global _hf_sdpa_mask, _causal
    with _install_lock:
        if _hf_sdpa_mask is not None:
            return
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

        _causal = causal_mask_function
        _hf_sdpa_mask = AttentionMaskInterface._global_mapping["sdpa"]
        AttentionMaskInterface.register("sdpa", _sdpa_mask)


@contextmanager
def no_padding():
    """Forwards this thread runs inside the block have no padding (the caller checked on the host).
    Yields a callable giving how many mask builds took the is_causal path so far in the block."""
    _install()
    if not getattr(_state, "depth", 0):
        _state.skipped = 0
    _state.depth = getattr(_state, "depth", 0) + 1
    start = _state.skipped
    try:
        yield lambda: _state.skipped - start
    finally:
        _state.depth -= 1
