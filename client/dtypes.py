"""Dtype names, one table for the wire, the encodings, the loaders and the command lines.

`DTYPES` is what may go on the wire (torch's names without "torch."); `dtype_name` / `torch_dtype` turn
any torch dtype into its name and back; `wire_dtype_name` / `wire_dtype` do the same for the wire's
table only. `float_dtype` reads a model-dtype spec: None / "auto" (keep the checkpoint's), a torch
floating dtype, its name, or a short alias (`DTYPE_ALIASES`: bf16, fp16, half, fp32); a command line
accepts "auto" or one of `MODEL_DTYPE_NAMES`.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgument

__all__ = [
    "DTYPES",
    "DTYPE_ALIASES",
    "dtype_name",
    "torch_dtype",
    "wire_dtype_name",
    "wire_dtype",
    "float_dtype",
    "MODEL_DTYPE_NAMES",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_WIRE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
}


# the model dtypes a command line accepts (besides "auto")
MODEL_DTYPE_NAMES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of any dtype without "torch." ("bfloat16")."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str, what: str = "encoded tensor info") -> torch.dtype:
    """The torch dtype named `name` (any torch dtype); InvalidArgument naming `what` when there is none."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgument(f"{what} names dtype {name!r}, which is not a torch dtype")
    return dtype


def wire_dtype(name: str, what: str = "tensor") -> torch.dtype:
    """The torch dtype for a wire dtype name; InvalidArgument naming `what` when unknown."""
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"{what}: dtype {name!r} is not supported; expected one of {sorted(DTYPES)}"
        ) from None


def wire_dtype_name(dtype: torch.dtype, what: str = "tensor") -> str:
    """The wire name of a torch dtype (torch's name without "torch.")."""
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise InvalidArgument(
            f"{what}: dtype {dtype} cannot go on the wire; expected one of {sorted(DTYPES)}"
        ) from None


def float_dtype(spec: torch.dtype | str | None) -> torch.dtype | str:
    """A torch floating dtype, or "auto" (the checkpoint's own dtype) for None / "auto"; InvalidArgument
    for anything else."""
    if spec is None or spec == "auto":
        return "auto"
    if isinstance(spec, torch.dtype):
        resolved = spec
    elif isinstance(spec, str):
        name = spec.removeprefix("torch.")
        resolved = DTYPE_ALIASES.get(name, getattr(torch, name, None))
    else:
        resolved = None
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidArgument(
            f"dtype={spec!r} is not a floating-point torch dtype; expected None or 'auto' (the checkpoint's "
            f"dtype), a torch.dtype, or a name such as 'bfloat16', 'float16', 'float32'"
        )
    return resolved
