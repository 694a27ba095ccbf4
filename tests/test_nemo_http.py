"""NeMo's remote-target HTTP protocol on a real server (127.0.0.1, ephemeral ports, tiny llama).

The client here is written from docs/architecture.md, NeMo port alone: raw `requests.Session`s and a blob
codec of its own (`pack`/`unpack` below, checked against hand-built bytes), not the server's.
"""

from __future__ import annotations

import http.client
import logging
import re
import struct
import threading
import time

import pytest
import requests
import torch
from test_backends import inputs, mapping
from test_tls import pki  # noqa: F401 - the throwaway CA fixture

from draftfeed.client.remote import RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.auth import AccessControl
from draftfeed.server.config import ServeConfig
from draftfeed.server.nemo_blob import BlobError, BlobLimits, BlobTooLarge, decode_blob, encode_blob
from draftfeed.server.nemo_http import CLIENT_HEADER, NemoHTTPServer
from draftfeed.target.backends import HFEagle3TargetModel
from draftfeed.target.checks import Limits

# ---- the test's own NMET codec, from the format description ----------------------------------

CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.bool: 9,
}
DTYPES = {c: d for d, c in CODES.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def pack(entries: dict) -> bytes:
    out = bytearray(struct.pack("<I", 0x4E4D4554))
    for key, t in entries.items():
        k = key.encode()
        out += struct.pack("<I", len(k)) + k
        if t is None:
            out += b"\x01"
            continue
        data = tensor_bytes(t)
        out += struct.pack("<BBB", 0, CODES[t.dtype], t.dim())
        out += b"".join(struct.pack("<q", d) for d in t.shape)
        out += struct.pack("<Q", len(data)) + data
    return bytes(out)


def unpack(raw: bytes) -> dict:
    assert struct.unpack_from("<I", raw, 0)[0] == 0x4E4D4554
    pos, out = 4, {}
    while pos < len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        key = raw[pos + 4 : pos + 4 + n].decode()
        pos += 4 + n
        flags = raw[pos]
        pos += 1
        if flags & 1:
            out[key] = None
            continue
        code, ndim = raw[pos], raw[pos + 1]
        pos += 2
        shape = struct.unpack_from(f"<{ndim}q", raw, pos)
        pos += 8 * ndim
        (nbytes,) = struct.unpack_from("<Q", raw, pos)
        pos += 8
        data = bytearray(raw[pos : pos + nbytes])
        pos += nbytes
        out[key] = torch.frombuffer(data, dtype=torch.uint8).view(DTYPES[code]).reshape(shape)
    return out


def test_codecs_agree_with_hand_built_bytes():
    a = torch.tensor([1, -2], dtype=torch.int64)
    m = torch.tensor([[True, False]])
    hand = (
        b"TEMN"  # 0x4E4D4554 little-endian
        + b"\x01\x00\x00\x00a\x00\x04\x01"
        + b"\x02\x00\x00\x00\x00\x00\x00\x00"
        + b"\x10\x00\x00\x00\x00\x00\x00\x00"
        + b"\x01\x00\x00\x00\x00\x00\x00\x00\xfe\xff\xff\xff\xff\xff\xff\xff"
        + b"\x01\x00\x00\x00n\x01"
        + b"\x01\x00\x00\x00b\x00\x09\x02"
        + b"\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00"
        + b"\x02\x00\x00\x00\x00\x00\x00\x00\x01\x00"
    )
    entries = {"a": a, "n": None, "b": m}
    assert pack(entries) == hand
    assert encode_blob(entries) == hand
    got = decode_blob(hand)
    assert list(got) == ["a", "n", "b"] and got["n"] is None
    assert torch.equal(got["a"], a) and torch.equal(got["b"], m)
    g = torch.Generator().manual_seed(0)
    every = {str(d): (torch.randn(2, 3, generator=g) * 50).to(d) for d in CODES}
    every["scalar"] = torch.tensor(3.5)
    every["empty"] = torch.zeros(0, 4, dtype=torch.int32)
    assert encode_blob(every) == pack(every)
    for k, t in decode_blob(pack(every)).items():
        assert t.dtype == every[k].dtype and torch.equal(t, every[k]), k


def _ids_blob() -> bytes:
    return pack({"input_ids": torch.arange(6).view(2, 3)})


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda b: b[:2], BlobError, "truncated NMET blob: the magic header"),
        (lambda b: b"XXXX" + b[4:], BlobError, "not an NMET blob: magic"),
        (lambda b: b[:-1], BlobError, "truncated.*data bytes of 'input_ids'"),
        (lambda b: b[:12], BlobError, "truncated.*key of entry 0"),
        (lambda b: b[:4] + b"\x05\x00\x00\x00", BlobError, "truncated.*key of entry 0"),
        (lambda b: b[:18] + b"\x0c" + b[19:], BlobError, "unknown dtype code 12"),
        (lambda b: b[:17] + b"\x02" + b[18:], BlobError, "flags 0x02"),
        (lambda b: b[:20] + struct.pack("<q", 4) + b[28:], BlobError, r"shape \[4, 3\] of int64 is 96 bytes"),
        (lambda b: b[:20] + struct.pack("<q", -2) + b[28:], BlobError, "negative dim"),
        (lambda b: b + b[4:], BlobError, "key 'input_ids' twice"),
        (lambda b: b + b"\x01\x00\x00\x00", BlobError, "truncated.*key of entry 1"),
        (lambda b: b + b"\xff\xff\xff\x00", BlobError, "key; at most 1024"),
        (lambda b: b + b"x" * 10_000, BlobTooLarge, "over this server's limit of 4096"),
    ],
)
def test_decoder_rejects_malformed_blobs(mutate, error, message):
    with pytest.raises(error, match=message):
        decode_blob(mutate(_ids_blob()), BlobLimits(max_bytes=4096))


def test_decoder_rejects_bad_bools_and_too_many_entries():
    bad = bytearray(pack({"m": torch.tensor([True, False])}))
    bad[-1] = 2
    with pytest.raises(BlobError, match="bool but holds bytes other than 0 and 1"):
        decode_blob(bytes(bad))
    with pytest.raises(BlobTooLarge, match="more than 2 entries"):
        decode_blob(pack({"a": None, "b": None, "c": None}), BlobLimits(max_entries=2))
    with pytest.raises(BlobError, match="float8"):
        encode_blob({"x": torch.zeros(2, dtype=torch.float8_e4m3fn)})


# ---- a real server ----------------------------------------------------------------------------

LIMITS = Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=256)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def servers(model):
    target = TargetServer(ServeConfig(port=0, limits=LIMITS), model=model).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0).start()
    yield target, nemo
    nemo.stop()
    target.stop(grace=1)


@pytest.fixture()
def url(servers):
    return servers[1].url


def gen_blob(ids, attn, loss) -> bytes:
    return pack({"input_ids": ids, "attention_mask": attn, "loss_mask": loss})


class Client:
    """What NeMo's client does, from the protocol description: one requests.Session per URL."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url = url
        self.http = requests.Session()
        self.http.trust_env = False
        if headers:
            self.http.headers.update(headers)

    def post(self, endpoint: str, body: bytes = b"", content_type="application/octet-stream"):
        return self.http.post(
            f"{self.url}/{endpoint}", data=body, headers={"Content-Type": content_type}, timeout=60
        )

    def call(self, endpoint: str, body: bytes = b"", **kw) -> bytes:
        r = self.post(endpoint, body, **kw)
        r.raise_for_status()
        return r.content

    def set_vocab_mapping(self, ids, mask):
        self.call("set_vocab_mapping", pack({"selected_token_ids": ids, "selected_token_mask": mask}))

    def generate(self, ids, attn, loss) -> dict:
        return unpack(
            self.call("generate", pack({"input_ids": ids, "attention_mask": attn, "loss_mask": loss}))
        )


def expected(model, sel_mask, args) -> dict:
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(*sel_mask)
    b = local.generate_batch(*args)
    return {
        "aux_hidden_states": b.aux_hidden_states,
        "target_probs": b.target_probs,
        "position_mask": b.position_mask,
        "input_ids": b.input_ids,
        "loss_mask": b.loss_mask,
    }


def assert_exact(got: dict, want: dict):
    assert list(got) == list(want)  # the protocol's order
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_health_model_info_nccl_and_unknown_path(url, model):
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    c = Client(url)
    info = c.post("model_info").json()
    assert info == {"num_hidden_layers": 8, "hidden_size": 32, "vocab_size": 160, "aux_layer_ids": [1, 3, 4]}
    assert c.post("init_nccl", b'{"nccl_port": 8101}', content_type="application/json").json() == {
        "status": "disabled"
    }
    assert c.post("heartbeat").json() == {"status": "ok"}
    r = c.post("no_such_endpoint")
    assert r.status_code == 404
    weight = unpack(c.call("input_embeddings"))["weight"]
    assert weight.dtype == torch.float32 and torch.equal(weight, model.get_input_embeddings().weight)


def test_generate_equals_inprocess(url, model, servers):
    c = Client(url)
    args = inputs()
    r = c.post("generate", gen_blob(*args))
    assert r.status_code == 409 and "POST /set_vocab_mapping first" in r.json()["detail"]
    with pytest.raises(requests.HTTPError):  # what NeMo's client raises: no retry
        r.raise_for_status()
    sel_mask = mapping(160)
    c.set_vocab_mapping(*sel_mask)
    got = c.generate(*args)
    assert_exact(got, expected(model, sel_mask, args))
    assert got["target_probs"].dtype == torch.float32 and got["position_mask"].dtype == torch.bool
    assert got["input_ids"].dtype == torch.int64 and got["position_mask"].shape == (*args[0].shape, 1)
    # the session it opened is an ordinary EAGLE-3 session with the default layers and raw encodings
    mine = [s for s in servers[0].sessions.list() if s.job_name.startswith("nemo-http 127.0.0.1")]
    assert mine and all(s.algorithm == "eagle3" and s.layer_ids == [1, 3, 4] for s in mine)
    assert all(set(s.encodings.values()) == {"raw"} for s in mine)
    assert max(s.stats.requests for s in mine) >= 1
    # its last_seen (shown by /sessions and the status page) follows its requests
    session = max(mine, key=lambda s: s.created)
    before = session.last_seen
    time.sleep(0.05)
    c.generate(*args)
    assert session.last_seen > before + 0.04
    c.call("disconnect", b"{}", content_type="application/json")


def test_clients_keep_their_own_mappings_and_disconnect_alone(url, model, servers):
    maps = {"a": mapping(160, vd=40, seed=1), "b": mapping(160, vd=24, seed=2)}
    clients = {k: Client(url) for k in maps}
    for k, c in clients.items():
        c.set_vocab_mapping(*maps[k])
    results, errors = {k: [] for k in maps}, []

    def job(k):
        try:
            for s in range(3):  # interleaved with the other client and with a gRPC job
                results[k].append(clients[k].generate(*inputs(seed=s)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def grpc_job():
        try:
            with RemoteEagle3TargetModel.from_urls([servers[0].url], job_name="grpc") as remote:
                remote.set_vocab_mapping(*mapping(160, vd=30, seed=3))
                results["grpc"] = [remote.generate_batch(*inputs(seed=s)) for s in range(3)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=job, args=(k,)) for k in maps] + [threading.Thread(target=grpc_job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in maps:
        for s, got in enumerate(results[k]):
            assert_exact(got, expected(model, maps[k], inputs(seed=s)))
    assert torch.equal(
        results["grpc"][0].target_probs,
        expected(model, mapping(160, vd=30, seed=3), inputs())["target_probs"],
    )
    # one client's disconnect closes only its session; the other and the server go on
    assert clients["a"].post("disconnect", b"{}", content_type="application/json").json() == {"status": "ok"}
    r = clients["a"].post("generate", gen_blob(*inputs()))
    assert r.status_code == 409
    assert_exact(clients["b"].generate(*inputs(seed=5)), expected(model, maps["b"], inputs(seed=5)))
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    clients["a"].set_vocab_mapping(*maps["b"])  # a client may come back (NeMo re-sends on resume)
    assert_exact(clients["a"].generate(*inputs()), expected(model, maps["b"], inputs()))
    for c in clients.values():
        c.call("disconnect", b"{}")


def test_identity_survives_reconnects_header_and_cookieless_clients(url, model):
    sel_mask = mapping(160, vd=32, seed=4)
    want = expected(model, sel_mask, inputs())
    # a requests.Session keeps the server's cookie across new connections (idle timeout, pool, retry)
    c = Client(url)
    c.set_vocab_mapping(*sel_mask)
    c.http.close()  # drops its pooled connection: the next request comes from a new port
    assert_exact(c.generate(*inputs()), want)
    # a client that names itself: the same name is the same client, whatever its connection or cookies
    named = [Client(url, {CLIENT_HEADER: "job-7"}) for _ in range(2)]
    named[0].set_vocab_mapping(*sel_mask)
    assert_exact(named[1].generate(*inputs()), want)
    assert Client(url, {CLIENT_HEADER: "bad name"}).post("model_info").status_code == 400
    named[1].call("disconnect")
    # a client without cookies or header is its keep-alive connection
    host, port = url.removeprefix("http://").split(":")
    body = pack({"selected_token_ids": sel_mask[0], "selected_token_mask": sel_mask[1]})
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/set_vocab_mapping", body)
    assert conn.getresponse().read() == b'{"status":"ok"}'
    gen = gen_blob(*inputs())
    conn.request("POST", "/generate", gen)
    assert_exact(unpack(conn.getresponse().read()), want)
    other = http.client.HTTPConnection(host, int(port), timeout=30)
    other.request("POST", "/generate", gen)
    resp = other.getresponse()
    assert resp.status == 409 and b"its connection 127.0.0.1:" in resp.read()
    conn.request("POST", "/disconnect", b"{}")
    conn.getresponse().read()


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(url, model):
    c = Client(url)
    sel_mask = mapping(160)
    c.set_vocab_mapping(*sel_mask)
    args = inputs()
    good = gen_blob(*args)
    want = expected(model, sel_mask, args)
    long_ids = torch.zeros(1, 65, dtype=torch.long)
    cases = [
        ("generate", good[:-5], 400, "truncated NMET blob"),
        ("generate", b"ABCD" + good[4:], 400, "not an NMET blob"),
        ("generate", good[:18] + b"\x63" + good[19:], 400, "unknown dtype code 99"),
        ("generate", good[:20] + struct.pack("<q", 3) + good[28:], 400, "declares"),
        ("generate", good + b"\x00" * 20_000, 413, "over this endpoint's limit"),
        (
            "generate",
            pack({"input_ids": args[0], "attention_mask": args[1]}),
            400,
            r"missing \['loss_mask'\]",
        ),
        (
            "generate",
            pack({"input_ids": long_ids, "attention_mask": long_ids, "loss_mask": long_ids}),
            413,
            "65",
        ),
        (
            "generate",
            pack({"input_ids": args[0].float(), "attention_mask": args[1], "loss_mask": args[2]}),
            400,
            "dtype",
        ),
        (
            "set_vocab_mapping",
            pack({"selected_token_ids": sel_mask[0].int(), "selected_token_mask": sel_mask[1]}),
            400,
            "int64",
        ),
        ("set_vocab_mapping", b"", 400, "truncated"),
    ]
    for endpoint, body, status, message in cases:
        r = c.post(endpoint, body)
        assert r.status_code == status, (endpoint, message, r.status_code, r.text)
        assert re.search(message, r.json()["detail"]), r.json()
        assert_exact(c.generate(*args), want)  # the same client still gets exact answers
    c.call("disconnect")


def test_a_full_queue_makes_generate_wait_not_fail(model):
    """NeMo's client does not retry a refusal, so a full shared queue delays its request instead."""
    import asyncio

    from draftfeed.client.errors import FailedPrecondition, Unavailable
    from draftfeed.server.admission import Admission
    from draftfeed.server.auth import AccessControl, Caller
    from draftfeed.server.nemo_http import _enter, _result
    from draftfeed.server.scheduler import BatchScheduler
    from draftfeed.server.sessions import SessionTable
    from draftfeed.target.backends import forward_for
    from draftfeed.target.capture import discover
    from draftfeed.target.features import TokenBatch

    release = threading.Event()

    def slow_forward(*a):
        release.wait(30)
        return forward_for(*a)

    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    session = table.open("eagle3", mapping=mapping(160))
    sched = BatchScheduler(model, layout, max_queue=1, forward=slow_forward)
    tb = TokenBatch(*inputs())
    first = sched.submit(session, tb)  # the worker takes it and blocks in the forward
    while sched.pending():
        threading.Event().wait(0.01)
    second = sched.submit(session, tb)  # queued: the queue is now full

    admission = Admission(sched, AccessControl(), LIMITS, layout.vocab_size)

    async def third(wait_s):
        return (await _enter(admission, Caller(None), session, tb, wait_s)).future

    with pytest.raises(Unavailable, match="queue stayed full"):
        asyncio.run(third(0.2))
    threading.Timer(0.3, release.set).start()
    fut = asyncio.run(third(10))  # admitted once the worker frees a place
    got = [f.result(30) for f in (first, second, fut)]
    want = HFEagle3TargetModel(model)
    want.set_vocab_mapping(*mapping(160))
    assert torch.equal(got[2].tensors["target_probs.data"], want.generate_batch(*inputs()).target_probs)
    # a request whose session closes while it waits fails instead of waiting for ever
    from concurrent.futures import Future

    threading.Timer(0.2, lambda: table.close(session.id)).start()
    with pytest.raises(FailedPrecondition, match="session was closed"):
        asyncio.run(_result(session, Future()))
    sched.stop()


def test_draining_server_answers_503(model):
    target = TargetServer(ServeConfig(port=0, limits=LIMITS), model=model).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0).start()
    try:
        c = Client(nemo.url)
        sel_mask = mapping(160)
        c.set_vocab_mapping(*sel_mask)
        assert_exact(c.generate(*inputs()), expected(model, sel_mask, inputs()))
        target.stop(grace=1)  # closes every session, the HTTP clients' too
        assert requests.get(f"{nemo.url}/health", timeout=5).status_code == 503
        r = c.post("generate", gen_blob(*inputs()))
        assert r.status_code == 503 and "draining" in r.json()["detail"] and r.headers["Retry-After"] == "1"
        assert nemo.clients.session(f"cookie:{c.http.cookies['draftfeed_client']}") is None
    finally:
        nemo.stop()
        target.stop(grace=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_reply_equals_inprocess(tiny_dirs):
    """On a GPU the reply comes from pinned host buffers after an event; bf16 aux travels as bf16."""
    from transformers import AutoModelForCausalLM

    gpu = AutoModelForCausalLM.from_pretrained(tiny_dirs("llama"), dtype=torch.bfloat16).to("cuda").eval()
    target = TargetServer(ServeConfig(port=0, limits=LIMITS), model=gpu).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0).start()
    try:
        c = Client(nemo.url)
        sel_mask = mapping(160)
        c.set_vocab_mapping(*sel_mask)
        got = c.generate(*inputs())
        want = {k: v.cpu() for k, v in expected(gpu, sel_mask, inputs()).items()}
        assert got["aux_hidden_states"].dtype == torch.bfloat16
        assert_exact(got, want)
        assert unpack(c.call("input_embeddings"))["weight"].dtype == torch.bfloat16
    finally:
        nemo.stop()
        target.stop(grace=0)


def test_serve_config_starts_the_nemo_endpoint(model):
    """`draftfeed serve --nemo-http-port` wiring: the endpoint starts and stops with the server."""
    srv = TargetServer(ServeConfig(port=0, nemo_http_port=0), model=model).start()
    try:
        assert srv.nemo_http is not None
        assert requests.get(f"{srv.nemo_http.url}/health", timeout=10).json() == {"status": "ok"}
    finally:
        srv.stop(grace=1)


# ---- the server's access rules on the NeMo port: tokens, jobs, quotas, loopback, TLS --------------

TOKENS = {
    "nemo-a": "tok-nemo-a-0123456789abcdef",
    "nemo-b": "tok-nemo-b-0123456789abcdef",
    "dspark-only": "tok-dspark-only-0123456789ab",
    "slow": "tok-slow-0123456789abcdef",
    "slower": "tok-slower-0123456789abcdef",
}


@pytest.fixture(scope="module")
def token_server(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("nemo-auth") / "tokens.yaml"
    path.write_text(
        f"nemo-a: {TOKENS['nemo-a']}\n"
        f"nemo-b: {{token: {TOKENS['nemo-b']}, weight: 3}}\n"
        f"dspark-only: {{token: {TOKENS['dspark-only']}, algorithms: [dspark]}}\n"
        f"slow: {{token: {TOKENS['slow']}, tokens_per_s: 12}}\n"  # one 24-token request, then 1 s of debt
        f"slower: {{token: {TOKENS['slower']}, tokens_per_s: 1}}\n"  # 23 s of debt after one request
    )
    target = TargetServer(ServeConfig(port=0, limits=LIMITS, token_file=str(path)), model=model).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0, queue_wait_s=3).start()
    yield target, nemo
    nemo.stop()
    target.stop(grace=1)


def test_a_nemo_clients_session_gets_its_jobs_scheduling_weight(token_server):
    target, nemo = token_server
    weights = {}
    for job in ("nemo-a", "nemo-b"):
        c = Client(with_userinfo(nemo.url, f"{job}:{TOKENS[job]}"))
        c.set_vocab_mapping(*mapping(160))
        weights[job] = [s.weight for s in target.sessions.list() if s.job_name == job]
        c.call("disconnect")
    assert weights == {"nemo-a": [1.0], "nemo-b": [3.0]}  # the token file's, as on the gRPC port


def with_userinfo(url: str, userinfo: str) -> str:
    """`http://host:port` -> `http://USERINFO@host:port`: what a NeMo recipe puts in remote_urls."""
    return url.replace("http://", f"http://{userinfo}@")


def test_token_auth_jobs_and_ownership(token_server, model, caplog):
    caplog.set_level(logging.DEBUG)
    target, nemo = token_server
    url = nemo.url
    sel_mask = mapping(160, vd=36, seed=6)
    want = expected(model, sel_mask, inputs())
    texts = []
    # /health stays open (load balancers carry no token); everything else needs one
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
    for endpoint in (
        "model_info",
        "input_embeddings",
        "init_nccl",
        "set_vocab_mapping",
        "generate",
        "heartbeat",
    ):
        r = Client(url).post(endpoint)
        assert r.status_code == 401, (endpoint, r.status_code, r.text)
        assert "needs a job token" in r.json()["detail"] and "http://JOB:TOKEN@" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Basic")
    r = Client(with_userinfo(url, "nemo-a:" + TOKENS["nemo-a"] + "x")).post("model_info")
    assert r.status_code == 401 and "not valid" in r.json()["detail"]
    texts.append(r.text)
    r = Client(url, {"Authorization": "Digest abc"}).post("model_info")
    assert r.status_code == 400 and "use Basic or Bearer" in r.json()["detail"]

    # an unchanged NeMo client: the token in the URL (requests sends it as Basic auth)
    a = Client(with_userinfo(url, f"nemo-a:{TOKENS['nemo-a']}"))
    assert a.post("model_info").json()["vocab_size"] == 160
    a.set_vocab_mapping(*sel_mask)
    assert_exact(a.generate(*inputs()), want)
    # the session is recorded under the token's job, whatever the client calls itself
    assert {s.job_name for s in target.sessions.list()} == {"nemo-a"}
    # the token alone as the URL's user (`TOKEN:`; requests sends no auth for a user without a colon),
    # or as a Bearer header
    assert Client(with_userinfo(url, TOKENS["nemo-b"] + ":")).post("model_info").status_code == 200
    bearer = Client(url, {"Authorization": f"Bearer {TOKENS['nemo-b']}"})
    assert bearer.post("init_nccl", b'{"nccl_port": 1}').json() == {"status": "disabled"}

    # a job cannot reach another job's session: not by the same client name, not with its cookie
    named_a = Client(url, {CLIENT_HEADER: "shared", "Authorization": f"Bearer {TOKENS['nemo-a']}"})
    named_b = Client(url, {CLIENT_HEADER: "shared", "Authorization": f"Bearer {TOKENS['nemo-b']}"})
    named_a.set_vocab_mapping(*sel_mask)
    r = named_b.post("generate", gen_blob(*inputs()))
    assert r.status_code == 409 and "job 'nemo-b'" in r.json()["detail"]
    stolen = Client(url, {"Authorization": f"Bearer {TOKENS['nemo-b']}"})
    stolen.http.cookies.set("draftfeed_client", a.http.cookies["draftfeed_client"])
    assert stolen.post("generate", gen_blob(*inputs())).status_code == 409
    other = mapping(160, vd=20, seed=7)
    named_b.set_vocab_mapping(*other)
    assert_exact(named_b.generate(*inputs()), expected(model, other, inputs()))
    assert_exact(named_a.generate(*inputs()), want)  # unchanged by the other job's mapping
    assert_exact(a.generate(*inputs()), want)
    # a job limited to other algorithms may not open the EAGLE-3 session this protocol needs
    r = Client(url, {"Authorization": f"Bearer {TOKENS['dspark-only']}"}).post(
        "set_vocab_mapping", pack({"selected_token_ids": sel_mask[0], "selected_token_mask": sel_mask[1]})
    )
    assert r.status_code == 403 and "may not open 'eagle3'" in r.json()["detail"]
    texts.append(r.text)
    for c in (a, named_a, named_b):
        c.call("disconnect", b"{}")
    texts.append(caplog.text)
    for text in texts:
        for token in TOKENS.values():
            assert token[4:] not in text


def test_quota_makes_generate_wait_then_gives_up(token_server, model):
    """A request over its job's tokens/s waits for the bucket (their client does not retry a
    refusal) and is answered; one that would wait past the server's queue wait is a 503."""
    _, nemo = token_server
    sel_mask = mapping(160)
    want = expected(model, sel_mask, inputs())
    slow = Client(nemo.url, {"Authorization": f"Bearer {TOKENS['slow']}"})
    slow.set_vocab_mapping(*sel_mask)
    assert_exact(slow.generate(*inputs()), want)  # 24 tokens at 12 tokens/s: 1 s of debt
    t0 = time.monotonic()
    assert_exact(slow.generate(*inputs()), want)
    assert time.monotonic() - t0 >= 0.8
    slower = Client(nemo.url, {"Authorization": f"Bearer {TOKENS['slower']}"})
    slower.set_vocab_mapping(*sel_mask)
    assert_exact(slower.generate(*inputs()), want)  # 23 s of debt, over the 3 s this server waits
    r = slower.post("generate", gen_blob(*inputs()))
    assert r.status_code == 503 and "over its quota" in r.json()["detail"]
    assert_exact(slow.generate(*inputs()), want)  # a refused request leaves no charge behind
    for c in (slow, slower):
        c.call("disconnect", b"{}")


def test_loopback_rule_without_a_token_file(servers, model):
    """Without a token file the NeMo port answers only the trusted (loopback) networks, as gRPC does."""
    target, nemo = servers
    saved = target.access
    try:
        target.access = AccessControl(None, allow_remote=False, trusted_networks=("127.0.0.2/32",))
        r = Client(nemo.url).post("model_info")
        assert r.status_code == 403 and "answers only clients on its own machine" in r.json()["detail"]
        assert requests.get(f"{nemo.url}/health", timeout=5).status_code == 200
        target.access = AccessControl(None, allow_remote=True, trusted_networks=("127.0.0.2/32",))
        assert Client(nemo.url).post("model_info").status_code == 200
    finally:
        target.access = saved


def test_tls_and_mutual_tls_on_the_nemo_port(model, pki):  # noqa: F811 - the fixture
    sel_mask = mapping(160)
    want = expected(model, sel_mask, inputs())
    tls = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    srv = TargetServer(ServeConfig(port=0, nemo_http_port=0, limits=LIMITS, **tls), model=model).start()
    try:
        url = srv.nemo_http.url
        assert url.startswith("https://127.0.0.1:")
        c = Client(url)
        c.http.verify = pki["ca_cert"]  # what REQUESTS_CA_BUNDLE does for an unchanged NeMo client
        c.set_vocab_mapping(*sel_mask)
        assert_exact(c.generate(*inputs()), want)
        with pytest.raises(requests.exceptions.SSLError):
            Client(url).post("model_info")  # a client that does not trust the CA
        with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            # plaintext to a TLS port: refused, or (asyncio's 60 s TLS handshake timeout) never answered
            plain = Client(url.replace("https://", "http://"))
            plain.http.post(f"{plain.url}/model_info", data=b"", timeout=5).raise_for_status()
    finally:
        srv.stop(grace=0)
    srv = TargetServer(
        ServeConfig(port=0, nemo_http_port=0, limits=LIMITS, tls_client_ca=pki["ca_cert"], **tls), model=model
    ).start()
    try:
        c = Client(srv.nemo_http.url)
        c.http.verify = pki["ca_cert"]
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            c.post("model_info")  # no client certificate
        c.http.cert = (pki["client_cert"], pki["client_key"])
        c.set_vocab_mapping(*sel_mask)
        assert_exact(c.generate(*inputs()), want)
    finally:
        # with the client's TLS connection still open (keep-alive), the stop does not wait for
        # asyncio's 30 s TLS shutdown timeout
        t0 = time.monotonic()
        srv.stop(grace=0)
        assert time.monotonic() - t0 < 10


def test_errors_travel_in_the_reason_phrase_that_nemos_client_shows(url, model):
    c = Client(url)
    r = c.post("generate", gen_blob(*inputs()))  # before /set_vocab_mapping
    assert r.status_code == 409 and r.reason.startswith("no vocab mapping for this client yet")
    with pytest.raises(requests.HTTPError, match="409 Client Error: no vocab mapping for this client yet"):
        r.raise_for_status()  # all their client shows
    assert "x-draftfeed-reason" not in r.headers and "no vocab mapping" in r.json()["detail"]
    c.set_vocab_mapping(*mapping(160))
    r = c.post("generate", gen_blob(*inputs())[:-5])
    assert r.status_code == 400 and "truncated NMET blob" in r.reason
    bad = pack({"\u00e9\r\n" * 300: inputs()[0]})  # non-ASCII and line breaks: a one-line ASCII reason
    r = c.post("generate", bad)
    assert r.status_code == 400 and r.reason.isascii() and "\n" not in r.reason and len(r.reason) <= 1024
    assert_exact(c.generate(*inputs()), expected(model, mapping(160), inputs()))
    c.call("disconnect")


def test_an_authorization_header_without_scheme_is_never_echoed(token_server, caplog):
    caplog.set_level(logging.DEBUG)
    url = token_server[1].url
    r = Client(url, {"Authorization": TOKENS["nemo-a"]}).post("model_info")
    assert r.status_code == 400 and "use Basic or Bearer" in r.json()["detail"]
    for text in (r.text, r.reason, caplog.text):
        assert TOKENS["nemo-a"][:8] not in text and TOKENS["nemo-a"][-8:] not in text


def test_a_client_that_disconnects_mid_body_is_one_info_line(url, caplog):
    import socket

    caplog.set_level(logging.INFO, logger="draftfeed.nemo_http")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    deadline = time.monotonic() + 60
    while "disconnected before sending the whole request" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_a_clean_stop_of_the_nemo_and_admin_ports_logs_no_traceback(model, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # uvicorn's own loggers do not propagate: their lines are on stderr
    target = TargetServer(ServeConfig(port=0, admin_port=0, limits=LIMITS), model=model).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0).start()
    try:
        assert Client(nemo.url).post("model_info").status_code == 200
        status = requests.get(f"http://127.0.0.1:{target.admin.port}/status.json", timeout=10).json()
        assert status["load"]["series"]  # the admin port's status sampler runs
    finally:
        nemo.stop()
        target.stop(grace=0)
    assert "CancelledError" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "CancelledError" not in err, err


def test_client_caps_and_eviction_stay_within_one_job(token_server, model):
    """One job opening many clients closes only its own least recent ones; another job's client
    survives and keeps its answers (the issue: 256 clients of one job evicted another job's)."""
    target, _ = token_server
    nemo = NemoHTTPServer(target, "127.0.0.1", 0, max_clients=5, max_clients_per_job=3).start()
    try:
        url_a = with_userinfo(nemo.url, f"nemo-a:{TOKENS['nemo-a']}")
        url_b = with_userinfo(nemo.url, f"nemo-b:{TOKENS['nemo-b']}")
        maps = {"a": mapping(160, vd=40, seed=7), "b": mapping(160, vd=24, seed=8)}
        b = Client(url_b)
        b.set_vocab_mapping(*maps["b"])
        flood = [Client(url_a) for _ in range(12)]  # more than the job's cap and the server's
        for c in flood:
            c.set_vocab_mapping(*maps["a"])
        assert_exact(b.generate(*inputs()), expected(model, maps["b"], inputs()))  # b's session survived
        assert_exact(flood[-1].generate(*inputs()), expected(model, maps["a"], inputs()))
        assert flood[0].post("generate", gen_blob(*inputs())).status_code == 409  # a's oldest went
        jobs = [s.job_name for s in target.sessions.list()]
        assert jobs.count("nemo-a") == 3 and jobs.count("nemo-b") == 1
        # the server is full (5): a job makes room among its own clients, never another job's
        b2, b3 = Client(url_b), Client(url_b)
        b2.set_vocab_mapping(*maps["b"])  # the 5th
        b3.set_vocab_mapping(*maps["b"])  # closes job b's least recent client, b
        assert b.post("generate", gen_blob(*inputs())).status_code == 409
        slow = Client(with_userinfo(nemo.url, f"slow:{TOKENS['slow']}"))
        r = slow.post(
            "set_vocab_mapping",
            pack({"selected_token_ids": maps["b"][0], "selected_token_mask": maps["b"][1]}),
        )
        assert r.status_code == 503 and "cap" in r.json()["detail"]  # a job with no client here: no room
        assert [s.job_name for s in target.sessions.list()].count("nemo-a") == 3
        for c in (b2, b3, *flood):
            c.post("disconnect", b"{}")
    finally:
        nemo.stop()


def test_a_busy_server_answers_429_and_a_request_too_large_413():
    """Limits on requests at once (a queue, a job's replies in flight, a job's clients) are `Busy`: the same
    request fits later, so HTTP says 429 (with Retry-After, as 503 does); a request over a size limit never
    fits: 413. On gRPC both stay RESOURCE_EXHAUSTED."""
    import grpc

    from draftfeed.client.errors import Busy, ResourceExhausted
    from draftfeed.server.nemo_http import _status_of

    assert _status_of(Busy("queue full")) == 429 and _status_of(ResourceExhausted("too big")) == 413
    assert Busy.code == ResourceExhausted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
