"""client/wire.py: request tensors, reply framing and reassembly, and a real gRPC round trip."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
import torch

from draftfeed.client import wire
from draftfeed.client.errors import DraftfeedError, InvalidArgument, NotFound
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.pb import draftfeed_pb2_grpc as pb_grpc

SHAPES = [(), (1,), (13,), (3, 5, 7), (0,), (2, 0, 3), (1, 1, 1, 17)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included), same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _random(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Any bit pattern of `dtype` (bools only 0/1)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _mixed_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        f"{name}{i}": _random(dtype, shape, i)
        for i, (name, dtype) in enumerate(wire.DTYPES.items())
        for shape in [(3, 5)]
    }
    tensors["empty"] = torch.zeros(2, 0, 3, dtype=torch.bfloat16)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["transposed"] = torch.arange(35, dtype=torch.int32).reshape(5, 7).t()
    tensors["strided"] = torch.arange(40, dtype=torch.float16)[::3]
    tensors["expanded"] = torch.tensor([[1, 2, 3]], dtype=torch.int16).expand(4, 3)
    tensors["big"] = _random(torch.bfloat16, (1300, 1001), 9)  # 2.6 MB: several 1 MiB chunks
    return tensors


# ----------------------------------------------------------------------------------- request tensors


@pytest.mark.parametrize("name", list(wire.DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_proto_round_trip_is_exact(name, shape):
    t = _random(wire.DTYPES[name], shape, seed=len(shape))
    msg = pb.Tensor.FromString(wire.tensor_to_proto(t, "x").SerializeToString())
    assert (msg.name, msg.dtype, list(msg.shape)) == ("x", name, list(shape))
    back = wire.tensor_from_proto(msg)
    assert _same(back, t) and back.is_contiguous()


def test_tensor_proto_of_non_contiguous_inputs_and_writable_result():
    for t in (torch.arange(12.0).reshape(3, 4).t(), torch.arange(20)[::3], torch.ones(1, 3).expand(5, 3)):
        back = wire.tensor_from_proto(wire.tensor_to_proto(t))
        assert _same(back, t.contiguous())
    back = wire.tensor_from_proto(wire.tensor_to_proto(torch.arange(4)))
    back += 1  # owns writable memory
    assert back.tolist() == [1, 2, 3, 4]
    assert wire.dtype_name(torch.bfloat16) == "bfloat16" and wire.dtype_from_name("bool") is torch.bool


@pytest.mark.parametrize(
    "msg, words",
    [
        (
            pb.Tensor(name="input_ids", dtype="int128", shape=[2], data=b"\0" * 32),
            ["input_ids", "int128", "expected one of"],
        ),
        (
            pb.Tensor(name="loss_mask", dtype="int64", shape=[2, 3], data=b"\0" * 40),
            ["loss_mask", "40 bytes", "expected 48"],
        ),
        (pb.Tensor(name="seq_lens", dtype="int32", shape=[-1], data=b""), ["seq_lens", "negative"]),
        (pb.Tensor(name="mask", dtype="bool", shape=[3], data=b"\x00\x01\x02"), ["mask", "0 and 1"]),
    ],
)
def test_tensor_from_proto_rejects_bad_tensors_clearly(msg, words):
    with pytest.raises(InvalidArgument) as info:
        wire.tensor_from_proto(msg)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_unsupported_dtype_is_refused_when_encoding():
    with pytest.raises(InvalidArgument, match="complex64"):
        wire.tensor_to_proto(torch.zeros(2, dtype=torch.complex64), "z")
    with pytest.raises(InvalidArgument, match="'z'.*complex64|complex64"):
        wire.encode_reply(1, {"z": torch.zeros(2, dtype=torch.complex64)})


# ------------------------------------------------------------------------------------- reply framing


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, wire.DEFAULT_CHUNK_BYTES])
def test_reply_round_trip_is_exact_for_any_chunking(chunk_bytes):
    tensors = _mixed_tensors()
    if chunk_bytes < 4096:
        del tensors["big"]  # keeps the byte-by-byte case fast
    meta = {"encodings": {"big": "raw"}, "kl": 0.25, "timings_ms": [1.5, 2.0], "blob": b"\x00\xff"}
    frames = list(wire.encode_reply(42, tensors, meta, chunk_bytes=chunk_bytes))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(len(f) - 2 <= chunk_bytes + 2 for f in frames[1:])  # prefix is tag + 1..3 varint bytes
    if chunk_bytes == 7:
        assert len(frames) - 1 == -(-total // 7)  # chunks span tensors: no short chunk at tensor ends

    (reply,) = list(wire.ReplyAssembler().replies(frames))
    assert reply.request_id == 42 and reply.meta == meta
    assert list(reply.tensors) == list(tensors)
    for name, t in tensors.items():
        assert _same(reply.tensors[name], t.contiguous()), name
        if reply.tensors[name].numel():
            assert reply.tensors[name].data_ptr() % 64 == 0, name


def test_frames_are_valid_protobuf_reply_frames():
    """Any protobuf client can decode the fast-path frames as ReplyFrame messages."""
    tensors = {"a": _random(torch.float32, (300,)), "b": _random(torch.bool, (5,))}
    frames = list(wire.encode_reply(9, tensors, {"k": 1}, chunk_bytes=500))
    parsed = [pb.ReplyFrame.FromString(f) for f in frames]
    assert [p.WhichOneof("frame") for p in parsed] == ["header", "chunk", "chunk", "chunk"]
    header = parsed[0].header
    assert header.request_id == 9 and header.total_bytes == 1205
    assert [(h.name, h.dtype, list(h.shape), h.nbytes) for h in header.tensors] == [
        ("a", "float32", [300], 1200),
        ("b", "bool", [5], 5),
    ]
    assert [len(p.chunk) for p in parsed[1:]] == [500, 500, 205]
    payload = b"".join(p.chunk for p in parsed[1:])
    assert payload == bytes(wire.tensor_bytes(tensors["a"])) + bytes(wire.tensor_bytes(tensors["b"]))


def test_reply_without_tensors_and_a_stream_of_replies_with_an_error():
    assembler = wire.ReplyAssembler()
    frames = list(wire.encode_reply(1, {}))
    assert len(frames) == 1
    assert assembler.feed(frames[0]) == wire.Reply(1, {}, {})

    stream = [
        *wire.encode_reply(2, {"x": torch.arange(10)}, chunk_bytes=16),
        wire.encode_error_reply(3, NotFound("session 's1' is unknown")),
        *wire.encode_reply(4, {"y": torch.ones(3, dtype=torch.bfloat16)}, chunk_bytes=16),
    ]
    results = []
    for frame in stream:
        try:
            reply = assembler.feed(frame)
        except DraftfeedError as e:
            results.append(e)
        else:
            if reply is not None:
                results.append(reply)
    assert [type(r) for r in results] == [wire.Reply, NotFound, wire.Reply]
    assert torch.equal(results[0].tensors["x"], torch.arange(10))
    assert (
        results[1].request_id == 3
        and "s1" in str(results[1])
        and results[1].code == grpc.StatusCode.NOT_FOUND
    )
    assert results[2].request_id == 4 and torch.equal(
        results[2].tensors["y"], torch.ones(3, dtype=torch.bfloat16)
    )
    assembler.finish()


def test_buffer_reuse_is_opt_in_and_rings():
    def reply(assembler, value, n=1000):
        (r,) = assembler.replies(wire.encode_reply(0, {"t": torch.full((n,), value, dtype=torch.int32)}))
        return r.tensors["t"]

    fresh = wire.ReplyAssembler()
    a, b = reply(fresh, 1), reply(fresh, 2)
    assert a.data_ptr() != b.data_ptr() and int(a[0]) == 1

    one = wire.ReplyAssembler(reuse_buffers=1)
    a, b = reply(one, 1), reply(one, 2)
    assert a.data_ptr() == b.data_ptr() and int(a[0]) == 2  # overwritten by the next reply
    c = reply(one, 3, n=5000)  # larger: the buffer grows
    assert int(c[-1]) == 3 and c.numel() == 5000

    two = wire.ReplyAssembler(reuse_buffers=2)
    a, b, c = reply(two, 1), reply(two, 2), reply(two, 3)
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() == c.data_ptr() and int(b[0]) == 2


def _frames():
    return list(
        wire.encode_reply(5, {"t": torch.arange(100, dtype=torch.int64)}, chunk_bytes=300)
    )  # 800 B: 3 chunks


@pytest.mark.parametrize(
    "mangle, words",
    [
        (lambda f: f[:-1], "ended inside reply 5, after 600 of its 800 bytes"),
        (lambda f: f[:2] + f, "reply 5 truncated: a new header came after 300 of its 800 bytes"),
        (lambda f: f[:-1] + [f[-1][:1] + bytes([f[-1][1] + 1]) + f[-1][2:] + b"!"], "overrun"),
        (lambda f: f + [f[-1]], "no reply open"),
        (lambda f: f[:1] + [b"\x12\x05abc"], "neither a header nor a chunk"),
        (lambda f: [b"\x0a\x03\xff\xff\xff"], "does not parse"),
        (lambda f: [b"\x1a\x01x"], "neither a header nor a chunk"),
    ],
    ids=[
        "truncated-end",
        "truncated-by-header",
        "overrun-chunk",
        "extra-chunk",
        "bad-length",
        "bad-header",
        "bad-tag",
    ],
)
def test_broken_streams_fail_clearly(mangle, words):
    with pytest.raises(DraftfeedError, match=words) as info:
        list(wire.ReplyAssembler().replies(mangle(_frames())))
    assert info.value.code == grpc.StatusCode.DATA_LOSS


def test_header_that_does_not_add_up_is_refused():
    header = pb.ReplyHeader(
        request_id=1, total_bytes=10, tensors=[pb.TensorHeader(name="a", dtype="int32", shape=[2], nbytes=8)]
    )
    with pytest.raises(DraftfeedError, match="announces 10 bytes but its tensors hold 8"):
        wire.ReplyAssembler().feed(pb.ReplyFrame(header=header).SerializeToString())
    header = pb.ReplyHeader(
        request_id=1, total_bytes=8, tensors=[pb.TensorHeader(name="a", dtype="int32", shape=[3], nbytes=8)]
    )
    with pytest.raises(DraftfeedError, match="tensor 0 .'a'.*expected 12"):
        wire.ReplyAssembler().feed(pb.ReplyFrame(header=header).SerializeToString())


# ------------------------------------------------------------------------------------------ real gRPC


class _Servicer(pb_grpc.TargetServiceServicer):
    """Echoes the request's input_ids (doubled) with a bf16 tensor; request_id 13 fails alone."""

    chunk_bytes = 4096

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(num_hidden_layers=2, limits=pb.Limits(max_chunk_bytes=self.chunk_bytes))

    def _reply(self, request):
        ids = wire.tensor_from_proto(request.input_ids, "input_ids")
        if request.request_id == 13:
            return [wire.encode_error_reply(13, InvalidArgument("input_ids: request 13 is unlucky"))]
        hidden = _random(torch.bfloat16, (ids.shape[0], 3000), seed=int(request.request_id))
        return wire.encode_reply(
            request.request_id, {"ids": ids * 2, "hidden": hidden}, {"n": ids.numel()}, self.chunk_bytes
        )

    def Generate(self, request, context):
        yield from self._reply(request)

    def GenerateStream(self, request_iterator, context):
        for request in request_iterator:
            yield from self._reply(request)


@pytest.fixture(scope="module")
def channel():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=wire.grpc_options())
    wire.add_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.grpc_options()) as ch:
        yield ch
    server.stop(grace=None)


def _request(rid: int) -> pb.GenerateRequest:
    ids = torch.arange(rid, rid + 24, dtype=torch.int64).reshape(3, 8)
    return pb.GenerateRequest(session_id="s", request_id=rid, input_ids=wire.tensor_to_proto(ids))


def test_grpc_unary_and_streaming_replies_reassemble_exactly(channel):
    stub = wire.TargetStub(channel)
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).num_hidden_layers == 2

    (reply,) = wire.ReplyAssembler(reuse_buffers=1).replies(stub.Generate(_request(7)))
    assert reply.request_id == 7 and reply.meta == {"n": 24}
    assert torch.equal(reply.tensors["ids"], torch.arange(7, 31).reshape(3, 8) * 2)
    assert _same(reply.tensors["hidden"], _random(torch.bfloat16, (3, 3000), seed=7))  # 18 kB: 5 chunks

    got = {}
    assembler = wire.ReplyAssembler()
    for frame in stub.GenerateStream(iter([_request(r) for r in (1, 13, 2, 3)])):
        try:
            reply = assembler.feed(frame)
        except InvalidArgument as e:
            got[e.request_id] = e
        else:
            if reply is not None:
                got[reply.request_id] = reply
    assembler.finish()
    assert list(got) == [1, 13, 2, 3] and "unlucky" in str(got[13])
    for rid in (1, 2, 3):
        assert _same(got[rid].tensors["hidden"], _random(torch.bfloat16, (3, 3000), seed=rid))


def test_grpc_generated_stub_decodes_the_same_stream(channel):
    """A plain protobuf client (the generated stub) reads the fast-path frames as ReplyFrame messages."""
    frames = list(pb_grpc.TargetServiceStub(channel).Generate(_request(4)))
    assert frames[0].header.request_id == 4 and len(frames) == 1 + -(-frames[0].header.total_bytes // 4096)
    payload = b"".join(f.chunk for f in frames[1:])
    hidden = _random(torch.bfloat16, (3, 3000), seed=4)
    assert payload[-hidden.numel() * 2 :] == bytes(wire.tensor_bytes(hidden))


def test_grpc_concurrent_calls_do_not_mix(channel):
    stub, errors = wire.TargetStub(channel), []

    def worker(rid):
        try:
            (reply,) = wire.ReplyAssembler().replies(stub.Generate(_request(rid)))
            assert reply.request_id == rid
            assert _same(reply.tensors["hidden"], _random(torch.bfloat16, (3, 3000), seed=rid))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(rid,)) for rid in range(20, 26)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
