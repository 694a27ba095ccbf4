"""Per-job tokens on a real server: missing/wrong tokens, session ownership, algorithms, quotas;
tokens never leak into logs, metrics or /sessions; without a token file only loopback is answered."""

from __future__ import annotations

import json
import logging
import time

import grpc
import pytest
import requests
from test_backends import inputs, mapping
from test_service import assert_same, start_server

from draftfeed.client.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.client.wire import ReplyAssembler, TargetStub, tensor_to_proto
from draftfeed.server.auth import AccessControl, Caller, is_loopback_peer, load_token_file
from draftfeed.target.backends import HFDSparkTargetModel

TOKENS = {
    "eagle-a": "tok-eagle-a-0123456789abcdef",
    "dspark-b": "tok-dspark-b-0123456789abcdef",
    "slow-c": "tok-slow-c-0123456789abcdef",
}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    path.write_text(
        f"eagle-a: {TOKENS['eagle-a']}\n"
        "dspark-b:\n"
        f"  token: {TOKENS['dspark-b']}\n"
        "  algorithms: [dspark, dflash]\n"
        "slow-c:\n"
        f"  token: {TOKENS['slow-c']}\n"
        "  tokens_per_s: 40\n"
        "  max_in_flight: 1\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def server(model, token_file):
    srv = start_server(model, admin_port=0, token_file=token_file)
    yield srv
    srv.stop(grace=1)


def _raw(server, method, request, token=None, **kw):
    stub = TargetStub(grpc.insecure_channel(server.url.removeprefix("grpc://")))
    md = (("authorization", f"Bearer {token}"),) if token else ()
    out = getattr(stub, method)(request, timeout=30, metadata=md, **kw)
    return list(ReplyAssembler().replies(out)) if method == "Generate" else out


def _generate_request(session_id):
    ids, attn, loss = inputs()
    return pb.GenerateRequest(
        session_id=session_id,
        input_ids=tensor_to_proto(ids),
        attention_mask=tensor_to_proto(attn),
        loss_mask=tensor_to_proto(loss),
    )


def test_token_file_parsing(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"a": {"token_sha256": "ab" * 32, "max_in_flight": 2}, "b": "x" * 20}))
    jobs = load_token_file(path)
    assert jobs["a"].max_in_flight == 2 and jobs["a"].token_sha256 == bytes.fromhex("ab" * 32)
    assert "x" * 20 not in repr(jobs)
    for text, message in [
        ("a: short", "shorter than 16"),
        (f"a: {'y' * 20}\nb: {'y' * 20}\n", "share a token"),
        (f"a: {{token: {'y' * 20}, rate: 3}}", "unknown keys"),
        (f"a: {{token: {'y' * 20}, tokens_per_s: -1}}", "tokens_per_s must be"),
        ("[1, 2]", "expected a table"),
    ]:
        path = tmp_path / "t.yaml"
        path.write_text(text)
        with pytest.raises(InvalidArgument, match=message):
            load_token_file(path)


def test_a_token_file_that_does_not_parse_never_shows_its_text(tmp_path):
    token = "s3cret-token-0123456789abcdef"
    cases = [
        (f'job-a: {token}\njob-b: "{token}x\n', "t.yaml", "line 3"),
        (f"job-a: {token}\n  - {token}y: [\n", "t.yaml", "line 2, column"),
        (f"job-a: {{token: {token}, x: [}}\n", "t.yaml", "line 1, column"),
        (f"job-a:\n\ttoken: {token}\n", "t.yaml", "line 2, column 1"),
        (f'{{"job-a": "{token}",}}', "t.json", "line 1, column"),
    ]
    for text, name, where in cases:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(InvalidArgument, match="does not parse") as err:
            load_token_file(path)
        assert where in str(err.value) and "text not shown" in str(err.value)
        assert token[:6] not in str(err.value) and token[-6:] not in str(err.value), str(err.value)


def test_missing_and_wrong_tokens(server):
    with pytest.raises(Unauthenticated, match="needs a job token"):
        RemoteDSparkTargetModel.from_urls([server.url])
    with pytest.raises(Unauthenticated, match="not valid") as err:
        RemoteDSparkTargetModel.from_urls([server.url], token="tok-guessed-0123456789abcdef")
    assert "guessed" not in str(err.value)
    with pytest.raises(grpc.RpcError) as e:
        _raw(server, "OpenSession", pb.OpenSessionRequest(algorithm="dspark"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # health stays open (probes and HEALTHCHECK carry no token)
    from draftfeed.client.channel import check_health

    assert check_health(server.url) == "SERVING"


def test_a_job_cannot_touch_another_jobs_session(server, model):
    sel, mask = mapping(160)
    with RemoteEagle3TargetModel.from_urls([server.url], token=TOKENS["eagle-a"], job_name="whatever") as a:
        a.set_vocab_mapping(sel, mask)
        a.generate_batch(*inputs())
        sid = a.servers[0].session_id
        session = server.sessions.get(sid)
        assert session.job_name == "eagle-a"  # the token's job, not the name the client asked for
        bad = TOKENS["dspark-b"]
        for method, request in [
            ("Generate", _generate_request(sid)),
            ("CloseSession", pb.CloseSessionRequest(session_id=sid)),
            (
                "SetVocabMapping",
                pb.SetVocabMappingRequest(
                    session_id=sid,
                    selected_token_ids=tensor_to_proto(sel),
                    selected_token_mask=tensor_to_proto(mask),
                ),
            ),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                _raw(server, method, request, token=bad)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert "belongs to another job" in e.value.details()
        assert a.generate_batch(*inputs()).target_probs is not None  # still a's, still working
    with pytest.raises(PermissionDenied, match="may not open 'eagle3' sessions"):
        RemoteEagle3TargetModel.from_urls([server.url], token=TOKENS["dspark-b"])
    with RemoteDSparkTargetModel.from_urls([server.url], token=TOKENS["dspark-b"]) as b:
        assert_same(b.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs()))


def test_tokens_per_second_quota(server, model):
    # 40 tokens/s with 1 s of burst. The bucket is drained through the server's own admission (80 tokens
    # leave it 1 s in debt) rather than by timed requests, which a slow CI machine refills while they run.
    with RemoteDSparkTargetModel.from_urls([server.url], token=TOKENS["slow-c"]) as c:
        sid = c.servers[0].session_id
        time.sleep(1.1)  # a full bucket
        c.generate_batch(*inputs())  # 24 tokens pass out of a full bucket
        server.access.admit(Caller(server.access.jobs["slow-c"]), 56)()  # the rest, plus 1 s of debt
        with pytest.raises(grpc.RpcError) as e:
            _raw(server, "Generate", _generate_request(sid), token=TOKENS["slow-c"])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over its quota of 40 tokens/s; retry in" in e.value.details()
        hint = dict(e.value.trailing_metadata())["retry-after-ms"]
        assert 0 < int(hint) <= 1200
        # the client waits as told: 4 more requests (96 tokens) at 40 tokens/s take >= ~1.5 s
        t0 = time.perf_counter()
        for s in range(4):
            assert_same(
                c.generate_batch(*inputs(seed=s)), HFDSparkTargetModel(model).generate_batch(*inputs(seed=s))
            )
        assert time.perf_counter() - t0 > 1.2


def test_in_flight_quota_and_async_clients(server, model):
    access = server.access
    caller = Caller(access.jobs["slow-c"])
    time.sleep(1.1)
    release = access.admit(caller, 1)
    with pytest.raises(ResourceExhausted, match="1 requests in flight") as err:
        access.admit(caller, 1)
    assert err.value.retry_after_s > 0
    release()
    release()  # idempotent
    assert access.in_flight("slow-c") == 0
    access.admit(caller, 1)(refund=True)
    # a streaming client with 3 in flight against a limit of 1: the extras are told to retry and succeed
    with RemoteDSparkTargetModel.from_urls([server.url], token=TOKENS["slow-c"], max_in_flight=3) as c:
        futures = [c.generate_batch_async(*inputs(seed=s)) for s in range(3)]
        for s, fut in enumerate(futures):
            assert_same(fut.result(timeout=60), HFDSparkTargetModel(model).generate_batch(*inputs(seed=s)))
    assert access.in_flight("slow-c") == 0


def test_tokens_never_leak(server, caplog):
    caplog.set_level(logging.DEBUG)
    with RemoteDFlashTargetModel.from_urls(
        [server.url], token=TOKENS["dspark-b"], job_name="leak-check"
    ) as b:
        b.generate_batch(*inputs())
        with pytest.raises(Unauthenticated):
            RemoteDFlashTargetModel.from_urls([server.url], token=TOKENS["eagle-a"] + "x")
        base = f"http://127.0.0.1:{server.admin.port}"
        texts = [
            caplog.text,
            requests.get(f"{base}/metrics", timeout=5).text,
            requests.get(f"{base}/sessions", timeout=5).text,
            repr(b.security),
            requests.get(f"{base}/status.json", timeout=5).text,
            requests.get(f"{base}/status", timeout=5).text,
        ]
    assert "dspark-b" in texts[1] and "dspark-b" in texts[2] and "dspark-b" in texts[4]
    for text in texts:
        for token in TOKENS.values():
            assert token[4:] not in text


def test_loopback_only_without_a_token_file(model):
    assert is_loopback_peer("ipv4:127.0.0.1:5000") and is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("ipv6:%5B::ffff:127.0.0.1%5D:5000") and is_loopback_peer("unix:/tmp/s")
    assert not is_loopback_peer("ipv4:10.1.2.3:5000") and not is_loopback_peer("ipv6:[2001:db8::1]:5000")
    srv = start_server(model, admin_port=0)
    admin = f"http://127.0.0.1:{srv.admin.port}"
    try:
        assert "only clients on this machine" in srv.access.describe
        with RemoteDSparkTargetModel.from_urls([srv.url]) as remote:
            remote.generate_batch(*inputs())
        assert requests.get(f"{admin}/metrics", timeout=5).status_code == 200
        # a server whose only trusted network excludes this client: the same refusal a remote host gets,
        # on the gRPC port and on the admin port (which takes no token)
        strict = AccessControl(None, allow_remote=False, trusted_networks=("127.0.0.2/32",))
        srv.access = srv.servicer.access = srv.servicer.directory.access = strict
        with pytest.raises(PermissionDenied, match="answers only clients on its own machine"):
            RemoteDSparkTargetModel.from_urls([srv.url])
        for path in ("/metrics", "/sessions", "/readyz", "/status.json"):
            r = requests.get(f"{admin}{path}", timeout=5)
            assert r.status_code == 403 and "answers only clients on its own machine" in r.json()["error"], (
                path
            )
        open_ = AccessControl(None, allow_remote=True, trusted_networks=("127.0.0.2/32",))
        srv.access = srv.servicer.access = srv.servicer.directory.access = open_
        assert "NO authentication" in open_.describe
        with RemoteDSparkTargetModel.from_urls([srv.url]) as remote:
            assert remote.generate_batch(*inputs()).target_hidden_states.shape[0] == 2
        assert requests.get(f"{admin}/metrics", timeout=5).status_code == 200
    finally:
        srv.stop(grace=0)


def test_scheduling_weights_come_from_the_operator(model, tmp_path):
    """Issue 16.3: a job's weight is the token file's; a client can ask only for less, so one asking
    weight=inf (or 1e300) does not lead every batch and starve another job."""
    import threading

    from test_service import _HeldForward, _wait_for

    path = tmp_path / "tokens.yaml"
    tokens = {"greedy": "tok-greedy-0123456789abcdef", "modest": "tok-modest-0123456789abcdef"}
    path.write_text(
        f"greedy: {tokens['greedy']}\nmodest: {tokens['modest']}\n"
        f"heavy:\n  token: tok-heavy-0123456789abcdef\n  weight: 4\n"
    )
    for text, message in [
        (f"a: {{token: {'y' * 20}, weight: 1000}}", "weight must be a number in \\[0.01, 100\\]"),
        (f"a: {{token: {'y' * 20}, weight: .nan}}", "weight must be a number"),
        (f"a: {{token: {'y' * 20}, weight: true}}", "weight must be a number"),
    ]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(InvalidArgument, match=message):
            load_token_file(tmp_path / "bad.yaml")
    srv = start_server(model, token_file=str(path), max_forward_tokens=24)  # one request per forward
    held = _HeldForward()
    srv.scheduler._forward = held
    try:

        def open_session(job, token, weight=0.0):
            req = pb.OpenSessionRequest(algorithm="dspark", weight=weight)
            return _raw(srv, "OpenSession", req, token).session_id

        weights = {
            w: srv.sessions.get(open_session("greedy", tokens["greedy"], w)).weight
            for w in (float("inf"), 1e300, 0.5, 1e-300, 0.0)
        }
        assert weights == {float("inf"): 1.0, 1e300: 1.0, 0.5: 0.5, 1e-300: 0.01, 0.0: 1.0}
        heavy = open_session("heavy", "tok-heavy-0123456789abcdef")
        assert srv.sessions.get(heavy).weight == 4.0
        assert srv.sessions.get(open_session("heavy", "tok-heavy-0123456789abcdef", 1e9)).weight == 4.0
        with pytest.raises(grpc.RpcError) as e:
            open_session("greedy", tokens["greedy"], float("nan"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.value.details()

        greedy = open_session("greedy", tokens["greedy"], float("inf"))
        modest = open_session("modest", tokens["modest"])
        stub = TargetStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
        done: list[str] = []

        def call(session_id, token, name):
            out = stub.Generate(
                _generate_request(session_id), timeout=60, metadata=(("authorization", f"Bearer {token}"),)
            )
            threading.Thread(target=lambda: (list(ReplyAssembler().replies(out)), done.append(name))).start()

        call(greedy, tokens["greedy"], "blocker")
        assert held.entered.wait(30)
        for _ in range(20):  # 24 tokens each: one request per forward
            call(greedy, tokens["greedy"], "greedy")
        _wait_for(lambda: srv.scheduler.pending() == 20, "the greedy job's requests to queue")
        call(modest, tokens["modest"], "modest")
        _wait_for(lambda: srv.scheduler.pending() == 21, "the modest job's request to queue")
        held.go.set()
        _wait_for(lambda: len(done) == 22, "every request to be answered", timeout=120)
        # served after at most one more greedy request, not after the 20 queued before it
        assert done.index("modest") <= 2, done
    finally:
        held.go.set()
        srv.stop(grace=1)
