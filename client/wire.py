"""Tensors on the wire, shared by the server and the remote clients.

Request side: small tensors travel as `draftfeed.v1.Tensor` messages (`tensor_to_proto` / `tensor_from_proto`).

Reply side (Generate, GenerateStream, StreamWeights): a reply is one header frame (a `ReplyHeader`:
request id, tensor headers, total payload bytes, msgpack `meta`) followed by raw payload chunk frames,
the tensors' bytes concatenated in header order and cut every `chunk_bytes`. The chunk byte counts
add up to `total_bytes`, and the frame after the last chunk is the next reply's header. Each frame is
a valid serialized `ReplyFrame` (tag byte 0x0A = header, 0x12 = chunk, then the varint length), but
both ends skip protobuf for it: `encode_reply` writes frames with one copy per chunk, and
`ReplyAssembler` copies each chunk through a `memoryview` into one buffer per reply, whose slices
become the reply's tensors without a further copy. `add_to_server` and `TargetStub` bind the service
with identity serializers for these frames and protobuf for everything else.

A session with a data plane (client/dataplane.py, server/dataplane.py) gets a reply's payload as one
frame on its TCP socket instead: the gRPC reply is then the header alone, marked
`payload_on_data_plane`, and `ReplyAssembler(data_plane=...)` takes the payload from the data plane
by request id.

Byte order is little-endian (every machine draftfeed runs on).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import grpc
import msgpack
import torch

from draftfeed.client.dtypes import DTYPES
from draftfeed.client.dtypes import wire_dtype as dtype_from_name
from draftfeed.client.dtypes import wire_dtype_name as dtype_name
from draftfeed.client.errors import DraftfeedError, InvalidArgument, error_for_code
from draftfeed.client.pb import draftfeed_pb2 as pb

__all__ = [
    "DTYPES",
    "DEFAULT_CHUNK_BYTES",
    "SERVICE_NAME",
    "REPLY_STREAM_METHODS",
    "dtype_from_name",
    "dtype_name",
    "tensor_bytes",
    "tensor_to_proto",
    "tensor_from_proto",
    "encode_reply",
    "reply_parts",
    "header_frame",
    "chunk_frames",
    "encode_error_reply",
    "Reply",
    "ReplyAssembler",
    "grpc_options",
    "add_to_server",
    "TargetStub",
]

DEFAULT_CHUNK_BYTES = 1 << 20
_ALIGN = 64  # where each tensor of a reply starts inside the client's buffer
_HEADER_TAG = 0x0A  # ReplyFrame.header: field 1, length-delimited
_CHUNK_TAG = 0x12  # ReplyFrame.chunk: field 2, length-delimited


# ------------------------------------------------------------------------------------ request tensors


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of `t`'s elements in C order: zero-copy for a contiguous CPU tensor.

    A non-contiguous tensor is copied once, a device tensor is copied to the host first (the server
    passes host tensors, pinned where it matters). The view keeps the memory alive.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_to_proto(t: torch.Tensor, name: str = "") -> pb.Tensor:
    """`t` as a `Tensor` message (dtype name, shape, a contiguous copy of its bytes)."""
    return pb.Tensor(
        name=name,
        dtype=dtype_name(t.dtype, name or "tensor"),
        shape=list(t.shape),
        data=bytes(tensor_bytes(t)),
    )


def _check_layout(
    what: str, dtype_text: str, shape: Iterable[int], nbytes: int
) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of a described tensor; InvalidArgument when they do not account for `nbytes`."""
    dtype = dtype_from_name(dtype_text, what)
    shape = tuple(shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise InvalidArgument(
            f"{what}: {nbytes} bytes do not fit dtype {dtype_text} and shape {list(shape)}; expected {expected} bytes"
        )
    return dtype, shape


def tensor_from_proto(msg: pb.Tensor, what: str | None = None) -> torch.Tensor:
    """A new contiguous CPU tensor with `msg`'s exact contents.

    InvalidArgument (naming `what`, else the message's name) for an unknown dtype, a negative
    dimension, a byte count that does not match dtype x shape, or bool bytes other than 0/1.
    """
    what = what or msg.name or "tensor"
    dtype, shape = _check_layout(what, msg.dtype, msg.shape, len(msg.data))
    if not msg.data:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)  # bytearray: one copy we own, writable
    if dtype is torch.bool and bool((raw > 1).any()):
        raise InvalidArgument(f"{what}: bool tensor holds bytes other than 0 and 1")
    return raw.view(dtype).view(shape)


# --------------------------------------------------------------------------------------- reply frames


def _frame_prefix(tag: int, length: int) -> bytes:
    out = bytearray([tag])
    while length >= 0x80:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


def _parse_frame(message: bytes) -> tuple[int, int]:
    """(tag, offset where the content starts) of one reply-stream frame, checking its length prefix."""
    if len(message) < 2:
        raise _data_loss(f"reply stream frame of {len(message)} bytes is too short to be a frame")
    tag, length, shift, pos = message[0], 0, 0, 1
    while True:
        if pos >= len(message) or shift > 63:
            raise _data_loss("reply stream frame has a broken length prefix")
        byte = message[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            break
        shift += 7
    if tag not in (_HEADER_TAG, _CHUNK_TAG) or pos + length != len(message):
        raise _data_loss(
            f"reply stream frame (tag {tag:#04x}, {len(message)} bytes) is neither a header nor a chunk frame "
            f"of the length it announces ({length})"
        )
    return tag, pos


def _data_loss(message: str, request_id: int | None = None) -> DraftfeedError:
    err = error_for_code(grpc.StatusCode.DATA_LOSS, message)
    err.request_id = request_id
    return err


def header_frame(header: pb.ReplyHeader) -> bytes:
    """The frame that starts a reply (tag, varint length, the serialized header)."""
    body = header.SerializeToString()
    return _frame_prefix(_HEADER_TAG, len(body)) + body


def reply_parts(
    request_id: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> tuple[pb.ReplyHeader, list[memoryview]]:
    """A reply's header and its tensors' bytes (zero-copy views, in header order).

    The views go either as gRPC chunk frames (`chunk_frames`) or as one data-plane frame; dtypes and
    `meta` (msgpack-able) are checked here. The tensors must not change until the views are sent.
    """
    headers, views = [], []
    for name, t in tensors.items():
        view = tensor_bytes(t)
        headers.append(
            pb.TensorHeader(name=name, dtype=dtype_name(t.dtype, name), shape=t.shape, nbytes=view.nbytes)
        )
        views.append(view)
    header = pb.ReplyHeader(
        request_id=request_id,
        tensors=headers,
        total_bytes=sum(v.nbytes for v in views),
        meta=msgpack.packb(dict(meta), use_bin_type=True) if meta else b"",
    )
    return header, views


def encode_reply(
    request_id: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The frames of one reply: a header frame, then chunk frames of at most `chunk_bytes` payload bytes.

    The tensors' bytes are exposed without a copy (`tensor_bytes`) and each chunk frame is built with
    one copy (`bytes.join`), which gRPC's Python API needs anyway (it sends `bytes`). Dtypes and
    `meta` (msgpack-able) are checked here, at call time; the chunks are made as they are consumed,
    so the tensors must not change until the iterator is exhausted.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    header, views = reply_parts(request_id, tensors, meta)
    return itertools.chain((header_frame(header),), chunk_frames(views, chunk_bytes))


def chunk_frames(views: list[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """The payload `views` (concatenated) as chunk frames of at most `chunk_bytes` bytes each."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    pieces: list[memoryview] = []
    filled = 0
    for view in views:
        pos = 0
        while pos < view.nbytes:
            take = min(chunk_bytes - filled, view.nbytes - pos)
            pieces.append(view[pos : pos + take])
            filled += take
            pos += take
            if filled == chunk_bytes:
                yield b"".join((_frame_prefix(_CHUNK_TAG, filled), *pieces))
                pieces, filled = [], 0
    if filled:
        yield b"".join((_frame_prefix(_CHUNK_TAG, filled), *pieces))


def encode_error_reply(request_id: int, error: DraftfeedError) -> bytes:
    """The single frame answering a request that failed alone (a header with `error`, no payload)."""
    code = error.code.value[0]
    return header_frame(
        pb.ReplyHeader(request_id=request_id, error=pb.ReplyError(code=code, message=str(error)))
    )


# --------------------------------------------------------------------------------------- reassembly


class Reply(NamedTuple):
    """One reassembled reply: the request it answers, its tensors by name, its decoded `meta`."""

    request_id: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


class ReplyAssembler:
    """Turns the frames of a reply stream back into `Reply`s.

    Each reply gets ONE buffer, sized from its header; every chunk is copied into it through a
    memoryview slice assignment, each tensor starting 64-byte aligned, and the tensors are views of
    that buffer (zero-copy, like `torch.frombuffer`).

    reuse_buffers: 0 gives every reply a fresh buffer (safe; a fresh large buffer faults its pages
        in on first write, which costs time). K > 0 reuses a ring of K buffers (grown when a reply is
        larger): a reply's tensors are then overwritten once K more replies have been assembled,
        so the caller must consume or copy them before that.
    pin_memory: allocate page-locked buffers (fast, asynchronous copies to a GPU).
    data_plane: where replies marked `payload_on_data_plane` get their payload: an object with
        `take(request_id, sizes) -> list of uint8 tensors` (client/dataplane.py's `DataPlaneClient`,
        which owns those buffers, so reuse_buffers/pin_memory are its own). Without one, such a
        header is DATA_LOSS.

    Errors: a header carrying `error` raises that error (its class from the gRPC code, with
    `request_id` set) and leaves the assembler ready for the next reply. A stream that breaks the
    framing (a chunk overrunning the announced size, a header before the previous reply is
    complete, a stream ending mid-reply, a malformed frame) raises a DraftfeedError with code
    DATA_LOSS; the call should then be abandoned.
    """

    def __init__(self, reuse_buffers: int = 0, pin_memory: bool = False, data_plane: Any = None):
        if reuse_buffers < 0:
            raise ValueError(f"reuse_buffers must be >= 0, got {reuse_buffers}")
        self.reuse_buffers = reuse_buffers
        self.pin_memory = pin_memory
        self.data_plane = data_plane
        self._ring: list[tuple[torch.Tensor, memoryview] | None] = [None] * reuse_buffers
        self._turn = 0
        self._reset()

    @property
    def in_reply(self) -> bool:
        """True while a reply's header was read and its payload is not complete."""
        return self._header is not None

    def _reset(self) -> None:
        self._header: pb.ReplyHeader | None = None
        self._received = 0
        # per non-empty tensor: (start, end) in the payload, offset in the buffer
        self._spans: list[tuple[int, int, int]] = []
        self._span = 0  # first span not yet complete
        self._tensors: dict[str, torch.Tensor] = {}
        self._meta: dict[str, Any] = {}
        self._view = memoryview(b"")

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """A buffer of at least `nbytes` and a byte memoryview of it: the ring's next one, or a new one."""
        turn = self._turn
        if self.reuse_buffers:
            self._turn = (turn + 1) % self.reuse_buffers
            slot = self._ring[turn]
            if slot is not None and slot[0].numel() >= nbytes:
                return slot
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        slot = (buf, memoryview(buf.numpy()))
        if self.reuse_buffers:
            self._ring[turn] = slot
        return slot

    def _start(self, header: pb.ReplyHeader) -> Reply | None:
        rid = header.request_id
        if header.HasField("error"):
            err = error_for_code(_status_code(header.error.code), header.error.message)
            err.request_id = rid
            raise err
        layouts, offset, wire = [], 0, 0
        for i, th in enumerate(header.tensors):
            what = f"reply {rid} tensor {i} ({th.name!r})"
            try:
                dtype, shape = _check_layout(what, th.dtype, th.shape, th.nbytes)
            except InvalidArgument as e:
                raise _data_loss(f"malformed reply header: {e}", rid) from None
            layouts.append((th.name, dtype, shape, wire, offset, th.nbytes))
            wire += th.nbytes
            offset += -(-th.nbytes // _ALIGN) * _ALIGN
        if wire != header.total_bytes:
            raise _data_loss(
                f"reply {rid} header announces {header.total_bytes} bytes but its tensors hold {wire}", rid
            )
        try:
            meta = msgpack.unpackb(header.meta, raw=False, strict_map_key=False) if header.meta else {}
        except Exception as e:  # msgpack raises several unrelated types
            raise _data_loss(f"reply {rid} meta is not valid msgpack: {e}", rid) from None
        meta = meta if isinstance(meta, dict) else {"meta": meta}
        if header.payload_on_data_plane:
            return self._from_data_plane(rid, layouts, meta)
        buf, self._view = self._buffer(offset) if offset else (None, memoryview(b""))
        for name, dtype, shape, start, off, nbytes in layouts:
            if nbytes == 0:
                self._tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                self._tensors[name] = buf[off : off + nbytes].view(dtype).view(shape)
                self._spans.append((start, start + nbytes, off))
        self._header, self._meta = header, meta
        return self._finish_reply() if header.total_bytes == 0 else None

    def _from_data_plane(self, rid: int, layouts: list, meta: dict) -> Reply:
        if self.data_plane is None:
            raise _data_loss(f"reply {rid}: its payload went to a data plane this reader does not have", rid)
        parts = self.data_plane.take(rid, [nbytes for *_, nbytes in layouts])
        tensors = {
            name: part.view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
            for (name, dtype, shape, _start, _off, nbytes), part in zip(layouts, parts, strict=True)
        }
        return Reply(rid, tensors, meta)

    def _finish_reply(self) -> Reply:
        reply = Reply(self._header.request_id, self._tensors, self._meta)
        self._reset()
        return reply

    def feed(self, message: bytes) -> Reply | None:
        """Takes the next frame of the stream; returns the reply it completes, else None."""
        tag, start = _parse_frame(message)
        if tag == _HEADER_TAG:
            if self._header is not None:
                rid, got, total = self._header.request_id, self._received, self._header.total_bytes
                self._reset()
                raise _data_loss(
                    f"reply {rid} truncated: a new header came after {got} of its {total} bytes", rid
                )
            try:
                header = pb.ReplyHeader.FromString(message[start:])
            except Exception as e:  # protobuf's DecodeError differs between implementations
                raise _data_loss(f"reply header frame does not parse: {e}") from None
            return self._start(header)

        n = len(message) - start
        if self._header is None:
            raise _data_loss(
                f"a {n}-byte payload chunk came with no reply open (the stream overran the last reply)"
            )
        rid, got, total = self._header.request_id, self._received, self._header.total_bytes
        if got + n > total:
            self._reset()
            raise _data_loss(
                f"reply {rid} overrun: a {n}-byte chunk after {got} bytes exceeds the announced {total}", rid
            )
        src = memoryview(message)
        end = got + n
        while self._span < len(self._spans):
            wire_start, wire_end, off = self._spans[self._span]
            a, b = max(wire_start, got), min(wire_end, end)
            if a >= b:
                break
            self._view[off + a - wire_start : off + b - wire_start] = src[start + a - got : start + b - got]
            if b < wire_end:
                break
            self._span += 1
        self._received = end
        return self._finish_reply() if end == total else None

    def finish(self) -> None:
        """Checks that the stream did not end inside a reply (DATA_LOSS if it did)."""
        if self._header is not None:
            rid, got, total = self._header.request_id, self._received, self._header.total_bytes
            self._reset()
            raise _data_loss(f"reply stream ended inside reply {rid}, after {got} of its {total} bytes", rid)

    def replies(self, messages: Iterable[bytes]) -> Iterator[Reply]:
        """Feeds every frame of `messages` and yields each completed reply; checks the end (`finish`)."""
        for message in messages:
            reply = self.feed(message)
            if reply is not None:
                yield reply
        self.finish()


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


# ------------------------------------------------------------------------------------- gRPC binding

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TargetService"].full_name
REPLY_STREAM_METHODS = frozenset({"Generate", "GenerateStream", "StreamWeights"})
_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def grpc_options(
    max_message_bytes: int = 256 << 20, window_bytes: int | None = None
) -> list[tuple[str, int]]:
    """Channel/server options both ends should use.

    max_message_bytes: requests (token ids, masks) may exceed gRPC's 4 MiB default, and a chunk
        frame is a few bytes longer than `max_chunk_bytes`.
    window_bytes: None keeps gRPC's adaptive HTTP/2 flow-control window (BDP probing: best across
        hosts); a number fixes the receive window (BDP probing off), which bounds how many bytes
        gRPC buffers ahead of the reader (lower peak memory on loopback).
    """
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if window_bytes is not None:
        options += [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)]
    return options


def _methods():
    for method in pb.DESCRIPTOR.services_by_name["TargetService"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        raw = method.name in REPLY_STREAM_METHODS
        yield method.name, _KINDS[method.client_streaming, method.server_streaming], request, response, raw


def add_to_server(servicer: Any, server: grpc.Server, deserializer=None) -> None:
    """Registers `servicer` (a `TargetServiceServicer`) on `server`.

    Like the generated `add_TargetServiceServicer_to_server`, except that Generate, GenerateStream
    and StreamWeights send what the servicer yields as is: frames from `encode_reply` /
    `encode_error_reply` (bytes), never `ReplyFrame` messages. `deserializer(message_class)` gives
    each method's request deserializer (default: the class's `FromString`).
    """
    deserializer = deserializer or (lambda request: request.FromString)
    handlers = {
        name: getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, name),
            request_deserializer=deserializer(request),
            response_serializer=None if raw else response.SerializeToString,
        )
        for name, kind, request, response, raw in _methods()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


class TargetStub:
    """Client stub like the generated `TargetServiceStub`, except that Generate, GenerateStream and
    StreamWeights return the raw frames (bytes) for a `ReplyAssembler` instead of parsed `ReplyFrame`s."""

    def __init__(self, channel: grpc.Channel):
        for name, kind, request, response, raw in _methods():
            call = getattr(channel, kind)(
                f"/{SERVICE_NAME}/{name}",
                request_serializer=request.SerializeToString,
                response_deserializer=None if raw else response.FromString,
            )
            setattr(self, name, call)
