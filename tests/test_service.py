"""A real gRPC server on an ephemeral localhost port, real clients, tiny models: remote == in-process."""

from __future__ import annotations

import json
import logging
import threading

import grpc
import pytest
import requests
import torch
from test_backends import inputs, mapping
from test_packing import packed_inputs

from draftfeed.client.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.target.backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from draftfeed.target.checks import Limits


def start_server(model, **cfg):
    cfg = ServeConfig(**{"port": 0, **cfg})
    return TargetServer(cfg, model=model).start()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model):
    srv = start_server(
        model, admin_port=0, limits=Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=256)
    )
    yield srv
    srv.stop(grace=1)


def assert_same(a, b):
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype, k
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("packed", [False, True])
def test_remote_equals_inprocess(server, model, packed):
    args = packed_inputs() if packed else inputs()
    sel, mask = mapping(160)
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(sel, mask)
    with RemoteEagle3TargetModel.from_urls([server.url], job_name="eagle") as remote:
        assert remote.aux_layer_ids == local.aux_layer_ids
        with pytest.raises(FailedPrecondition, match="vocab mapping"):
            remote.generate_batch(*args)
        remote.set_vocab_mapping(sel, mask)
        assert_same(remote.generate_batch(*args), local.generate_batch(*args))
        assert torch.equal(remote.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with RemoteDFlashTargetModel.from_urls(
        [server.url], target_layer_ids=[1, 4, 6], capture_logits=True
    ) as remote:
        assert_same(
            remote.generate_batch(*args), HFDFlashTargetModel(model, [1, 4, 6], True).generate_batch(*args)
        )
        assert torch.equal(remote.get_output_embeddings().weight, model.get_output_embeddings().weight)
    with RemoteDSparkTargetModel.from_urls([server.url]) as remote:
        local = HFDSparkTargetModel(model)
        assert remote.target_layer_ids == local.target_layer_ids
        assert_same(remote.generate_batch(*args), local.generate_batch(*args))


def test_async_keeps_several_in_flight(server, model):
    local = HFDSparkTargetModel(model, [0, 3])
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=[0, 3], max_in_flight=3) as remote:
        assert remote.supports_async
        batches = [inputs(seed=i) for i in range(6)]
        futures = [remote.generate_batch_async(*b) for b in batches]
        # the in-process forward of the same model runs while the server's worker does (hooks must not mix)
        for fut, b in zip(futures, batches, strict=True):
            assert_same(fut.result(timeout=60), local.generate_batch(*b))


def test_async_from_several_threads_gets_each_its_own_answer(server, model):
    """Threads sharing one client and one stream: every future gets the reply to its own request."""
    local = HFDSparkTargetModel(model, [0, 3])
    got, errors = {}, []
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=[0, 3], max_in_flight=4) as remote:

        def submit(t):
            try:
                futures = {s: remote.generate_batch_async(*inputs(seed=s)) for s in range(t * 4, t * 4 + 4)}
                got.update({s: f.result(timeout=60) for s, f in futures.items()})
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert sorted(got) == list(range(12))
    for s, batch in got.items():
        assert_same(batch, local.generate_batch(*inputs(seed=s)))


def test_concurrent_sessions_get_their_own_answers(server, model):
    maps = [mapping(160, vd=30, seed=1), mapping(160, vd=50, seed=2)]
    results, errors = {}, []

    def job(i):
        try:
            with RemoteEagle3TargetModel.from_urls(
                [server.url], aux_layer_ids=[[1, 3, 4], [0, 2, 5]][i]
            ) as remote:
                remote.set_vocab_mapping(*maps[i])
                results[i] = [remote.generate_batch(*inputs(seed=s)) for s in range(3)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def dflash_job():
        try:
            with RemoteDFlashTargetModel.from_urls([server.url]) as remote:
                results["dflash"] = [remote.generate_batch(*inputs(seed=s)) for s in range(3)]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in (0, 1)] + [
        threading.Thread(target=dflash_job)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in (0, 1):
        local = HFEagle3TargetModel(model, [[1, 3, 4], [0, 2, 5]][i])
        local.set_vocab_mapping(*maps[i])
        for s, got in enumerate(results[i]):
            assert_same(got, local.generate_batch(*inputs(seed=s)))
    local = HFDFlashTargetModel(model)
    for s, got in enumerate(results["dflash"]):
        assert_same(got, local.generate_batch(*inputs(seed=s)))


def test_client_survives_a_server_restart(model):
    first = start_server(model)
    port = first.port
    remote = RemoteEagle3TargetModel.from_urls([first.url])
    sel, mask = mapping(160)
    remote.set_vocab_mapping(sel, mask)
    before = remote.generate_batch(*inputs())
    first.stop(grace=0)
    second = start_server(model, port=port)
    try:
        after = remote.generate_batch(*inputs())  # NOT_FOUND -> re-open with the kept mapping -> retry
        assert_same(before, after)
    finally:
        remote.close()
        second.stop(grace=0)


def _generate_request(session_id, ids, attn, loss=None):
    """A raw GenerateRequest; without `loss`, its loss_mask is left out."""
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import tensor_to_proto

    req = pb.GenerateRequest(
        session_id=session_id, input_ids=tensor_to_proto(ids), attention_mask=tensor_to_proto(attn)
    )
    if loss is not None:
        req.loss_mask.CopyFrom(tensor_to_proto(loss))
    return req


def _stub_call(server, method, request):
    from draftfeed.client.wire import ReplyAssembler, TargetStub

    stub = TargetStub(grpc.insecure_channel(server.url.removeprefix("grpc://")))
    call = getattr(stub, method)
    out = call(request, timeout=30)
    return list(ReplyAssembler().replies(out)) if method == "Generate" else out


def test_bad_inputs_get_their_status(server, model):
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import tensor_to_proto

    remote = RemoteEagle3TargetModel.from_urls([server.url])
    remote.set_vocab_mapping(*mapping(160))
    ids, attn, loss = inputs()
    cases = [
        ((ids.float(), attn, loss), InvalidArgument, "input_ids has dtype float32"),
        ((ids[0], attn, loss), InvalidArgument, "rank 2"),
        ((ids, attn[:, :4], loss), InvalidArgument, "attention_mask has shape"),
        ((ids.clone().fill_(999), attn, loss), InvalidArgument, "token id 999, outside the target vocab"),
        (
            (torch.zeros(9, 4, dtype=torch.long),) + (torch.ones(9, 4, dtype=torch.long),) * 2,
            ResourceExhausted,
            "batch size 9",
        ),
        (
            (torch.zeros(1, 65, dtype=torch.long),) + (torch.ones(1, 65, dtype=torch.long),) * 2,
            ResourceExhausted,
            "sequence length 65",
        ),
        (
            (torch.zeros(5, 60, dtype=torch.long),) + (torch.ones(5, 60, dtype=torch.long),) * 2,
            ResourceExhausted,
            "5x60 = 300 tokens is over this server's per-request limit of 256",
        ),
        ((ids.clone().fill_(-1), attn, loss), InvalidArgument, "token id -1, outside the target vocab"),
        ((ids, attn, loss.float()), InvalidArgument, "loss_mask has dtype float32"),
        ((ids, attn, loss[:1]), InvalidArgument, "loss_mask has shape"),
        ((ids, attn * 2, loss), InvalidArgument, "attention_mask must hold only 0 and 1"),
        ((ids, attn, loss, torch.zeros(2, 5, dtype=torch.long)), InvalidArgument, "position_ids has shape"),
    ]
    for args, cls, message in cases:
        with pytest.raises(cls, match=message):
            remote.generate_batch(*args)
    with pytest.raises(InvalidArgument, match="aux layer id 40 is out of range"):
        RemoteEagle3TargetModel.from_urls([server.url], aux_layer_ids=[1, 2, 40])
    with pytest.raises(InvalidArgument, match="unknown encoding"):
        RemoteEagle3TargetModel.from_urls([server.url], encodings={"hidden": "gzip"})
    with pytest.raises(InvalidArgument, match="vocab of 160"):
        remote.set_vocab_mapping(torch.arange(5), torch.zeros(100, dtype=torch.bool))
    # on the stream, a bad request fails alone; the ones around it get their exact answers
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(*mapping(160))
    futures = [
        remote.generate_batch_async(*inputs(seed=1)),
        remote.generate_batch_async(ids.clone().fill_(999), attn, loss),
        remote.generate_batch_async(*inputs(seed=2)),
    ]
    with pytest.raises(InvalidArgument, match="token id 999"):
        futures[1].result(timeout=60)
    assert_same(futures[0].result(timeout=60), local.generate_batch(*inputs(seed=1)))
    assert_same(futures[2].result(timeout=60), local.generate_batch(*inputs(seed=2)))
    # raw protocol: a missing field, unknown session, unknown algorithm, layer ids, mapping checks
    req = _generate_request(remote.servers[0].session_id, ids, attn)  # no loss_mask
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "Generate", req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateRequest.loss_mask is missing" in e.value.details()
    req = _generate_request("nope", ids, attn, loss)
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "Generate", req)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown session" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="medusa"))
    assert (
        e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "eagle3, dflash, dspark" in e.value.details()
    )
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="dspark", layer_ids=[5, 2]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "strictly increasing" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="eagle3", layer_ids=[1, 2, 40]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "40" in e.value.details()
    dflash = _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="dflash")).session_id
    bad_mapping = pb.SetVocabMappingRequest(
        session_id=dflash,
        selected_token_ids=tensor_to_proto(mapping(160)[0]),
        selected_token_mask=tensor_to_proto(mapping(160)[1]),
    )
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "SetVocabMapping", bad_mapping)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "EAGLE-3 sessions" in e.value.details()
    _stub_call(server, "CloseSession", pb.CloseSessionRequest(session_id=dflash))
    eagle = _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="eagle3")).session_id
    req = _generate_request(eagle, ids, attn, loss)
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "Generate", req)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "generate before a vocab mapping" in e.value.details()
    _stub_call(server, "CloseSession", pb.CloseSessionRequest(session_id=eagle))
    # the server keeps serving
    assert remote.generate_batch(ids, attn, loss).target_probs is not None
    remote.close()
    with pytest.raises(grpc.RpcError) as e:
        _stub_call(server, "CloseSession", pb.CloseSessionRequest(session_id="gone"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_tiny_chunks_round_trip(model):
    srv = start_server(model, max_chunk_bytes=1024)
    try:
        with RemoteDFlashTargetModel.from_urls([srv.url], capture_logits=True) as remote:
            got = remote.generate_batch(*inputs())  # logits: 2x12x160 fp32 = 15 KiB -> 15+ chunks
        assert_same(got, HFDFlashTargetModel(model, capture_logits=True).generate_batch(*inputs()))
    finally:
        srv.stop(grace=0)


def test_health_reflection_and_admin(server, caplog):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    caplog.set_level(logging.INFO, logger="draftfeed.sessions")
    channel = grpc.insecure_channel(server.url.removeprefix("grpc://"))
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="draftfeed.v1.TargetService")).status == 1
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for s in answer.list_services_response.service}
    assert {"draftfeed.v1.TargetService", "grpc.health.v1.Health"} <= services
    (answer,) = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="draftfeed.v1.TargetService")])
    )
    assert b"GenerateStream" in answer.file_descriptor_response.file_descriptor_proto[0]
    base = f"http://127.0.0.1:{server.admin.port}"
    assert requests.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(f"{base}/readyz", timeout=5).json()["ready"] is True
    before = requests.get(f"{base}/metrics", timeout=5).text
    with RemoteDSparkTargetModel.from_urls([server.url], job_name="metrics-job") as remote:
        remote.generate_batch(*inputs())
        sessions = requests.get(f"{base}/sessions", timeout=5).json()["sessions"]
        mine = [s for s in sessions if s["job_name"] == "metrics-job"]
        assert len(mine) == 1 and mine[0]["tokens"] == 24 and mine[0]["algorithm"] == "dspark"
        assert mine[0]["bytes_per_token"] > 0 and mine[0]["requests"] == 1
        sid = mine[0]["session_id"]
        during = requests.get(f"{base}/metrics", timeout=5).text
        assert 'draftfeed_job_tokens_total{algorithm="dspark",job="metrics-job"} 24.0' in during
        assert sid[:8] not in during  # series are per job, never per session
    after = requests.get(f"{base}/metrics", timeout=5).text
    assert 'job="metrics-job"' not in after  # the closed session's job has no live session: its series went
    opened = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("session opened: " + sid[:8])
    ]
    closed = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("session closed: " + sid[:8])
    ]
    assert len(opened) == 1 and "job=metrics-job algorithm=dspark" in opened[0]
    assert len(closed) == 1 and "tokens=24 requests=1" in closed[0]

    def value(text, name):
        line = next(
            line for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")
        )
        return float(line.rsplit(" ", 1)[1])

    assert value(after, "draftfeed_tokens_total") - value(before, "draftfeed_tokens_total") == 24
    assert value(after, "draftfeed_requests_total") - value(before, "draftfeed_requests_total") == 1
    for name in ("queue_depth", "forward_seconds_total", "forwards_total", "sessions"):
        value(after, f"draftfeed_{name}")
    raw = 'draftfeed_bytes_sent_total{encoding="raw"}'
    sent = value(after, raw) - (value(before, raw) if raw in before else 0)
    assert sent == mine[0]["bytes_sent"] > 24 * 32 * 4  # at least the fp32 final hidden states


def test_dead_server_is_skipped(server, model):
    with pytest.warns(UserWarning, match="skipping server"):
        remote = RemoteDSparkTargetModel.from_urls(["grpc://127.0.0.1:1", server.url])
    with remote:
        assert remote.num_remote_servers == 1
        assert_same(remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs()))


def test_jobs_on_one_host_fill_the_weight_cache_at_the_same_time(server, model, tmp_path):
    # several trainers of one host start together and fetch the same embeddings into one cache directory
    # (the demo's concurrent jobs did): every one gets the weights and the cache holds one complete file
    start, results, errors = threading.Barrier(6), [], []

    def job():
        try:
            with RemoteDSparkTargetModel.from_urls([server.url], cache_dir=tmp_path) as remote:
                start.wait()
                results.append(remote.get_input_embeddings().weight)
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 6
    assert all(torch.equal(w, model.get_input_embeddings().weight) for w in results)
    (cached,) = tmp_path.rglob("embed_tokens.pt")
    assert not list(tmp_path.rglob("*.partial"))
    with RemoteDSparkTargetModel.from_urls([server.url], cache_dir=tmp_path) as remote:  # read from the cache
        assert torch.equal(remote.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_closed_sessions_keep_their_totals_for_reports(server, model):
    # demo-train prints what the server sent each job after the jobs closed their sessions
    sel, mask = mapping(160)
    with RemoteEagle3TargetModel.from_urls([server.url], job_name="report-me") as remote:
        remote.set_vocab_mapping(sel, mask)
        for seed in range(3):
            remote.generate_batch(*inputs(seed=seed))
    (done,) = [s for s in server.sessions.finished if s.job_name == "report-me"]
    assert done.closed and done.stats.requests == 3
    assert done.stats.tokens == 3 * inputs()[0].numel() and done.stats.bytes_sent > 0
    assert all(s.job_name != "report-me" for s in server.sessions.list())


def test_an_error_that_echoes_a_huge_input_keeps_its_code(server):
    from draftfeed.client.errors import MAX_MESSAGE_BYTES
    from draftfeed.client.pb import draftfeed_pb2 as pb

    with pytest.raises(
        grpc.RpcError
    ) as err:  # the message quotes the 100 kB name; uncapped: RESOURCE_EXHAUSTED
        _stub_call(server, "OpenSession", pb.OpenSessionRequest(algorithm="x" * 100_000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown algorithm" in err.value.details() and len(err.value.details()) <= MAX_MESSAGE_BYTES


class _HeldForward:
    """A scheduler forward that waits at its first call until `release()`; says when it got there."""

    def __init__(self):
        from draftfeed.target.backends import forward_for

        self._forward = forward_for
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, model, layout, batch, needs):
        self.entered.set()
        assert self.go.wait(60)
        return self._forward(model, layout, batch, needs)


def _wait_for(condition, what, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_closing_a_session_answers_its_queued_requests(model):
    """Issue 16.2: a session closed while its requests wait in the queue: the unary Generate gets
    NOT_FOUND naming the session, each queued request of a GenerateStream an error frame (the stream
    goes on), and the client library re-opens and answers instead of raising IndexError."""
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import ReplyAssembler, TargetStub

    srv = start_server(model)
    held = _HeldForward()
    srv.scheduler._forward = held
    stub = TargetStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
    try:
        holder = stub.OpenSession(pb.OpenSessionRequest(algorithm="dspark", job_name="holder")).session_id
        victim = stub.OpenSession(pb.OpenSessionRequest(algorithm="dspark", job_name="victim")).session_id
        args = inputs()
        blocker = stub.Generate(_generate_request(holder, *args), timeout=60)
        assert held.entered.wait(30)
        unary = stub.Generate(_generate_request(victim, *args), timeout=60)
        reqs = [_generate_request(victim, *args) for _ in range(2)]
        for i, r in enumerate(reqs):
            r.request_id = i + 1
        done_sending = threading.Event()

        def requests():
            yield from reqs
            done_sending.wait(60)

        stream = stub.GenerateStream(requests(), timeout=60)
        _wait_for(lambda: srv.scheduler.pending() == 3, "the victim's three requests to queue")
        stub.CloseSession(pb.CloseSessionRequest(session_id=victim), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(ReplyAssembler().replies(unary))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert (
            f"session {victim}" in e.value.details()
            and "closed while this request was queued" in e.value.details()
        )
        assembler, errors = ReplyAssembler(), []
        for frame in stream:
            try:
                assembler.feed(frame)
            except NotFound as err:
                errors.append(err)
                if len(errors) == 2:
                    break
        assert [err.request_id for err in errors] == [1, 2]
        assert all(victim in str(err) for err in errors)
        done_sending.set()
        held.go.set()
        assert len(list(ReplyAssembler().replies(blocker))) == 1
        # the client library: its session closed under a queued request -> re-opened, answered
        held.entered.clear()
        held.go.clear()
        blocker = stub.Generate(_generate_request(holder, *args), timeout=60)
        assert held.entered.wait(30)
        with RemoteDSparkTargetModel.from_urls([srv.url]) as remote:
            first = remote.servers[0].session_id
            got = {}
            t = threading.Thread(target=lambda: got.update(batch=remote.generate_batch(*args)))
            t.start()
            _wait_for(lambda: srv.scheduler.pending() == 1, "the client's request to queue")
            stub.CloseSession(pb.CloseSessionRequest(session_id=first), timeout=30)
            _wait_for(lambda: remote.servers[0].session_id != first, "the client to re-open its session")
            held.go.set()
            t.join(60)
            assert_same(got["batch"], HFDSparkTargetModel(model).generate_batch(*args))
        assert len(list(ReplyAssembler().replies(blocker))) == 1
        # the same on the client's stream: its queued requests' futures get their answers
        held.entered.clear()
        held.go.clear()
        blocker = stub.Generate(_generate_request(holder, *args), timeout=60)
        assert held.entered.wait(30)
        with RemoteDSparkTargetModel.from_urls([srv.url], max_in_flight=2) as remote:
            first = remote.servers[0].session_id
            futures = [remote.generate_batch_async(*inputs(seed=s)) for s in (1, 2)]
            _wait_for(lambda: srv.scheduler.pending() == 2, "the stream's two requests to queue")
            stub.CloseSession(pb.CloseSessionRequest(session_id=first), timeout=30)
            _wait_for(lambda: remote.servers[0].session_id != first, "the client to re-open its session")
            held.go.set()
            local = HFDSparkTargetModel(model)
            for s, fut in zip((1, 2), futures, strict=True):
                assert_same(fut.result(timeout=60), local.generate_batch(*inputs(seed=s)))
        assert len(list(ReplyAssembler().replies(blocker))) == 1
    finally:
        held.go.set()
        srv.stop(grace=1)


def test_unread_stream_replies_count_against_the_per_job_limit(model):
    """Issue 16.6: a GenerateStream client that sends and never reads: the server keeps at most the
    per-job limit of replies for it (queued, running or answered-unread); the rest are refused with
    RESOURCE_EXHAUSTED naming the limit, before anything is queued for them."""
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import ReplyAssembler, TargetStub

    srv = start_server(model, max_queued_per_session=3, data_port=None)
    stub = TargetStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
    try:
        sid = stub.OpenSession(pb.OpenSessionRequest(algorithm="dflash", capture_logits=True)).session_id
        args = inputs(s=1600)  # each reply carries 2x1600x160 fp32 logits (2 MB): more than a flow window
        reqs = [_generate_request(sid, *args) for _ in range(8)]
        for i, r in enumerate(reqs):
            r.request_id = i + 1
        stream = stub.GenerateStream(iter(reqs), timeout=120)  # 8 requests, then the client half-closes
        session = srv.sessions.get(sid)
        _wait_for(lambda: srv.servicer._streams, "the stream to start")
        (pending,) = [q for q, _ in srv.servicer._streams.values()]
        # the reader has read all 8 requests and ended (its end mark is queued); nobody reads, so the
        # writer is stuck on a reply (unless the transport took every reply: then the stream ended)
        _wait_for(
            lambda: None in list(pending.queue) or not srv.servicer._streams, "the 8 requests to be read"
        )
        _wait_for(lambda: session.stats.in_flight == 0, "the admitted requests to be answered")
        assert srv.servicer.admission.holds.held(sid) <= 3  # replies the server keeps for this client
        got, errors, assembler = [], [], ReplyAssembler()
        for frame in stream:
            try:
                reply = assembler.feed(frame)
            except ResourceExhausted as err:
                errors.append(err)
                reply = None
            if reply is not None:
                got.append(reply.request_id)
            if len(got) + len(errors) == 8:
                break
        assert errors, got  # 3 admitted, plus what the transport took before the writer blocked
        assert sorted(got + [e.request_id for e in errors]) == list(range(1, 9))
        assert srv.metrics.forward_tokens == len(got) * 2 * 1600  # a refused request never reached the GPU
        assert "per-job limit 3" in str(errors[0]) and "not yet read" in str(errors[0])
        _wait_for(lambda: srv.servicer.admission.holds.held(sid) == 0, "the holds to be released")
    finally:
        srv.stop(grace=1)


def test_memory_bounds_are_checked_before_allocation(server):
    """Issue 16.6: what a request could make the server allocate is bounded first, and the answer
    names the limit: a session spec that inflates to 1 GiB, a seq_lens of 1M documents, a packed row
    past --max-packed-seq-len, thousands of layer ids, a 1 MB job name."""
    import resource
    import zlib

    from draftfeed.client.channel import SESSION_SPEC_KEY
    from draftfeed.client.pb import draftfeed_pb2 as pb
    from draftfeed.client.wire import ReplyAssembler, TargetStub, tensor_to_proto

    stub = TargetStub(grpc.insecure_channel(server.url.removeprefix("grpc://")))
    deflate, zeros = zlib.compressobj(9), bytes(1 << 20)
    bomb = b"".join(deflate.compress(zeros) for _ in range(1024)) + deflate.flush()  # 1 MiB -> 1 GiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    sid = stub.OpenSession(pb.OpenSessionRequest(algorithm="dspark")).session_id
    ids, attn, loss = inputs()

    def status(call):
        with pytest.raises(grpc.RpcError) as e:
            out = call()
            if not isinstance(out, pb.OpenSessionResponse):
                list(ReplyAssembler().replies(out))
        return e.value.code(), e.value.details()

    code, details = status(
        lambda: stub.Generate(
            _generate_request(sid, ids, attn, loss), timeout=30, metadata=((SESSION_SPEC_KEY, bomb),)
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_SPEC_BYTES" in details
    req = _generate_request(sid, ids, attn, loss)
    req.seq_lens.CopyFrom(tensor_to_proto(torch.zeros(2, 1 << 20, dtype=torch.int16)))
    code, details = status(lambda: stub.Generate(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1048576 document slots" in details
    s = 64  # the fixture's max_seq_len; a packed 2x64 request needs a 2x64x64 mask
    small = start_server(server.scheduler.model, limits=Limits(max_packed_seq_len=80))
    try:
        stub2 = TargetStub(grpc.insecure_channel(small.url.removeprefix("grpc://")))
        sid2 = stub2.OpenSession(pb.OpenSessionRequest(algorithm="dspark")).session_id
        req = _generate_request(sid2, *(torch.ones(2, s, dtype=torch.long),) * 3)
        req.seq_lens.CopyFrom(tensor_to_proto(torch.tensor([[s], [s]])))
        code, details = status(lambda: stub2.Generate(req, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2x64x64 attention mask" in details and "--max-packed-seq-len 80" in details
        req.input_ids.CopyFrom(tensor_to_proto(torch.ones(1, s, dtype=torch.long)))
        for name in ("attention_mask", "loss_mask"):
            getattr(req, name).CopyFrom(tensor_to_proto(torch.ones(1, s, dtype=torch.long)))
        req.seq_lens.CopyFrom(tensor_to_proto(torch.tensor([[s]])))
        assert len(list(ReplyAssembler().replies(stub2.Generate(req, timeout=30)))) == 1  # 1x64x64 fits
    finally:
        small.stop(grace=0)
    code, details = status(
        lambda: stub.OpenSession(pb.OpenSessionRequest(algorithm="dflash", layer_ids=[0] * 2000), timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2000 layer ids" in details and "at most 9" in details
    code, details = status(
        lambda: stub.OpenSession(
            pb.OpenSessionRequest(algorithm="dspark", job_name="j" * (1 << 20)), timeout=30
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 256" in details
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 300 * 1024  # no GiB-sized allocation
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))


def test_malformed_protobuf_bytes_get_invalid_argument(server, model):
    """Issue 16.15: bytes that do not parse as the method's message are INVALID_ARGUMENT, never
    INTERNAL, on every method; on GenerateStream after the requests before them are answered."""
    from draftfeed.client.wire import SERVICE_NAME, ReplyAssembler

    channel = grpc.insecure_channel(server.url.removeprefix("grpc://"))
    garbage = [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x80"]  # bad tag, bad UTF-8, truncated
    kinds = {"GenerateStream": "stream_stream", "Generate": "unary_stream", "StreamWeights": "unary_stream"}
    for method in ("GetModelInfo", "OpenSession", "SetVocabMapping", "CloseSession", *kinds):
        call = getattr(channel, kinds.get(method, "unary_unary"))(f"/{SERVICE_NAME}/{method}")
        for data in garbage:
            if method == "GetModelInfo" and data == garbage[1]:
                continue  # its request has no field 1: an unknown field, which protobuf keeps
            with pytest.raises(grpc.RpcError) as e:
                out = call(iter([data]) if method == "GenerateStream" else data, timeout=30)
                if method in kinds:
                    list(out)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, data, e.value.details())
            assert "not a valid" in e.value.details()
    with RemoteDSparkTargetModel.from_urls([server.url]) as remote:
        good = _generate_request(remote.servers[0].session_id, *inputs())
        good.request_id = 7
        call = channel.stream_stream(f"/{SERVICE_NAME}/GenerateStream")
        replies = []
        with pytest.raises(grpc.RpcError) as e:
            for reply in ReplyAssembler().replies(
                call(iter([good.SerializeToString(), garbage[0]]), timeout=30)
            ):
                replies.append(reply)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [r.request_id for r in replies] == [7]
        assert remote.generate_batch(*inputs()) is not None  # the server goes on


def test_model_info_names_the_request_cap_and_the_forward_budget(server):
    from draftfeed.client.pb import draftfeed_pb2 as pb

    lim = _stub_call(server, "GetModelInfo", pb.GetModelInfoRequest()).limits
    assert lim.max_request_tokens == 256  # --max-request-tokens: one GenerateRequest's B*S
    assert lim.max_forward_tokens == server.cfg.max_forward_tokens == 16384  # --max-batch-tokens
    assert lim.max_batch_tokens == lim.max_request_tokens  # deprecated field 3, kept for older clients


def test_model_info_tells_a_remote_trainer_the_target_config(server, model):
    """A remote trainer builds its draft from the served target's config, not a local copy of it."""
    from draftfeed.target.fingerprint import config_json
    from draftfeed.trainer.train import served_target_config

    with RemoteDFlashTargetModel.from_urls([server.url]) as remote:
        assert remote.target_config_dict() == json.loads(config_json(model))
        served = served_target_config(remote, "/nonexistent/no/local/copy")
    assert type(served) is type(model.config) and served.to_dict() == model.config.to_dict()
