"""Idle GenerateStream calls cannot take every gRPC worker thread: data calls are bounded per job
(per client connection without a token file) and in all, health checks and GetModelInfo keep a
reserve, other jobs keep being served, and /readyz says 503 while every data slot is taken."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import requests
from test_auth import TOKENS, token_file  # noqa: F401 - fixture
from test_backends import inputs, mapping
from test_service import assert_same, start_server

from draftfeed.client.channel import check_health
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteEagle3TargetModel
from draftfeed.client.wire import TargetStub
from draftfeed.target.backends import HFDFlashTargetModel, HFEagle3TargetModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _idle_streams(stub, n, stop: threading.Event, metadata=()):
    """`n` GenerateStream calls that send nothing until `stop` is set (the issue's idle client)."""

    def nothing():
        stop.wait()
        yield from ()

    return [stub.GenerateStream(nothing(), metadata=metadata) for _ in range(n)]


def _auth(job):
    return (("authorization", f"Bearer {TOKENS[job]}"),)


def test_idle_streams_of_one_job_leave_threads_for_health_and_other_jobs(model, token_file):  # noqa: F811
    # 8 worker threads: 4 kept for short calls, 4 data slots, at most 3 per job
    srv = start_server(model, token_file=token_file, grpc_workers=8, max_streams_per_job=3, admin_port=0)
    stop = threading.Event()
    channel = grpc.insecure_channel(srv.url.removeprefix("grpc://"))
    try:
        stub = TargetStub(channel)
        calls = _idle_streams(stub, 32, stop, _auth("eagle-a"))
        _wait(lambda: sum(c.done() for c in calls) == 29, "29 refused streams")
        assert srv.servicer.slots.held("job:eagle-a") == 3
        refused = [c for c in calls if c.done()]
        held = [c for c in calls if c not in refused]
        assert {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "--max-streams-per-job" in refused[0].details()
        # short calls and another job are still answered, at once
        assert check_health(srv.url, timeout=5) == "SERVING"
        assert (
            stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5, metadata=_auth("eagle-a")
            ).num_hidden_layers
            == 8
        )
        with RemoteDFlashTargetModel.from_urls([srv.url], token=TOKENS["dspark-b"], timeout=10) as remote:
            assert_same(
                remote.generate_batch(*inputs()), HFDFlashTargetModel(model).generate_batch(*inputs())
            )
        admin = srv.admin.url
        assert requests.get(f"{admin}/readyz", timeout=5).json()["saturated"] is False
        # the last data slot taken by the other job: the server is saturated and readiness says so
        more = _idle_streams(stub, 1, stop, _auth("dspark-b"))
        _wait(lambda: srv.servicer.slots.in_use == 4, "4 slots in use")
        r = requests.get(f"{admin}/readyz", timeout=5)
        assert r.status_code == 503 and r.json() == {"ready": False, "draining": False, "saturated": True}
        assert check_health(srv.url, timeout=5) == "SERVING"  # health checks still have their reserve
        stop.set()  # the idle clients end their streams: every slot comes back
        _wait(lambda: srv.servicer.slots.in_use == 0, "slots freed")
        assert requests.get(f"{admin}/readyz", timeout=5).status_code == 200
        for c in held + more:  # the held streams end normally
            assert c.code() == grpc.StatusCode.OK
    finally:
        stop.set()
        channel.close()
        srv.stop(grace=1)


def test_without_tokens_each_connection_is_bounded_alone(model):
    srv = start_server(model, grpc_workers=16, max_streams_per_job=2)
    stop = threading.Event()
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # channels share no TCP connection
    channels = [grpc.insecure_channel(srv.url.removeprefix("grpc://"), own_connection) for _ in range(2)]
    try:
        calls = [_idle_streams(TargetStub(ch), 3, stop) for ch in channels]
        _wait(
            lambda: [sum(c.done() for c in p) for p in calls] == [1, 1], "one refused stream per connection"
        )
        assert srv.servicer.slots.in_use == 4  # 2 held on each connection
    finally:
        stop.set()
        for ch in channels:
            ch.close()
        srv.stop(grace=1)


def test_the_client_waits_for_a_slot_of_its_job(model, token_file):  # noqa: F811
    """Over its job's bound, the draftfeed client is told to retry (RESOURCE_EXHAUSTED with a retry
    hint): its call waits and is answered once a slot frees, instead of failing."""
    srv = start_server(model, token_file=token_file, max_streams_per_job=1)
    stop = threading.Event()
    channel = grpc.insecure_channel(srv.url.removeprefix("grpc://"))
    try:
        idle = _idle_streams(TargetStub(channel), 1, stop, _auth("eagle-a"))  # noqa: F841 - kept open
        _wait(lambda: srv.servicer.slots.held("job:eagle-a") == 1, "the idle stream's slot")
        local = HFEagle3TargetModel(model)
        local.set_vocab_mapping(*mapping(160))
        with RemoteEagle3TargetModel.from_urls([srv.url], token=TOKENS["eagle-a"], timeout=60) as remote:
            remote.set_vocab_mapping(*mapping(160))
            refused = srv.servicer.slots.refused
            got = {}
            waiter = threading.Thread(target=lambda: got.setdefault("b", remote.generate_batch(*inputs())))
            waiter.start()
            _wait(lambda: srv.servicer.slots.refused > refused, "the call to be refused once")
            assert "b" not in got
            stop.set()  # the idle stream ends: its slot frees and the waiting call goes through
            waiter.join(60)
        assert_same(got["b"], local.generate_batch(*inputs()))
    finally:
        stop.set()
        channel.close()
        srv.stop(grace=1)
