"""Tensor encodings: how each tensor of a reply travels, chosen per session and per tensor kind.

An encoding is a pair of pure functions registered by name in `CODECS`: `encode(t, **params) ->
Encoded` runs on the server (on the GPU where it shrinks the device-to-host copy) and `decode(enc,
device=None) -> Tensor` runs on the client. `Encoded.parts` are contiguous tensors the wire moves
as raw bytes; `Encoded.info` is a small msgpack-able dict (encoding name, original dtype and shape,
codec statistics). Names may carry one integer parameter: `topk:64`, `zstd:3`.

Tensor kinds and their encodings (docs/architecture.md, Encodings):
  hidden  aux / target / final hidden states    raw, fp8, bf16, zstd[:LEVEL]
  probs   target_probs [B,S,Vd] fp32             raw, bf16, topk:K, zstd[:LEVEL], latent
  mask    bool masks such as position_mask       raw, bits
  ids     input ids, loss masks, packing ints    raw, narrow

`raw`, `bits`, `narrow` and `zstd` are exact. `fp8` (e4m3fn, one fp32 scale per row), `bf16` and
`topk` are lossy: they refuse NaN/inf unless `allow_nonfinite=True`; `fidelity` measures them.

Encoding has two stages so the server never waits on the device. `Encoding.encode_on_device` runs
only device work: no `.item()`, no data-dependent shapes or dtypes, no copies to the host. What it
must verify (NaN/inf for the lossy codecs, 0/1 values for `bits`, the declared range for `narrow`)
it computes as a `Check`, a few int64 values on the device that travel with the device-to-host
copy and are verified on the host by `finish_encoded`, which also runs a codec's host stage (zstd
compresses; topk fills its retained-mass statistics). `Encoding.encode` does both at once (one
sync on a GPU tensor), for callers that want the tensor encoded now.
A row is the last dim: encode a concatenation of K layers [B,S,K*H] as `t.unflatten(-1, (K, H))`
to get a scale per layer (on SmolLM2-135M's aux layers: 3.2% max error per layer row instead of
4.8%, since one layer's 2.5e4 massive activation otherwise sets the scale of the others).
`zstd` compresses the byte planes of each element on the CPU (1.3-1.6x at 0.3-0.5 GB/s per core,
slower than the links it relieves): offered, never a default, and only where `zstandard` is
installed. `latent` is a supervision mode, not a codec: the server ships the shifted final-norm
hidden state (with a `hidden` encoding) and the bit-packed `position_mask`, and the client
rebuilds `target_probs` with `latent_target_probs`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .dtypes import dtype_name, torch_dtype
from .errors import InvalidArgument
from .fidelity import fidelity
from .supervision import draft_probs

__all__ = [
    "KINDS",
    "CODECS",
    "Codec",
    "Check",
    "Encoded",
    "Encoding",
    "get_encoding",
    "supported_encodings",
    "encode",
    "finish_encoded",
    "check_errors",
    "decode",
    "encoded_nbytes",
    "pack_encoded",
    "unpack_encoded",
    "latent_target_probs",
    "fidelity",
    "ENCODING_PRESETS",
    "parse_encodings",
    "session_encodings",
]

KINDS = ("hidden", "probs", "mask", "ids")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class Check:
    """A condition on an encoded tensor computed on its device without a sync: `values` is a small
    int64 vector that travels with the device-to-host copy; `verify(host_values)` returns an error
    message, or None when the tensor passes."""

    values: torch.Tensor
    verify: Callable[[list[int]], str | None]


@dataclass
class Encoded:
    """One encoded tensor: the contiguous `parts` the wire moves, and msgpack-able `info`.

    Straight from `encode_on_device` it may still carry `checks` to verify and a pending host stage
    (`host_stage`); `finish_encoded` does both. Neither travels on the wire."""

    parts: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    host_stage: bool = False


def _base_info(t: torch.Tensor, name: str) -> dict:
    return {"encoding": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}


def _rows(shape: list[int]) -> int:
    """Number of rows when the last dim is the row (a 0-d tensor is one row of one)."""
    return math.prod(shape[:-1]) if shape else 1


def _smallest_int_dtype(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int64


# ---- raw: the tensor itself (every kind, exact) ----


def _encode_raw(t: torch.Tensor) -> Encoded:
    return Encoded({"data": t.contiguous()}, _base_info(t, "raw"))


def _decode_raw(enc: Encoded, device=None) -> torch.Tensor:
    return enc.parts["data"].to(device).reshape(enc.info["shape"])


# ---- bits: masks bit-packed into uint8, LSB first, over the flattened tensor (exact) ----

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    """[1, 2, 4, ..., 128] uint8 on `device`, made there (a `torch.tensor([...], device=cuda)` is a
    synchronous copy from the host)."""
    weights = _BIT_WEIGHTS.get(device)
    if weights is None:
        weights = _BIT_WEIGHTS[device] = torch.bitwise_left_shift(
            torch.ones(8, dtype=torch.uint8, device=device), torch.arange(8, dtype=torch.uint8, device=device)
        )
    return weights


def _encode_bits(t: torch.Tensor) -> Encoded:
    flat = t.reshape(-1)
    checks = []
    if t.dtype != torch.bool:
        if flat.numel():  # counted on the device, verified on the host after the copy
            shape, dtype = list(t.shape), dtype_name(t.dtype)
            checks.append(
                Check(
                    ((flat != 0) & (flat != 1)).sum().reshape(1),
                    lambda v: (
                        None
                        if v[0] == 0
                        else f"encoding 'bits' packs masks of 0/1 values; this {dtype} tensor of shape {shape} "
                        f"holds {v[0]} other value(s): use 'raw' for it"
                    ),
                )
            )
        flat = flat != 0
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    packed = (flat.view(-1, 8).to(torch.uint8) * _bit_weights(t.device)).sum(-1, dtype=torch.uint8)
    return Encoded({"bits": packed}, _base_info(t, "bits"), checks)


def _decode_bits(enc: Encoded, device=None) -> torch.Tensor:
    packed = enc.parts["bits"].to(device)
    shape = enc.info["shape"]
    weights = _bit_weights(packed.device)
    bits = (packed.unsqueeze(-1) & weights).ne(0).reshape(-1)[: math.prod(shape)]
    return bits.reshape(shape).to(torch_dtype(enc.info["dtype"]))


# ---- narrow: integers in the smallest integer dtype that holds their declared range (exact) ----


def _narrow_plan(lo: int, hi: int) -> tuple[torch.dtype, int | None]:
    """(wire dtype, base) for values in [lo, hi]: a plain cast when they fit a dtype, else `x - lo + min`
    when their span fits (ids of a 49k vocab in int16), else int64."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        bounds = torch.iinfo(dtype)
        if bounds.min <= lo and hi <= bounds.max:
            return dtype, None
        if hi - lo <= bounds.max - bounds.min:
            return dtype, lo
    return torch.int64, None


def _encode_narrow(t: torch.Tensor, value_range: tuple[int, int] | None = None) -> Encoded:
    """Integers cast to the smallest dtype that holds `value_range` = (lo, hi), known without looking
    at the data (ids of a V-token vocab: (0, V - 1); masks: (0, 1)), so nothing waits on the device.
    A value outside the declared range fails a `Check` (never a silent wrap). Without a range the
    data's own min/max choose it: one device sync, for callers that encode eagerly."""
    info = _base_info(t, "narrow")
    info["base"] = None
    if t.dtype == torch.bool or t.numel() == 0:
        return Encoded(
            {"data": t.to(torch.bool if t.dtype == torch.bool else torch.uint8).contiguous()}, info
        )
    checks = []
    if value_range is None:
        lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one device sync (eager callers only)
    else:
        lo, hi = (int(v) for v in value_range)
        if lo > hi:
            raise InvalidArgument(f"encoding 'narrow': empty value range [{lo}, {hi}]")
        shape = list(t.shape)
        checks.append(
            Check(
                torch.stack(torch.aminmax(t)).to(torch.int64),
                lambda v: (
                    None
                    if lo <= v[0] and v[1] <= hi
                    else f"encoding 'narrow': this tensor of shape {shape} holds values in [{v[0]}, {v[1]}], "
                    f"outside its declared range [{lo}, {hi}]"
                ),
            )
        )
    dtype, base = _narrow_plan(lo, hi)
    if base is None:
        data = t.to(dtype)
    else:
        info["base"] = base
        data = (t.long() - base).add_(torch.iinfo(dtype).min).to(dtype)  # x - lo is in [0, span]: no overflow
    return Encoded({"data": data.contiguous()}, info, checks)


def _decode_narrow(enc: Encoded, device=None) -> torch.Tensor:
    data = enc.parts["data"].to(device)
    if enc.info.get("base") is not None:
        data = (data.long() - torch.iinfo(data.dtype).min).add_(enc.info["base"])
    return data.to(torch_dtype(enc.info["dtype"])).reshape(enc.info["shape"])


# ---- fp8: float8 e4m3fn with one fp32 scale per row (amax / 448) ----


def _encode_fp8(t: torch.Tensor) -> Encoded:
    shape = list(t.shape)
    rows = _rows(shape)
    width = shape[-1] if shape else 1
    x = t.reshape(rows, width)
    if x.numel() == 0:
        scale = torch.ones(rows, dtype=torch.float32, device=t.device)
        q = torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=t.device)
    else:  # inf/NaN (when allowed) do not set the scale; inf then saturates, NaN stays NaN
        amax = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).amax(-1).float()
        scale = amax * (1.0 / FP8_MAX)  # a multiply rounds the same on every device; CUDA's `/ 448` does not
        scale = torch.where(scale > 0, scale, 1.0)  # all-zero rows (and fp32 underflow) get scale 1
        q = torch.div(x, scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # fp32 math
    return Encoded({"data": q.reshape(shape).contiguous(), "scale": scale}, _base_info(t, "fp8"))


def _decode_fp8(enc: Encoded, device=None) -> torch.Tensor:
    shape = enc.info["shape"]
    q = enc.parts["data"].to(device)
    scale = enc.parts["scale"].to(q.device)
    rows = _rows(shape)
    x = q.reshape(rows, shape[-1] if shape else 1).float() * scale.unsqueeze(-1)
    return x.reshape(shape).to(torch_dtype(enc.info["dtype"]))


# ---- bf16: a lossy cast (relative error at most 2**-8 per value) ----


def _encode_bf16(t: torch.Tensor) -> Encoded:
    return Encoded({"data": t.to(torch.bfloat16).contiguous()}, _base_info(t, "bf16"))


def _decode_bf16(enc: Encoded, device=None) -> torch.Tensor:
    data = enc.parts["data"].to(device)
    return data.to(torch_dtype(enc.info["dtype"])).reshape(enc.info["shape"])


# ---- topk:K: the K largest probabilities per row (fp16) and their indices (smallest int dtype) ----


def _encode_topk(t: torch.Tensor, k: int) -> Encoded:
    shape = list(t.shape)
    rows, vocab = _rows(shape), (shape[-1] if shape else 1)
    k = min(k, vocab)
    x = t.reshape(rows, vocab).float()
    values, index = x.topk(k, dim=-1, sorted=True)
    total = x.sum(-1)
    retained = torch.where(total > 0, values.sum(-1) / torch.where(total > 0, total, 1.0), 1.0)
    info = _base_info(t, "topk")
    info["k"] = k
    parts = {
        "index": index.to(_smallest_int_dtype(0, max(vocab - 1, 0))),
        "values": values.to(torch.float16),
        "retained": retained,
    }
    return Encoded(parts, info, host_stage=True)


def _finish_topk(enc: Encoded) -> Encoded:
    """Host stage: the retained-mass statistics of the (copied) `retained` part."""
    retained = enc.parts["retained"]
    if retained.numel():
        enc.info["retained_min"], enc.info["retained_mean"] = torch.stack(
            [retained.min(), retained.mean()]
        ).tolist()
    else:
        enc.info["retained_min"] = enc.info["retained_mean"] = 1.0
    return enc


def _decode_topk(enc: Encoded, device=None) -> torch.Tensor:
    """Scatter the kept values and renormalise each row to sum 1 (rows that kept no mass stay zero)."""
    shape = enc.info["shape"]
    rows, vocab = _rows(shape), (shape[-1] if shape else 1)
    index = enc.parts["index"].to(device)
    values = enc.parts["values"].to(index.device).float()
    out = torch.zeros(rows, vocab, dtype=torch.float32, device=index.device)
    out.scatter_(-1, index.long(), values)
    mass = out.sum(-1, keepdim=True)
    out /= torch.where(mass > 0, mass, 1.0)
    return out.reshape(shape).to(torch_dtype(enc.info["dtype"]))


# ---- zstd[:LEVEL]: lossless, zstandard over the byte planes of each element (CPU only) ----


def _encode_zstd(t: torch.Tensor, level: int = 1) -> Encoded:
    """Device stage: the tensor as is; the host stage (`_finish_zstd`) compresses its copy."""
    info = _base_info(t, f"zstd:{level}")
    info["level"] = level
    return Encoded({"data": t.contiguous()}, info, host_stage=True)


def _finish_zstd(enc: Encoded) -> Encoded:
    """Host stage: zstandard over each byte plane of the elements (CPU; runs where the copy landed)."""
    x = enc.parts["data"].cpu().contiguous().reshape(-1)
    planes = x.view(torch.uint8).reshape(-1, x.element_size())
    compressor = importlib.import_module("zstandard").ZstdCompressor(level=enc.info.pop("level"))
    parts = {}
    for i in range(planes.shape[1]):
        blob = compressor.compress(planes[:, i].contiguous().numpy())
        parts[f"plane{i}"] = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())
    enc.info["planes"] = planes.shape[1]
    return Encoded(parts, enc.info)


def _decode_zstd(enc: Encoded, device=None) -> torch.Tensor:
    dtype, shape = torch_dtype(enc.info["dtype"]), enc.info["shape"]
    n = math.prod(shape)
    decompressor = importlib.import_module("zstandard").ZstdDecompressor()
    planes = []
    for i in range(enc.info["planes"]):
        blob = enc.parts[f"plane{i}"].cpu().contiguous().numpy()
        planes.append(np.frombuffer(decompressor.decompress(memoryview(blob)), dtype=np.uint8))
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    data = torch.from_numpy(np.stack(planes, axis=1)).reshape(-1).view(dtype).reshape(shape)
    return data.to(device)


# ---- registry ----


def _any(dtype: torch.dtype) -> bool:
    return True


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype not in _FP8


def _integer(dtype: torch.dtype) -> bool:
    return dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex)


@dataclass(frozen=True)
class Codec:
    """A registered encoding: its two functions, the kinds and dtypes it takes, its one parameter."""

    encode: Callable[..., Encoded]
    decode: Callable[..., torch.Tensor]
    kinds: tuple[str, ...]
    exact: bool
    accepts: Callable[[torch.dtype], bool]
    dtypes: str  # what `accepts` takes, for error messages
    param: str | None = None  # name of the integer parameter after ':'
    default: int | None = None  # None with a param: the parameter is required
    param_range: tuple[int, int] = (1, 2**31 - 1)
    requires: str | None = None  # a Python package it needs; offered only where it is installed
    finish: Callable[[Encoded], Encoded] | None = None  # host stage, run on the copy (see finish_encoded)
    ranged: bool = False  # takes a declared `value_range`

    def available(self) -> bool:
        return self.requires is None or importlib.util.find_spec(self.requires) is not None

    def spelling(self, name: str) -> str:
        if self.param is None:
            return name
        return (
            f"{name}[:{self.param.upper()}]" if self.default is not None else f"{name}:{self.param.upper()}"
        )


CODECS: dict[str, Codec] = {
    "raw": Codec(_encode_raw, _decode_raw, KINDS, True, _any, "any dtype"),
    "bits": Codec(_encode_bits, _decode_bits, ("mask",), True, _integer, "bool or 0/1 integers"),
    "narrow": Codec(
        _encode_narrow, _decode_narrow, ("ids",), True, _integer, "integers or bool", ranged=True
    ),
    "fp8": Codec(_encode_fp8, _decode_fp8, ("hidden",), False, _floating, "float32/float16/bfloat16"),
    "bf16": Codec(_encode_bf16, _decode_bf16, ("hidden", "probs"), False, _floating, "float32/float16/bfloat16"),
    "topk": Codec(
        _encode_topk, _decode_topk, ("probs",), False, _floating, "float32/float16/bfloat16", "k",
        finish=_finish_topk,
    ),
    "zstd": Codec(
        _encode_zstd, _decode_zstd, ("hidden", "probs"), True, _floating, "float32/float16/bfloat16",
        "level", 1, (1, 22), "zstandard", _finish_zstd,
    ),
}  # fmt: skip
SUPERVISION_MODES = {"latent": ("probs",)}  # negotiated like an encoding, but no per-tensor codec


def supported_encodings() -> dict[str, list[str]]:
    """Per tensor kind, the encoding names a session may ask for (`topk:K` takes an integer K)."""
    out = {
        kind: [c.spelling(n) for n, c in CODECS.items() if kind in c.kinds and c.available()]
        for kind in KINDS
    }
    for name, kinds in SUPERVISION_MODES.items():
        for kind in kinds:
            out[kind].append(name)
    return out


@dataclass(frozen=True)
class Encoding:
    """A validated encoding for one tensor kind, as a session negotiated it (see `get_encoding`)."""

    name: str  # as given, canonical: "topk:64", "zstd:1", "fp8"
    kind: str
    base: str
    params: dict = field(default_factory=dict)

    @property
    def latent(self) -> bool:
        return self.base in SUPERVISION_MODES

    @property
    def exact(self) -> bool:
        return not self.latent and CODECS[self.base].exact

    def encode(
        self,
        t: torch.Tensor,
        *,
        allow_nonfinite: bool = False,
        value_range: tuple[int, int] | None = None,
    ) -> Encoded:
        """`t` encoded now: `encode_on_device` then `finish_encoded` (one sync for a GPU tensor)."""
        return finish_encoded(
            self.encode_on_device(t, allow_nonfinite=allow_nonfinite, value_range=value_range)
        )

    def encode_on_device(
        self,
        t: torch.Tensor,
        *,
        allow_nonfinite: bool = False,
        value_range: tuple[int, int] | None = None,
    ) -> Encoded:
        """The device stage: parts on `t`'s device, checks not yet verified, no host synchronisation
        (for `narrow`, pass `value_range`). Hand the copied result to `finish_encoded`."""
        if self.latent:
            raise InvalidArgument(
                f"'{self.name}' is a supervision mode, not a tensor codec: ship the final-norm hidden state "
                "with a 'hidden' encoding and the bit-packed position_mask, and rebuild target_probs with "
                "latent_target_probs on the client"
            )
        codec = CODECS[self.base]
        if not codec.accepts(t.dtype):
            raise InvalidArgument(
                f"encoding '{self.name}' for tensor kind '{self.kind}' takes {codec.dtypes}; "
                f"got a {dtype_name(t.dtype)} tensor of shape {list(t.shape)}"
            )
        t = t.detach()
        checks = []
        if not codec.exact and not allow_nonfinite and t.is_floating_point() and t.numel():
            checks.append(self._finite_check(t))
        params = dict(self.params)
        if codec.ranged:
            params["value_range"] = value_range
        enc = codec.encode(t, **params)
        enc.info["encoding"] = self.name
        enc.checks = checks + enc.checks
        enc.host_stage = codec.finish is not None
        return enc

    def _finite_check(self, t: torch.Tensor) -> Check:
        """The count of finite values, on the device; the host refuses the tensor if any is not."""
        name, kind, shape, numel = self.name, self.kind, list(t.shape), t.numel()

        def verify(v: list[int]) -> str | None:
            if v[0] == numel:
                return None
            return (
                f"encoding '{name}' refuses non-finite values: this '{kind}' tensor of shape {shape} holds "
                f"{numel - v[0]} NaN/inf value(s) out of {numel}; pass allow_nonfinite=True to encode them "
                "anyway, or use 'raw', which passes them unchanged"
            )

        return Check(t.isfinite().sum().reshape(1), verify)

    def decode(self, enc: Encoded, device: torch.device | str | None = None) -> torch.Tensor:
        return decode(enc, device)


def _parse(name: str) -> tuple[str, dict, str]:
    """(base, params, canonical name) for a name whose base is registered; raises ValueError else."""
    base, sep, arg = str(name).strip().partition(":")
    codec = CODECS.get(base)
    if codec is None:
        if base in SUPERVISION_MODES and not sep:
            return base, {}, base
        raise ValueError(f"unknown encoding {name!r}")
    if codec.param is None:
        if sep:
            raise ValueError(f"encoding '{base}' takes no parameter, got {name!r}")
        return base, {}, base
    if not sep:
        if codec.default is None:
            raise ValueError(f"encoding '{base}' needs its {codec.param.upper()}, e.g. '{base}:64'")
        arg = str(codec.default)
    lo, hi = codec.param_range
    try:
        value = int(arg)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise ValueError(f"encoding {name!r}: {codec.param.upper()} must be an integer in [{lo}, {hi}]")
    return base, {codec.param: value}, f"{base}:{value}"


def get_encoding(name: str, kind: str) -> Encoding:
    """The encoding `name` (e.g. 'fp8', 'topk:64') for tensor kind `kind`, or InvalidArgument."""
    return _get_encoding(str(name), kind)


@functools.lru_cache(maxsize=256)  # called per field of every reply; an error is not cached
def _get_encoding(name: str, kind: str) -> Encoding:
    if kind not in KINDS:
        raise InvalidArgument(f"unknown tensor kind {kind!r}; expected one of {', '.join(KINDS)}")

    def supported() -> str:
        return ", ".join(supported_encodings()[kind])

    try:
        base, params, canonical = _parse(name)
    except ValueError as e:
        raise InvalidArgument(f"{e}; supported for tensor kind '{kind}': {supported()}") from None
    kinds = SUPERVISION_MODES[base] if base in SUPERVISION_MODES else CODECS[base].kinds
    if kind not in kinds:
        raise InvalidArgument(
            f"encoding {name!r} is not supported for tensor kind '{kind}'; supported: {supported()}"
        )
    if base in CODECS and not CODECS[base].available():
        raise InvalidArgument(
            f"encoding {name!r} needs the Python package '{CODECS[base].requires}', which is not installed "
            f"here; supported for tensor kind '{kind}': {supported()}"
        )
    return Encoding(canonical, kind, base, params)


def encode(
    t: torch.Tensor,
    name: str,
    kind: str,
    *,
    allow_nonfinite: bool = False,
    value_range: tuple[int, int] | None = None,
) -> Encoded:
    """Encode `t` (a tensor of kind `kind`) with encoding `name`, checks verified, host stage done."""
    return get_encoding(name, kind).encode(t, allow_nonfinite=allow_nonfinite, value_range=value_range)


def check_errors(checks: list[Check], values: list[int]) -> list[str]:
    """The error messages of the `checks` that fail, given all their values (host ints, in order)."""
    errors, at = [], 0
    for check in checks:
        n = check.values.numel()
        message = check.verify(values[at : at + n])
        at += n
        if message is not None:
            errors.append(message)
    return errors


def finish_encoded(enc: Encoded, check_values: list[int] | None = None) -> Encoded:
    """The host side of an encode: verify `enc.checks` (their values as copied to the host, in
    order; read from the tensors when not given) and run the codec's host stage. InvalidArgument
    when a check fails. Returns the wire-ready `Encoded`."""
    if check_values is None:
        check_values = [v for c in enc.checks for v in c.values.tolist()]
    errors = check_errors(enc.checks, check_values)
    if errors:
        raise InvalidArgument("; ".join(errors))
    enc.checks = []
    if enc.host_stage:
        enc.host_stage = False
        base = _parse(enc.info["encoding"])[0]
        enc = CODECS[base].finish(enc)
    return enc


def decode(enc: Encoded, device: torch.device | str | None = None) -> torch.Tensor:
    """The tensor `enc` encodes, on `device` (default: where its parts are), in its original dtype."""
    try:
        base, params, _ = _parse(enc.info["encoding"])
    except (KeyError, ValueError) as e:
        raise InvalidArgument(f"cannot decode: encoded info names no known encoding ({e})") from None
    if base in SUPERVISION_MODES:
        raise InvalidArgument(f"cannot decode {base!r}: it is a supervision mode; see latent_target_probs")
    missing = {"dtype", "shape"} - enc.info.keys()
    if missing:
        raise InvalidArgument(f"cannot decode {enc.info['encoding']!r}: its info lacks {sorted(missing)}")
    return CODECS[base].decode(enc, device)


def encoded_nbytes(enc: Encoded) -> int:
    """Bytes the parts occupy on the wire (info, a few dozen bytes of msgpack, not counted)."""
    return sum(p.numel() * p.element_size() for p in enc.parts.values())


def pack_encoded(fields: dict[str, Encoded]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten named encoded tensors into wire tensors named `field.part` and one msgpack-able meta."""
    tensors = {f"{name}.{part}": t for name, enc in fields.items() for part, t in enc.parts.items()}
    meta = {name: {"info": enc.info, "parts": list(enc.parts)} for name, enc in fields.items()}
    return tensors, meta


def unpack_encoded(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Encoded]:
    """Inverse of `pack_encoded`."""
    try:
        return {
            name: Encoded({p: tensors[f"{name}.{p}"] for p in m["parts"]}, m["info"])
            for name, m in meta.items()
        }
    except KeyError as e:
        raise InvalidArgument(f"encoded reply is missing tensor {e.args[0]!r} that its meta lists") from None


# ---- latent supervision (EAGLE-3): target_probs rebuilt from the final-norm hidden state ----


def latent_target_probs(
    h_final: torch.Tensor,
    lm_head_rows: torch.Tensor,
    chunk_rows: int = 1024,
    final_logit_softcapping: float | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`softmax(h @ lm_head_rows.T)` in fp32, [..., H] -> [..., Vd], computed `chunk_rows` rows at a time.

    `lm_head_rows` = `lm_head.weight[selected_token_ids]` [Vd,H]. To match the server's reference
    `softmax(lm_head(h)[..., ids].float(), -1)`, the logits are computed as the model computes them:
    the matmul in the model dtype (`matmul_dtype`, default `lm_head_rows.dtype`), then the optional
    softcapping `tanh(x / c) * c` in that dtype (as HF's Gemma-style heads do), then `.float()` and
    the softmax in fp32. Upcasting a bf16 matmul to fp32 instead would be more precise but further
    from the server's probabilities. A zero row of `h` (the shifted tail) gives the uniform
    distribution, as the server's zero tail of logits does. Runs on the inputs' device.
    """
    if h_final.shape[-1] != lm_head_rows.shape[-1] or lm_head_rows.dim() != 2:
        raise InvalidArgument(
            f"latent_target_probs: h_final [..., H] has H={h_final.shape[-1]} but lm_head_rows has shape "
            f"{list(lm_head_rows.shape)}; expected [Vd, {h_final.shape[-1]}]"
        )
    if chunk_rows < 1:
        raise InvalidArgument(f"latent_target_probs: chunk_rows must be >= 1, got {chunk_rows}")
    dtype = matmul_dtype or lm_head_rows.dtype
    weight = lm_head_rows.to(device=h_final.device, dtype=dtype)
    rows = h_final.reshape(-1, h_final.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32, device=h_final.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = torch.nn.functional.linear(rows[start : start + chunk_rows].to(dtype), weight)
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        draft_probs(logits, out=out[start : start + chunk_rows])  # written in place: no copy of [rows, Vd]
    return out.reshape(*h_final.shape[:-1], weight.shape[0])


# ---- what a session asks for: presets and per-kind overrides (`--encodings`) ----

ENCODING_PRESETS = ("exact", "compact", "raw")
_ALL_KINDS = ("hidden", "final", "probs", "mask", "ids")  # the session kinds (client/payload.py)
_CODEC_KINDS = {"final": "hidden"}  # the latent final state takes the hidden-state codecs


def parse_encodings(spec: str | dict | None) -> tuple[str, dict[str, str]]:
    """(preset, per-kind overrides) of an `--encodings` value, validated (InvalidArgument otherwise).

    `spec` is None (= "exact"), a preset name, `kind=name` items (`hidden=fp8,probs=latent`), a preset
    followed by items (`compact,probs=raw`), or a dict {kind: name} (overrides on "exact"). Presets:
    `exact` (the default: every tensor bit-exact; an EAGLE-3 session gets its `target_probs` as
    `latent`, rebuilt on the trainer from the final-norm state), `compact` (exact + fp8 hidden states,
    lossy), `raw` (every tensor as the server holds it; fp32 draft-vocab probabilities).
    """
    if spec is None:
        return "exact", {}
    if isinstance(spec, dict):
        items = [(str(k).strip(), str(v).strip()) for k, v in spec.items()]
        preset = "exact"
    else:
        preset, items = "exact", []
        for i, part in enumerate(p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            if "=" not in part:
                if i != 0 or part not in ENCODING_PRESETS:
                    raise InvalidArgument(
                        f"encodings {spec!r}: {part!r} is neither a preset ({', '.join(ENCODING_PRESETS)}, "
                        "first only) nor KIND=NAME; e.g. 'compact' or 'hidden=fp8,probs=latent'"
                    )
                preset = part
                continue
            kind, _, name = part.partition("=")
            items.append((kind.strip(), name.strip()))
    overrides = {}
    for kind, name in items:
        if kind not in _ALL_KINDS:
            raise InvalidArgument(
                f"encodings: unknown tensor kind {kind!r}; expected one of {', '.join(_ALL_KINDS)}"
            )
        overrides[kind] = get_encoding(name, _CODEC_KINDS.get(kind, kind)).name
    return preset, overrides


def _offered_bases(offered) -> dict[str, set[str]]:
    """kind -> encoding base names, from the model info's `kind/name` entries (`probs/topk:K`, `hidden/zstd[:LEVEL]`)."""
    out: dict[str, set[str]] = {}
    for entry in offered:
        kind, _, name = str(entry).partition("/")
        out.setdefault(kind, set()).add(name.split(":")[0].split("[")[0])
    return out


def session_encodings(
    spec: str | dict | None, algorithm: str, offered, server: str = "the server"
) -> dict[str, str]:
    """The per-kind encodings a session of `algorithm` asks for, given what the server `offered`
    (its model info's `kind/name` list): the preset's choices where the server offers them (so the
    default never fails against an older server; without `probs/latent` an EAGLE-3 session takes raw
    probabilities), then the overrides, each of which the server must offer (InvalidArgument naming
    what it offers). Kinds left out are raw."""
    from .algorithms import ALGORITHMS  # the registry imports the batches; the codecs alone need not

    latent_ok = algorithm in ALGORITHMS and ALGORITHMS[algorithm].latent_probs
    preset, overrides = parse_encodings(spec)
    bases = _offered_bases(offered)
    out: dict[str, str] = {}
    if preset != "raw" and latent_ok and "latent" in bases.get("probs", ()):
        out["probs"] = "latent"  # exact: the trainer rebuilds softmax(h @ lm_head[ids].T)
    if preset == "compact":
        overrides = {"hidden": "fp8", **overrides}
    for kind, name in overrides.items():
        base = name.split(":")[0]
        if name != "raw" and base not in bases.get(kind, ()):
            have = ", ".join(sorted(bases.get(kind, ()))) or "nothing"
            raise InvalidArgument(
                f"{server} does not offer encoding {name!r} for tensor kind {kind!r} (it offers {have}); "
                "choose one it offers, or --encodings exact"
            )
        if kind == "probs" and base == "latent" and not latent_ok:
            raise InvalidArgument(
                f"encodings: probs=latent is for EAGLE-3 sessions only, not {algorithm}; drop it"
            )
        out[kind] = name
    return out
