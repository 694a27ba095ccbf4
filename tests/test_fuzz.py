"""A bounded fuzz of every port while two good jobs train (issue 16): a well-behaved EAGLE-3 job and
a DSpark job stream batches and compare every reply with their in-process answers, while a third
job (its own token) sends malformed and hostile calls to every TargetService method, its metadata,
the data port, the NeMo port and the admin port. Loopback, CPU, one process, a fixed seed.

Expected: 0 crashes (the server's threads alive, health SERVING), 0 hangs (every call answered
before its deadline, every thread joined), 0 wrong or failed replies for the good jobs, 0 INTERNAL
or UNKNOWN from TargetService (malformed protobuf bytes included: INVALID_ARGUMENT), 0 HTTP 5xx,
and the server's RSS back within a bound once the fuzzer's sessions are closed.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter

import grpc
import pytest
import requests
import torch
from test_backends import inputs, mapping
from test_packing import packed_inputs
from test_service import start_server

from draftfeed.client.channel import SESSION_SPEC_KEY
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.client.wire import SERVICE_NAME, ReplyAssembler, TargetStub, tensor_to_proto
from draftfeed.target.backends import HFDSparkTargetModel, HFEagle3TargetModel
from draftfeed.target.checks import Limits

# malformed or hostile calls, all ports together (DRAFTFEED_FUZZ_CALLS=20000 for a longer local run)
FUZZ_CALLS = int(os.environ.get("DRAFTFEED_FUZZ_CALLS", "1200"))
FUZZ_THREADS = 4
WARM_CALLS = 400  # before the baseline: thread pools and buffers grow to their working size
RSS_BOUND_MB = 64  # RSS after the fuzz (its sessions closed) over the warm baseline (measured: +2 MB)
TOKENS = {
    "eagle-job": "tok-eagle-job-0123456789abcdef",
    "dspark-job": "tok-dspark-job-0123456789abcdef",
    "fuzz-job": "tok-fuzz-job-0123456789abcdef",
}
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
METHODS = {
    "GetModelInfo": ("unary_unary", pb.GetModelInfoRequest),
    "OpenSession": ("unary_unary", pb.OpenSessionRequest),
    "SetVocabMapping": ("unary_unary", pb.SetVocabMappingRequest),
    "CloseSession": ("unary_unary", pb.CloseSessionRequest),
    "Generate": ("unary_stream", pb.GenerateRequest),
    "GenerateStream": ("stream_stream", pb.GenerateRequest),
    "StreamWeights": ("unary_stream", pb.StreamWeightsRequest),
    "GetTokenizer": ("unary_unary", pb.GetTokenizerRequest),
}
DTYPES = ["int64", "int32", "int16", "uint8", "bool", "float32", "bfloat16", "float8_e4m3fn", "complex", ""]
DIMS = [-1, 0, 1, 2, 3, 12, 18, 64, 65, 1 << 20, 1 << 40]


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which blocks of a few MiB (a 2 MB request, a reply) come from the heap arenas and stay there,
    fragmented: without this the fuzz's RSS grows 40-110 MB and plateaus near +200 MB after 7,000
    calls, with no Python object or thread left behind. A fixed threshold hands every large block
    back on free, so RSS measures what the server still holds."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the bound below still applies
        pass


def _rss_mb() -> float:
    """This process's resident memory, after a collection and handing freed heap back to the OS (so
    what is measured is what is still held, not what glibc's arenas keep for reuse)."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _assert_same(got, want) -> bool:
    a, b = got.tensors(), want.tensors()
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class Fuzzer:
    """One thread's attacks; `tally` counts outcomes as (target, outcome) pairs."""

    def __init__(self, server, seed: int, victims: list[str], tally: Counter, problems: list):
        self.server = server
        self.rng = random.Random(seed)
        self.victims = victims  # the good jobs' session ids: another job's, so PERMISSION_DENIED
        self.tally = tally
        self.problems = problems
        self.channel = grpc.insecure_channel(server.url.removeprefix("grpc://"))
        self.stub = TargetStub(self.channel)
        self.md = (("authorization", f"Bearer {TOKENS['fuzz-job']}"),)
        self.opened: list[str] = []
        self.own = {
            "eagle3": self._open(pb.OpenSessionRequest(algorithm="eagle3")),
            "dspark": self._open(pb.OpenSessionRequest(algorithm="dspark")),
            "dflash": self._open(pb.OpenSessionRequest(algorithm="dflash", capture_logits=True)),
        }
        sel, mask = mapping(160)
        self.stub.SetVocabMapping(
            pb.SetVocabMappingRequest(
                session_id=self.own["eagle3"],
                selected_token_ids=tensor_to_proto(sel),
                selected_token_mask=tensor_to_proto(mask),
            ),
            metadata=self.md,
            timeout=10,
        )

    def _open(self, req) -> str:
        sid = self.stub.OpenSession(req, metadata=self.md, timeout=10).session_id
        self.opened.append(sid)
        return sid

    # -- building blocks -----------------------------------------------------------------------

    def tensor(self, valid_shape=(2, 12)) -> pb.Tensor:
        r = self.rng
        if r.random() < 0.4:  # well-formed, maybe of a wrong kind
            t = (
                torch.randint(-3, 200, valid_shape)
                if r.random() < 0.5
                else torch.ones(valid_shape, dtype=torch.long)
            )
            return tensor_to_proto(
                t.to(r.choice([torch.long, torch.int32, torch.int16, torch.float32, torch.bool]))
            )
        shape = [r.choice(DIMS) for _ in range(r.randint(0, 3))]
        n = r.choice([0, 1, 7, 24, 96, 192])
        return pb.Tensor(dtype=r.choice(DTYPES), shape=shape, data=r.randbytes(n))

    def session_id(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(list(self.own.values()))
        if r < 0.8:
            return self.rng.choice(self.victims)
        return self.rng.choice(["", "nope", "x" * 300, "\u2603", self.rng.randbytes(8).hex()])

    def generate_request(self) -> pb.GenerateRequest:
        r = self.rng
        choice = r.random()
        if choice < 0.15:  # a valid request of the fuzzer's own
            ids, attn, loss = inputs(seed=r.randrange(100))
            sid = self.own[r.choice(["eagle3", "dspark", "dflash"])]
            return pb.GenerateRequest(
                session_id=sid,
                request_id=r.randrange(1 << 20),
                input_ids=tensor_to_proto(ids),
                attention_mask=tensor_to_proto(attn),
                loss_mask=tensor_to_proto(loss),
            )
        if choice < 0.45:  # valid tokens, packing metadata of any subset, some of it wrong
            ids, attn, loss, pos, lens, rem = packed_inputs(seed=r.randrange(100))
            req = pb.GenerateRequest(
                session_id=self.session_id(),
                input_ids=tensor_to_proto(ids),
                attention_mask=tensor_to_proto(attn),
                loss_mask=tensor_to_proto(loss),
            )
            for name, t in (("position_ids", pos), ("seq_lens", lens), ("doc_remaining", rem)):
                pick = r.random()
                if pick < 0.4:
                    getattr(req, name).CopyFrom(tensor_to_proto(t))
                elif pick < 0.55:
                    bad = t.clone()
                    bad.view(-1)[r.randrange(bad.numel())] = r.choice([-1, 1, 17, 99, 1 << 40])
                    getattr(req, name).CopyFrom(tensor_to_proto(bad))
                elif pick < 0.65:
                    getattr(req, name).CopyFrom(self.tensor(tuple(t.shape)))
            if r.random() < 0.05:  # a million document slots in a 2 MB request
                req.seq_lens.CopyFrom(tensor_to_proto(torch.zeros(2, 1 << 20, dtype=torch.int16)))
            return req
        req = pb.GenerateRequest(session_id=self.session_id(), request_id=r.randrange(1 << 64))
        for name in ("input_ids", "attention_mask", "loss_mask", "position_ids", "seq_lens", "doc_remaining"):
            if r.random() < (0.8 if name in ("input_ids", "attention_mask", "loss_mask") else 0.2):
                getattr(req, name).CopyFrom(self.tensor())
        return req

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        data = bytearray(data or b"\x00")
        for _ in range(r.randint(1, 4)):
            op = r.random()
            i = r.randrange(len(data))
            if op < 0.4:
                data[i] ^= 1 << r.randrange(8)
            elif op < 0.7:
                data = data[:i]
            else:
                data[i:i] = r.randbytes(r.randint(1, 8))
            if not data:
                data = bytearray(b"\xff")
        return bytes(data)

    def metadata(self):
        r = self.rng.random()
        if r < 0.75:
            return self.md
        if r < 0.8:
            return ()
        if r < 0.85:
            return (("authorization", self.rng.choice(["Bearer wrong-token-0123456789", "Basic x", "tok"])),)
        spec = self.rng.choice(
            [
                self.rng.randbytes(self.rng.randint(0, 64)),
                zlib.compress(self.rng.randbytes(32)),
                zlib.compress(
                    pb.OpenSessionRequest(algorithm="dspark", layer_ids=[0] * 50).SerializeToString()
                ),
                BOMB,
            ]
        )
        return (*self.md, (SESSION_SPEC_KEY, spec))

    # -- attacks: each makes one call and records its outcome --------------------------------------

    def grpc_call(self, target: str, fn):
        try:
            out = fn()
            self.tally[target, "OK"] += 1
            return out
        except grpc.RpcError as err:
            code = err.code()
            self.tally[target, code.name] += 1
            if code in BAD_GRPC:
                self.problems.append((target, code.name, (err.details() or "")[:300]))
        return None

    def raw_bytes(self):
        method = self.rng.choice(list(METHODS))
        kind, cls = METHODS[method]
        call = getattr(self.channel, kind)(f"/{SERVICE_NAME}/{method}")
        valid = {
            "GenerateRequest": lambda: self.generate_request(),
            "OpenSessionRequest": lambda: pb.OpenSessionRequest(algorithm="dspark"),
            "CloseSessionRequest": lambda: pb.CloseSessionRequest(session_id=self.session_id()),
            "SetVocabMappingRequest": lambda: pb.SetVocabMappingRequest(session_id=self.session_id()),
            "StreamWeightsRequest": lambda: pb.StreamWeightsRequest(name="lm_head"),
            "GetModelInfoRequest": lambda: pb.GetModelInfoRequest(),
            "GetTokenizerRequest": lambda: pb.GetTokenizerRequest(),
        }[cls.__name__]().SerializeToString()
        data = self.mutate(valid) if self.rng.random() < 0.7 else self.rng.randbytes(self.rng.randint(0, 100))

        def run():
            if kind == "unary_unary":
                return call(data, timeout=10, metadata=self.md)
            return list(call(iter([data]) if kind == "stream_stream" else data, timeout=10, metadata=self.md))

        sid = self.grpc_call(f"bytes:{method}", run)
        if method == "OpenSession" and sid is not None:
            self.opened.append(pb.OpenSessionResponse.FromString(sid).session_id)

    def generate(self):
        req = self.generate_request()
        self.grpc_call(
            "Generate",
            lambda: list(
                ReplyAssembler().replies(self.stub.Generate(req, timeout=10, metadata=self.metadata()))
            ),
        )

    def generate_stream(self):
        reqs = [self.generate_request() for _ in range(self.rng.randint(1, 4))]
        for i, req in enumerate(reqs):
            req.request_id = i + 1
        frames = []

        def run():
            for frame in self.stub.GenerateStream(iter(reqs), timeout=10, metadata=self.metadata()):
                frames.append(frame)
            return frames

        self.grpc_call("GenerateStream", run)
        assembler = ReplyAssembler()
        for frame in frames:  # each request's own outcome: a reply or an error frame
            try:
                assembler.feed(frame)
            except Exception as err:  # noqa: BLE001 - a DraftfeedError carrying its code
                code = getattr(getattr(err, "code", None), "name", type(err).__name__)
                self.tally["GenerateStream frame", code] += 1
                if code in ("INTERNAL", "UNKNOWN"):
                    self.problems.append(("GenerateStream frame", code, str(err)[:300]))

    def open_session(self):
        r = self.rng
        req = pb.OpenSessionRequest(
            algorithm=r.choice(["eagle3", "dflash", "dspark", "medusa", ""]),
            layer_ids=[r.randint(-3, 12) for _ in range(r.choice([0, 1, 3, 5, 40, 2000]))],
            job_name=r.choice(["", "fuzz", "j" * 5000, "\u2603" * 10]),
            capture_logits=r.random() < 0.5,
            weight=r.choice([0.0, 0.5, 1.0, float("inf"), float("nan"), -1.0, 1e300]),
            data_plane=r.random() < 0.5,
        )
        for kind in r.sample(["hidden", "final", "probs", "mask", "ids", "junk"], r.randint(0, 2)):
            req.encodings[kind] = r.choice(["raw", "fp8_row", "bf16", "topk:64", "topk:-1", "gzip", "latent"])
        if r.random() < 0.3:
            req.selected_token_ids.CopyFrom(self.tensor((30,)))
            req.selected_token_mask.CopyFrom(self.tensor((160,)))
        resp = self.grpc_call(
            "OpenSession", lambda: self.stub.OpenSession(req, timeout=10, metadata=self.metadata())
        )
        if resp is not None:
            self.opened.append(resp.session_id)

    def close_session(self):
        sid = self.rng.choice([*self.victims, "nope", self.rng.randbytes(4).hex()])
        self.grpc_call(
            "CloseSession",
            lambda: self.stub.CloseSession(
                pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=self.md
            ),
        )

    def set_mapping(self):
        req = pb.SetVocabMappingRequest(session_id=self.session_id())
        if self.rng.random() < 0.9:
            req.selected_token_ids.CopyFrom(self.tensor((30,)))
            req.selected_token_mask.CopyFrom(self.tensor((160,)))
        if req.session_id == self.own["eagle3"]:  # keep the fuzzer's own mapping valid for its good calls
            req.session_id = self.own["dspark"]
        self.grpc_call(
            "SetVocabMapping", lambda: self.stub.SetVocabMapping(req, timeout=10, metadata=self.metadata())
        )

    def stream_weights(self):
        name = self.rng.choice(["embed_tokens", "lm_head", "", "x" * 1000, "../etc/passwd"])
        self.grpc_call(
            "StreamWeights",
            lambda: list(
                self.stub.StreamWeights(pb.StreamWeightsRequest(name=name), timeout=10, metadata=self.md)
            ),
        )

    def data_port(self):
        r = self.rng
        port = self.server.dataplane.port
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                how = r.random()
                if how < 0.2:
                    outcome = "closed early"  # connect and go away
                else:
                    payload = r.randbytes(32) if how < 0.6 else r.randbytes(r.randint(0, 31))
                    s.sendall(payload + (r.randbytes(r.randint(1, 64)) if r.random() < 0.3 else b""))
                    if len(payload) < 32:
                        try:
                            s.shutdown(socket.SHUT_WR)
                        except OSError:  # the server hung up first (ENOTCONN)
                            pass
                    answer = s.recv(1)
                    outcome = {b"\x00": "refused", b"": "closed"}.get(answer, f"answer {answer!r}")
        except TimeoutError:
            outcome = "timeout"
        except OSError as err:
            outcome = f"{type(err).__name__}: {err}"
        self.tally["data port", outcome] += 1
        if outcome not in ("refused", "closed", "closed early") and not outcome.startswith(
            ("ConnectionResetError", "BrokenPipeError")
        ):
            self.problems.append(("data port", outcome, ""))

    def http(self, which: str):
        r = self.rng
        srv = self.server.nemo_http if which == "nemo" else self.server.admin
        base = f"http://127.0.0.1:{srv.port}"
        if which == "nemo":
            path = r.choice(
                ["/generate", "/set_vocab_mapping", "/disconnect", "/model_info", "/health", "/nope"]
            )
            body = r.choice(
                [
                    r.randbytes(r.randint(0, 200)),
                    b"NMET" + r.randbytes(r.randint(0, 100)),
                    NMET_GOOD[: r.randint(0, len(NMET_GOOD))],
                ]
            )
            headers = r.choice(
                [
                    {"Authorization": f"Bearer {TOKENS['fuzz-job']}"},
                    {},
                    {"Authorization": "Bearer nope-0123456789abcd"},
                    {"Authorization": "x"},
                ]
            )
            method = r.choice(["POST", "POST", "GET", "PUT"])
        else:
            path = r.choice(
                ["/healthz", "/readyz", "/metrics", "/sessions", "/status.json", "/", "/nope", "/%ff" * 3]
            )
            body, headers, method = b"", {}, r.choice(["GET", "POST"])
        try:
            status = requests.request(method, base + path, data=body, headers=headers, timeout=10).status_code
            outcome = str(status)
        except requests.RequestException as err:
            outcome, status = type(err).__name__, 599
        self.tally[which, outcome] += 1
        if status >= 500:
            self.problems.append((which, outcome, path))

    def run(self, calls: int) -> None:
        attacks = [
            (self.raw_bytes, 5),
            (self.generate, 4),
            (self.generate_stream, 2),
            (self.open_session, 2),
            (self.close_session, 1),
            (self.set_mapping, 1),
            (self.stream_weights, 1),
            (self.data_port, 2),
            (lambda: self.http("nemo"), 2),
            (lambda: self.http("admin"), 1),
        ]
        fns, weights = zip(*attacks, strict=True)
        for _ in range(calls):
            self.rng.choices(fns, weights)[0]()

    def close(self) -> None:
        for sid in self.opened:
            try:
                self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=self.md)
            except grpc.RpcError:
                pass  # already closed by the fuzz itself
        self.channel.close()


def _bomb() -> bytes:
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    return b"".join(deflate.compress(zeros) for _ in range(256)) + deflate.flush()  # 256 KiB -> 256 MiB


def _nmet(entries: dict) -> bytes:
    codes = {torch.int64: 3, torch.bool: 9}
    out = bytearray(struct.pack("<I", 0x4E4D4554))
    for key, t in entries.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out += struct.pack("<I", len(key)) + key.encode() + struct.pack("<BBB", 0, codes[t.dtype], t.dim())
        out += b"".join(struct.pack("<q", d) for d in t.shape) + struct.pack("<Q", len(data)) + data
    return bytes(out)


BOMB = _bomb()
NMET_GOOD = _nmet(dict(zip(("input_ids", "attention_mask", "loss_mask"), inputs(), strict=True)))


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def test_fuzz_every_port_while_two_good_jobs_train(model, tmp_path):
    _fixed_mmap_threshold()
    path = tmp_path / "tokens.yaml"
    path.write_text("".join(f"{job}: {token}\n" for job, token in TOKENS.items()))
    srv = start_server(
        model,
        token_file=str(path),
        admin_port=0,
        nemo_http_port=0,
        limits=Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=512),
    )
    sel, mask = mapping(160)
    local_e = HFEagle3TargetModel(model)
    local_e.set_vocab_mapping(sel, mask)
    local_s = HFDSparkTargetModel(model)
    batches = [inputs(seed=i) for i in range(3)] + [packed_inputs(seed=i) for i in range(3)]
    want = {
        "eagle": [local_e.generate_batch(*b) for b in batches],
        "dspark": [local_s.generate_batch(*b) for b in batches],
    }
    eagle = RemoteEagle3TargetModel.from_urls([srv.url], token=TOKENS["eagle-job"], max_in_flight=2)
    eagle.set_vocab_mapping(sel, mask)
    dspark = RemoteDSparkTargetModel.from_urls([srv.url], token=TOKENS["dspark-job"], max_in_flight=2)
    good = {"eagle": eagle, "dspark": dspark}
    counts = Counter()
    failures: list = []
    fuzzing = threading.Event()
    fuzzing.set()

    def good_job(name):
        remote, i = good[name], 0
        while fuzzing.is_set() or i < 8:
            futures = [
                (j % len(batches), remote.generate_batch_async(*batches[j % len(batches)]))
                for j in (i, i + 1)
            ]
            for j, fut in futures:
                try:
                    ok = _assert_same(fut.result(timeout=30), want[name][j])
                    counts[name, "ok" if ok else "wrong"] += 1
                except Exception as err:  # noqa: BLE001 - every failure is counted and shown
                    counts[name, "failed"] += 1
                    failures.append((name, repr(err)[:300]))
            i += 2

    for name in good:  # warm: the streams, data plane and replies exist before the baseline
        assert _assert_same(good[name].generate_batch(*batches[0]), want[name][0])
    victims = [r.servers[0].session_id for r in good.values()]
    tally: Counter = Counter()
    problems: list = []
    rss_start = _rss_mb()
    warm = [Fuzzer(srv, 100 + seed, victims, tally, problems) for seed in range(FUZZ_THREADS)]
    threads = [threading.Thread(target=f.run, args=(WARM_CALLS // FUZZ_THREADS,), daemon=True) for f in warm]
    for t in threads:  # the server's thread pools, gRPC and HTTP buffers reach their working size
        t.start()
    warm_deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, warm_deadline - time.monotonic()))
    for f in warm:
        f.close()
    rss_before = _rss_mb()
    fuzzers = [Fuzzer(srv, seed, victims, tally, problems) for seed in range(FUZZ_THREADS)]
    jobs = [threading.Thread(target=good_job, args=(name,), daemon=True) for name in good]
    threads = [
        threading.Thread(target=f.run, args=(FUZZ_CALLS // FUZZ_THREADS,), daemon=True) for f in fuzzers
    ]
    t0 = time.monotonic()
    for t in jobs + threads:
        t.start()
    deadline = t0 + 180  # one bound for all: a hang fails the test instead of stalling the suite
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = sum(t.is_alive() for t in threads)
    fuzzing.clear()
    for t in jobs:
        t.join(max(0.0, deadline + 60 - time.monotonic()))
    hung += sum(t.is_alive() for t in jobs)
    elapsed = time.monotonic() - t0
    for f in fuzzers:
        f.close()
    alive = srv.scheduler._thread.is_alive() and srv.scheduler._post_thread.is_alive()
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
    serving = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == 1
    left = [s.job_name for s in srv.sessions.list()]
    for remote in good.values():
        remote.close()
    gc.collect()
    rss_after = _rss_mb()
    srv.stop(grace=1)
    calls = sum(tally.values())
    internal = sum(n for (_t, outcome), n in tally.items() if outcome in ("INTERNAL", "UNKNOWN"))
    print(
        f"\nfuzz: {calls} calls in {elapsed:.1f} s ({FUZZ_THREADS} threads); good replies "
        f"{dict(counts)}; INTERNAL/UNKNOWN {internal}; hung threads {hung}; RSS {rss_start:.0f} at start, "
        f"{rss_before:.0f} after {WARM_CALLS} warm-up calls, {rss_after:.0f} MB after the fuzz; "
        f"outcomes {sorted(tally.items())}"
    )
    assert calls >= 1000 + WARM_CALLS
    assert problems == [], problems[:20]
    assert failures == [], failures[:10]
    assert counts["eagle", "wrong"] == counts["dspark", "wrong"] == 0
    assert counts["eagle", "ok"] >= 8 and counts["dspark", "ok"] >= 8
    assert hung == 0 and alive and serving
    assert sorted(left) == ["dspark-job", "eagle-job"], left  # the fuzzer's sessions all closed
    assert rss_after - rss_before < RSS_BOUND_MB
