"""NeMo AutoModel's "NMET" tensor blob (docs/architecture.md, NeMo port), written from the format description.

Little-endian, self-delimiting, no compression, no checksum:

    u32 magic 0x4E4D4554
    per entry, until the end of the body:
      u32 key length, key (UTF-8), u8 flags (bit 0: the value is None and nothing more follows)
      otherwise: u8 dtype code, u8 ndim, ndim x i64 shape, u64 byte count, the contiguous bytes

The decoder is strict: every way a blob can be malformed (wrong magic, truncated anywhere, unknown
dtype code or flag bits, negative dims, a byte count that disagrees with shape x dtype, a bool byte
that is neither 0 nor 1, duplicate keys, over the caller's limits) is a `BlobError` (InvalidArgument)
or `BlobTooLarge` (ResourceExhausted) whose message names the entry, the offset and what was
expected. Each decoded tensor owns a copy of its bytes (the body can be released).

The encoder gives the blob either as one `bytes` (`encode_blob`) or as zero-copy pieces
(`blob_segments`: small headers plus memoryviews of the tensors' own CPU memory) for streaming
large replies without building them again in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from draftfeed.client.dtypes import dtype_name
from draftfeed.client.errors import InvalidArgument, ResourceExhausted

__all__ = [
    "MAGIC",
    "DTYPE_CODES",
    "BlobError",
    "BlobTooLarge",
    "BlobLimits",
    "encode_blob",
    "blob_segments",
    "decode_blob",
]

MAGIC = 0x4E4D4554
DTYPE_CODES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float64,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.int32,
    6: torch.int16,
    7: torch.int8,
    8: torch.uint8,
    9: torch.bool,
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
_FLAG_NONE = 0x01

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class BlobError(InvalidArgument):
    """A malformed NMET blob (or a tensor that cannot be written as one)."""


class BlobTooLarge(ResourceExhausted):
    """An NMET blob over the receiver's limits."""


@dataclass(frozen=True)
class BlobLimits:
    """What a receiver accepts; `max_bytes` None = no limit on the body size."""

    max_bytes: int | None = None
    max_entries: int = 64
    max_key_bytes: int = 1024
    max_ndim: int = 16


def _entry_header(key: str, t: torch.Tensor | None) -> bytes:
    kb = key.encode("utf-8")
    if len(kb) > 0xFFFFFFFF:
        raise BlobError(f"key {key[:40]!r}... is {len(kb)} bytes; an NMET key holds at most 2^32-1")
    if t is None:
        return _U32.pack(len(kb)) + kb + _U8.pack(_FLAG_NONE)
    code = _CODE_OF.get(t.dtype)
    if code is None:
        names = ", ".join(dtype_name(d) for d in DTYPE_CODES.values())
        raise BlobError(f"{key!r} has dtype {dtype_name(t.dtype)}, which NMET cannot carry; one of {names}")
    if t.dim() > 255:
        raise BlobError(f"{key!r} has {t.dim()} dims; NMET carries at most 255")
    shape = struct.pack(f"<{t.dim()}q", *t.shape)
    nbytes = t.numel() * t.element_size()
    return (
        _U32.pack(len(kb)) + kb + _U8.pack(0) + _U8.pack(code) + _U8.pack(t.dim()) + shape + _U64.pack(nbytes)
    )


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a memoryview of its own (CPU, contiguous) memory; keeps the tensor alive."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def blob_segments(tensors: Mapping[str, torch.Tensor | None]) -> tuple[int, list[memoryview]]:
    """(total length, pieces) of the blob for `tensors`, in their order; the pieces are the entry
    headers and memoryviews of the tensors' memory (a CPU tensor that is contiguous is not copied)."""
    parts = [memoryview(_U32.pack(MAGIC))]
    for key, t in tensors.items():
        parts.append(memoryview(_entry_header(key, t)))
        if t is not None:
            view = _byte_view(t)
            if len(view):
                parts.append(view)
    return sum(len(p) for p in parts), parts


def encode_blob(tensors: Mapping[str, torch.Tensor | None]) -> bytes:
    """The blob for `tensors` as one `bytes` (None values are written as None entries)."""
    return b"".join(blob_segments(tensors)[1])


class _Reader:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if end > len(self.data):
            raise BlobError(
                f"truncated NMET blob: {what} needs {n} bytes at offset {self.pos}, "
                f"but the blob ends at {len(self.data)} ({len(self.data) - self.pos} left)"
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out


def decode_blob(
    data: bytes | bytearray | memoryview, limits: BlobLimits | None = None
) -> dict[str, torch.Tensor | None]:
    """Parse one blob strictly into {key: CPU tensor or None}, in blob order."""
    limits = limits or BlobLimits()
    mv = memoryview(data).cast("B")
    if limits.max_bytes is not None and len(mv) > limits.max_bytes:
        raise BlobTooLarge(
            f"NMET blob of {len(mv)} bytes is over this server's limit of {limits.max_bytes} bytes"
        )
    r = _Reader(mv)
    magic = _U32.unpack(r.take(4, "the magic header"))[0]
    if magic != MAGIC:
        raise BlobError(
            f"not an NMET blob: magic 0x{magic:08X} (first bytes {bytes(mv[:4])!r}), expected 0x{MAGIC:08X}"
        )
    out: dict[str, torch.Tensor | None] = {}
    while r.pos < len(mv):
        if len(out) >= limits.max_entries:
            raise BlobTooLarge(f"NMET blob holds more than {limits.max_entries} entries")
        start = r.pos
        key_len = _U32.unpack(r.take(4, f"the key length of entry {len(out)}"))[0]
        if key_len > limits.max_key_bytes:
            raise BlobError(
                f"entry {len(out)} at offset {start} declares a {key_len}-byte key; at most {limits.max_key_bytes}"
            )
        try:
            key = bytes(r.take(key_len, f"the key of entry {len(out)}")).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BlobError(f"the key of entry {len(out)} at offset {start} is not UTF-8 ({e})") from None
        if key in out:
            raise BlobError(f"NMET blob holds key {key!r} twice")
        flags = _U8.unpack(r.take(1, f"the flags of {key!r}"))[0]
        if flags & ~_FLAG_NONE:
            raise BlobError(f"{key!r} has flags 0x{flags:02x}; only bit 0 (None) is defined")
        if flags & _FLAG_NONE:
            out[key] = None
            continue
        out[key] = _read_tensor(r, key, limits)
    return out


def _read_tensor(r: _Reader, key: str, limits: BlobLimits) -> torch.Tensor:
    code = _U8.unpack(r.take(1, f"the dtype code of {key!r}"))[0]
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        known = ", ".join(f"{c} {dtype_name(d)}" for c, d in DTYPE_CODES.items())
        raise BlobError(f"{key!r} has unknown dtype code {code}; known codes: {known}")
    ndim = _U8.unpack(r.take(1, f"the ndim of {key!r}"))[0]
    if ndim > limits.max_ndim:
        raise BlobError(f"{key!r} has {ndim} dims; this server accepts at most {limits.max_ndim}")
    shape = struct.unpack(f"<{ndim}q", r.take(8 * ndim, f"the shape of {key!r}"))
    if any(d < 0 for d in shape):
        raise BlobError(f"{key!r} has a negative dim in shape {list(shape)}")
    nbytes = _U64.unpack(r.take(8, f"the byte count of {key!r}"))[0]
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if numel * itemsize != nbytes:
        raise BlobError(
            f"{key!r}: shape {list(shape)} of {dtype_name(dtype)} is {numel * itemsize} bytes, "
            f"but the entry declares {nbytes}"
        )
    if limits.max_bytes is not None and nbytes > limits.max_bytes:
        raise BlobTooLarge(f"{key!r} declares {nbytes} bytes; this server's limit is {limits.max_bytes}")
    raw = r.take(nbytes, f"the {nbytes} data bytes of {key!r}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dtype == torch.bool and bool((flat > 1).any()):
        raise BlobError(f"{key!r} is bool but holds bytes other than 0 and 1")
    return flat.view(dtype).reshape(shape)
