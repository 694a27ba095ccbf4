"""torch.compile of the draft step's pure tensor kernels, behind one switch (`loop.compile`: auto|on|off).

Only pure, gradient-free functions are compiled (the elementwise / reduction bodies of the fused soft
cross-entropy and of the full-vocab objective, which run inside their own autograd Functions), so a compiler
failure can only surface when such a function is called: it is caught there, reported once as a warning, and
that function runs eagerly from then on. `auto` compiles on CUDA only; CPU runs (and the tests) stay eager
unless `on` is asked for. Shapes: the first call compiles for its shapes, a later call with other sizes
recompiles once with dynamic sizes (torch's automatic dynamic shapes), so a step's varying row counts cost
at most two compilations per function.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = [
    "COMPILE_MODES",
    "resolve_compile",
    "set_compile",
    "compile_enabled",
    "compiling_as",
    "Compiled",
    "compiled",
]

COMPILE_MODES = ("auto", "on", "off")

_enabled = [False]


def resolve_compile(mode: str, device: torch.device | str) -> bool:
    """`auto` -> on for a CUDA device, off otherwise; `on` / `off` as said."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "on"


def set_compile(enabled: bool) -> None:
    """Turn the compiled kernels on or off for this process (the trainer sets it from `loop.compile`)."""
    _enabled[0] = bool(enabled)


def compile_enabled() -> bool:
    return _enabled[0]


@contextmanager
def compiling_as(enabled: bool) -> Iterator[None]:
    """The compiled kernels on or off inside the block, the process's setting restored after it."""
    before = _enabled[0]
    set_compile(enabled)
    try:
        yield
    finally:
        set_compile(before)


class Compiled:
    """`fn` compiled on its first call while compiling is on (else `fn` itself); a compile or run failure
    of the compiled version warns once and falls back to `fn` for good."""

    def __init__(self, fn: Callable, **options):
        self.fn = fn
        self.options = {"fullgraph": True, **options}
        self.compiled: Callable | None = None
        self.failed = False
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = fn.__doc__

    def __call__(self, *args):
        if not _enabled[0] or self.failed:
            return self.fn(*args)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, **self.options)
            return self.compiled(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly
            self.failed = True
            warnings.warn(
                f"torch.compile of {self.__name__} failed ({type(err).__name__}: {str(err)[:300]}); "
                "running it eagerly (set loop.compile: off to skip compiling)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)


def compiled(fn: Callable) -> Compiled:
    """Decorator form of `Compiled`."""
    return Compiled(fn)
