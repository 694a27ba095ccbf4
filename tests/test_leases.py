"""Session leases (`--session-ttl`): a session without requests for the TTL is closed and everything
it held is freed (queue, data-plane socket, directory entries, status ring); the draftfeed client
and a NeMo HTTP client whose session expired while they were only slow carry on transparently."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import requests
import torch
from test_backends import inputs, mapping
from test_nemo_http import Client, assert_exact, expected
from test_service import assert_same, start_server

from draftfeed.client.dataplane import DataPlaneClient
from draftfeed.client.errors import NotFound
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteEagle3TargetModel
from draftfeed.client.wire import TargetStub, tensor_to_proto
from draftfeed.server.sessions import SessionTable
from draftfeed.target.backends import HFEagle3TargetModel

TTL = 0.5


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model):
    srv = start_server(model, session_ttl_s=TTL, admin_port=0, nemo_http_port=0)
    yield srv
    srv.stop(grace=1)


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _live(server) -> set[str]:
    return {s.id for s in server.sessions.list()}


def test_an_abandoned_session_expires_and_frees_everything(model):
    """The issue's dead trainer: it opened a session (with a data-plane socket) and went away. Its
    lease is run out by hand (last_seen moved back past the TTL), then swept."""
    server = start_server(model, session_ttl_s=60, admin_port=0)
    history = server.admin.uvicorn.config.app.state.status_history
    channel = grpc.insecure_channel(server.url.removeprefix("grpc://"))
    try:
        stub = TargetStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.session_ttl_s == 60
        opened = stub.OpenSession(pb.OpenSessionRequest(algorithm="dflash", data_plane=True))
        sid = opened.session_id
        plane = DataPlaneClient("127.0.0.1", opened.data_port, opened.data_ticket)
        history.sample()
        assert sid in history.sessions and server.dataplane.connected(sid)
        server.sessions.list()[0].last_seen -= 61
        server.leases.sweep()
        assert sid not in _live(server) and server.leases.expired == 1
        _wait(lambda: not server.dataplane.connected(sid), "its data-plane socket to close")
        assert server.scheduler.cancel_session(sid) == 0  # nothing of it is queued
        history.sample()
        assert sid not in history.sessions  # its status ring is gone
        assert all(s.id != sid for s in server.sessions.list())
        req = pb.GenerateRequest(session_id=sid, request_id=1)
        for name, t in zip(("input_ids", "attention_mask", "loss_mask"), inputs(), strict=False):
            getattr(req, name).CopyFrom(tensor_to_proto(t))
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(req))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "expired" in err.value.details() and "--session-ttl" in err.value.details()
        plane.close()
    finally:
        channel.close()
        server.stop(grace=1)


def test_any_request_renews_the_lease_and_work_in_flight_keeps_it():
    """On the table, with explicit clocks: a call naming the session (`get`) renews it; a session
    with a request in flight never expires; an idle one does, once, and says so in NOT_FOUND."""
    table = SessionTable(num_layers=8, vocab_size=160)
    a, b = table.open("dflash"), table.open("dflash")
    now = time.time()
    a.last_seen = b.last_seen = now - 100
    table.get(a.id)  # a request: renewed
    b.stats.in_flight = 1  # queued or running: kept
    assert table.expire(10, now=now + 1) == []
    b.stats.in_flight = 0
    assert [s.id for s in table.expire(10, now=now + 1)] == [b.id] and b.closed
    assert [s.id for s in table.expire(10, now=now + 20)] == [a.id]
    assert table.expire(10, now=now + 40) == [] and table.list() == []
    with pytest.raises(NotFound, match="expired: no request for 101 s"):
        table.get(b.id)


def _age_out(server, session_id: str) -> None:
    """Run out one session's lease now (its last request moved back past the TTL), then sweep."""
    for s in server.sessions.list():
        if s.id == session_id:
            s.last_seen -= server.cfg.session_ttl_s + 1
    server.leases.sweep()
    assert session_id not in _live(server)


@pytest.fixture(scope="module")
def long_ttl_server(model):
    """Leases run out by hand (`_age_out`), so a loaded box cannot expire a session mid-test."""
    srv = start_server(model, session_ttl_s=60)
    yield srv
    srv.stop(grace=1)


def test_a_slow_client_reopens_its_expired_session_transparently(long_ttl_server, model):
    server = long_ttl_server
    local = HFEagle3TargetModel(model)
    sel = mapping(160, vd=30, seed=3)
    local.set_vocab_mapping(*sel)
    with RemoteEagle3TargetModel.from_urls([server.url], job_name="slow", timeout=30) as remote:
        remote.set_vocab_mapping(*sel)
        assert_same(remote.generate_batch(*inputs()), local.generate_batch(*inputs()))
        first = remote.servers[0].session_id
        _age_out(server, first)
        # unary: NOT_FOUND, re-opened with its vocab mapping, answered
        assert_same(remote.generate_batch(*inputs(seed=1)), local.generate_batch(*inputs(seed=1)))
        second = remote.servers[0].session_id
        assert second != first and second in _live(server)
        # streamed (several in flight on one GenerateStream): the same
        _age_out(server, second)
        futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(3)]
        for s, fut in enumerate(futures):
            assert_same(fut.result(timeout=60), local.generate_batch(*inputs(seed=s)))
        assert remote.servers[0].session_id not in (first, second)
        # threads whose requests failed together re-open one session, not one each
        third = remote.servers[0].session_id
        _age_out(server, third)
        start, results = threading.Barrier(4), {}

        def one(seed):
            start.wait()
            results[seed] = remote.generate_batch(*inputs(seed=seed))

        threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for seed, got in results.items():
            assert_same(got, local.generate_batch(*inputs(seed=seed)))
        assert len(results) == 4
        assert [s.job_name for s in server.sessions.list()].count("slow") == 1


def test_a_nemo_client_session_expires_and_comes_back(server, model):
    c = Client(server.nemo_http.url)
    sel = mapping(160, vd=36, seed=9)
    c.set_vocab_mapping(*sel)
    assert_exact(c.generate(*inputs()), expected(model, sel, inputs()))
    mine = [s.id for s in server.sessions.list() if s.job_name.startswith("nemo-http")]
    assert len(mine) == 1
    _wait(lambda: mine[0] not in _live(server), "the NeMo client's session to expire")
    got = c.generate(*inputs(seed=2))  # their client never re-opens: the server does, from its mapping
    assert_exact(got, expected(model, sel, inputs(seed=2)))
    assert server.nemo_http.clients.reopened >= 1
    c.post("disconnect", b"{}")
    assert requests.get(f"{server.nemo_http.url}/health", timeout=5).ok
    assert torch.is_tensor(got["aux_hidden_states"])
