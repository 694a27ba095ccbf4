"""The TCP data plane for reply payloads (server/dataplane.py, client/dataplane.py) on a real server:
remote == in-process with the payload on the data socket, several requests in flight, sessions of
two jobs, tickets, TLS, and the fallback to gRPC frames when the socket cannot be opened or breaks."""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
import time
import warnings

import grpc
import pytest
from test_auth import TOKENS, token_file  # noqa: F401 - fixture
from test_backends import inputs, mapping
from test_packing import packed_inputs
from test_service import assert_same, start_server
from test_tls import pki  # noqa: F401 - fixture

from draftfeed.client.dataplane import ACCEPTED, REFUSED, DataPlaneClient, recv_exact
from draftfeed.client.errors import PermissionDenied, Unavailable
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.client.wire import TargetStub, tensor_to_proto
from draftfeed.target.backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model):
    srv = start_server(model)
    yield srv
    srv.stop(grace=1)


def _data(remote):
    """The remote's data-plane client on its only server (None: it uses gRPC frames)."""
    return remote.servers[0].data


def _wait(cond, timeout=300.0):  # the timeout only bounds a hang
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize("packed", [False, True])
def test_remote_equals_inprocess_over_the_data_plane(server, model, packed):
    args = packed_inputs() if packed else inputs()
    sel, mask = mapping(160)
    local = HFEagle3TargetModel(model)
    local.set_vocab_mapping(sel, mask)
    with RemoteEagle3TargetModel.from_urls([server.url]) as remote:
        remote.set_vocab_mapping(sel, mask)
        assert _data(remote) is not None and not _data(remote).tls
        assert_same(remote.generate_batch(*args), local.generate_batch(*args))
        assert _data(remote).replies == 1  # the payload came on the data socket
    with RemoteDFlashTargetModel.from_urls(
        [server.url], target_layer_ids=[1, 4, 6], capture_logits=True
    ) as r:
        assert_same(
            r.generate_batch(*args), HFDFlashTargetModel(model, [1, 4, 6], True).generate_batch(*args)
        )
        assert _data(r).replies == 1
    with RemoteDSparkTargetModel.from_urls([server.url]) as remote:
        assert_same(remote.generate_batch(*args), HFDSparkTargetModel(model).generate_batch(*args))
        assert _data(remote).replies == 1
        sid = remote.servers[0].session_id
        assert server.dataplane.connected(sid)
    _wait(lambda: not server.dataplane.connected(sid))  # closing the session closed its socket


def test_several_in_flight_and_threads(server, model):
    local = HFDSparkTargetModel(model, [0, 3])
    batches = [inputs(seed=i) for i in range(6)]
    with RemoteDSparkTargetModel.from_urls([server.url], target_layer_ids=[0, 3], max_in_flight=3) as remote:
        futures = [remote.generate_batch_async(*b) for b in batches]  # GenerateStream, 3 in flight
        got, errors = {}, []

        def unary(i):
            try:
                got[i] = remote.generate_batch(*batches[i])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=unary, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for i, (fut, b) in enumerate(zip(futures, batches, strict=True)):
            want = local.generate_batch(*b)
            assert_same(fut.result(timeout=60), want)
            assert_same(got[i], want)
        assert _data(remote).replies == 2 * len(batches)


def test_sessions_of_two_jobs(model, token_file):  # noqa: F811
    srv = start_server(model, token_file=token_file)
    try:
        sel, mask = mapping(160)
        local_a = HFEagle3TargetModel(model)
        local_a.set_vocab_mapping(sel, mask)
        local_b = HFDSparkTargetModel(model)
        a = RemoteEagle3TargetModel.from_urls([srv.url], token=TOKENS["eagle-a"])
        b = RemoteDSparkTargetModel.from_urls([srv.url], token=TOKENS["dspark-b"])
        a.set_vocab_mapping(sel, mask)
        results, errors = {}, []

        def job(name, remote):
            try:
                results[name] = [remote.generate_batch(*inputs(seed=s)) for s in range(3)]
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=job, args=x) for x in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        for s in range(3):
            assert_same(results["a"][s], local_a.generate_batch(*inputs(seed=s)))
            assert_same(results["b"][s], local_b.generate_batch(*inputs(seed=s)))
        assert _data(a).replies == 3 and _data(b).replies == 3
        # job b cannot use a's session, data plane or not; a's socket gets nothing from it
        stub = TargetStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
        ids, attn, loss = inputs()
        request = pb.GenerateRequest(
            session_id=a.servers[0].session_id,
            request_id=999,
            data_plane=True,
            input_ids=tensor_to_proto(ids),
            attention_mask=tensor_to_proto(attn),
            loss_mask=tensor_to_proto(loss),
        )
        md = (("authorization", f"Bearer {TOKENS['dspark-b']}"),)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request, timeout=30, metadata=md))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(PermissionDenied, match="belongs to another job"):
            _close_as(stub, a.servers[0].session_id, md)
        assert _data(a).replies == 3
        assert_same(a.generate_batch(*inputs()), local_a.generate_batch(*inputs()))
        a.close()
        b.close()
    finally:
        srv.stop(grace=0)


def _close_as(stub, session_id, md):
    from draftfeed.client.remote import _raise

    try:
        stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=30, metadata=md)
    except grpc.RpcError as err:
        raise _raise(err) from None


def _open_raw(server) -> tuple[str, int, bytes]:
    stub = TargetStub(grpc.insecure_channel(server.url.removeprefix("grpc://")))
    resp = stub.OpenSession(pb.OpenSessionRequest(algorithm="dspark", data_plane=True), timeout=30)
    assert resp.data_port == server.dataplane.port and len(resp.data_ticket) == 32
    return resp.session_id, resp.data_port, resp.data_ticket


def test_bad_and_reused_tickets_are_refused_and_not_logged(server, caplog):
    caplog.set_level(logging.INFO)
    sid, port, ticket = _open_raw(server)
    wrong = secrets.token_bytes(32)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(wrong)
        assert recv_exact(sock, 1) == REFUSED
        assert sock.recv(1) == b""  # and closed
    with pytest.raises(Unavailable, match="refused this session's ticket"):
        DataPlaneClient("127.0.0.1", port, wrong)
    first = DataPlaneClient("127.0.0.1", port, ticket)
    try:
        assert server.dataplane.connected(sid)
        with pytest.raises(Unavailable, match="refused"):
            DataPlaneClient("127.0.0.1", port, ticket)  # one-time: a second use is refused
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"short")  # then hangs up: a broken handshake, refused
    finally:
        first.close()
    _wait(lambda: not server.dataplane.connected(sid))
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) >= 3
    for secret in (ticket, wrong):
        for form in (secret.hex(), repr(secret), secret.hex().upper()):
            assert form not in caplog.text


def test_tls_and_mutual_tls(model, pki):  # noqa: F811
    srv = start_server(
        model,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca_cert"],
    )
    try:
        mine = dict(ca_file=pki["ca_cert"], client_cert=pki["client_cert"], client_key=pki["client_key"])
        with RemoteDSparkTargetModel.from_urls([srv.url], **mine) as remote:
            assert _data(remote).tls and isinstance(_data(remote).sock, ssl.SSLSocket)
            assert_same(
                remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs())
            )
            assert _data(remote).replies == 1
        # plaintext, or TLS without a client certificate, to the TLS data port: no session data
        with socket.create_connection(("127.0.0.1", srv.dataplane.port), timeout=5) as sock:
            sock.sendall(secrets.token_bytes(32))
            with pytest.raises((ConnectionError, OSError)):
                if recv_exact(sock, 1) != ACCEPTED:
                    raise ConnectionError("refused")
        ctx = ssl.create_default_context(cafile=pki["ca_cert"])
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            DataPlaneClient("127.0.0.1", srv.dataplane.port, secrets.token_bytes(32), ssl_context=ctx)
    finally:
        srv.stop(grace=0)


def test_fallback_when_the_data_port_is_unreachable(model):
    srv = start_server(model)
    try:
        srv.dataplane.close()  # the port is offered but nothing listens any more
        with pytest.warns(UserWarning, match="cannot open its data plane"):
            remote = RemoteDSparkTargetModel.from_urls([srv.url], max_in_flight=2)
        with remote:
            assert _data(remote) is None
            local = HFDSparkTargetModel(model)
            assert_same(remote.generate_batch(*inputs()), local.generate_batch(*inputs()))
            futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(3)]
            for s, fut in enumerate(futures):
                assert_same(fut.result(timeout=60), local.generate_batch(*inputs(seed=s)))
    finally:
        srv.stop(grace=0)


def test_fallback_when_the_data_plane_breaks(server, model):
    local = HFDFlashTargetModel(model)
    with RemoteDFlashTargetModel.from_urls([server.url]) as remote:
        assert_same(remote.generate_batch(*inputs()), local.generate_batch(*inputs()))
        data = _data(remote)
        # the socket goes while its session lives (no close frame): a break
        server.dataplane.close_session(remote.servers[0].session_id)
        _wait(lambda: not data.usable)
        assert not data.closed_by_server
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(3):
                assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
        assert [str(w.message) for w in caught if "data plane broke" in str(w.message)] != []
        assert len(caught) == 1, [str(w.message) for w in caught]  # one warning, then quietly on gRPC
        assert data.replies == 1


def test_server_restart_reopens_the_data_plane_and_drain_closes_it(model):
    first = start_server(model)
    port = first.port
    remote = RemoteEagle3TargetModel.from_urls([first.url])
    sel, mask = mapping(160)
    remote.set_vocab_mapping(sel, mask)
    before = remote.generate_batch(*inputs())
    old = _data(remote)
    assert old.replies == 1
    first.stop(grace=5)  # the drain closes the data socket after the replies, with the close frame
    _wait(lambda: not old.usable)
    assert old.closed_by_server  # a clean close, not a break
    second = start_server(model, port=port)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            after = remote.generate_batch(*inputs())  # NOT_FOUND -> re-open (new data plane) -> retry
        assert not [str(w.message) for w in caught if "data plane" in str(w.message)]
        assert_same(before, after)
        assert _data(remote) is not old and _data(remote).usable
        assert_same(remote.generate_batch(*inputs()), before)
        assert _data(remote).replies == 2
    finally:
        remote.close()
        second.stop(grace=0)


def test_off_switches(model):
    srv = start_server(model, data_port=None)
    try:
        assert srv.dataplane is None
        with RemoteDSparkTargetModel.from_urls([srv.url]) as remote:
            assert _data(remote) is None
            assert_same(
                remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs())
            )
    finally:
        srv.stop(grace=0)
    from draftfeed.server.cli import build_parser, serve_config_from_args

    assert serve_config_from_args(build_parser().parse_args(["serve", "--no-data-plane"])).data_port is None
    assert (
        serve_config_from_args(build_parser().parse_args(["serve", "--data-port", "7001"])).data_port == 7001
    )
    assert serve_config_from_args(build_parser().parse_args(["serve"])).data_port == 0


def test_client_can_decline(server, model):
    with RemoteDSparkTargetModel.from_urls([server.url], data_plane=False) as remote:
        assert _data(remote) is None
        got = remote.generate_batch(*inputs())
    assert_same(got, HFDSparkTargetModel(model).generate_batch(*inputs()))


def _raw_generate(server, session_id, request_id, seed=0):
    """One Generate on `session_id` asking for the data plane, as a client that never takes the
    frame: returns the reply header."""
    stub = TargetStub(grpc.insecure_channel(server.url.removeprefix("grpc://")))
    ids, attn, loss = inputs(seed=seed)
    request = pb.GenerateRequest(
        session_id=session_id,
        request_id=request_id,
        data_plane=True,
        input_ids=tensor_to_proto(ids),
        attention_mask=tensor_to_proto(attn),
        loss_mask=tensor_to_proto(loss),
    )
    (frame,) = list(stub.Generate(request, timeout=30))
    header = pb.ReplyFrame.FromString(frame).header
    assert header.payload_on_data_plane and header.request_id == request_id
    return header


def test_late_and_unclaimed_frames_are_dropped_not_kept(server, model, caplog):
    """A frame whose request the client gave up on (discard, a take that timed out) is dropped when it
    comes; a frame no header claims is dropped after unclaimed_ttl_s; so memory stays bounded."""
    local = HFDSparkTargetModel(model)
    with RemoteDSparkTargetModel.from_urls([server.url]) as remote:
        data, sid = _data(remote), remote.servers[0].session_id
        # 1. discarded before its frame came (a call that failed or timed out on the client)
        data.discard(10_001)
        _raw_generate(server, sid, 10_001)
        _wait(lambda: data.replies == 1)
        assert data.unclaimed == (0, 0) and data.dropped == 1
        # 2. a take that gave up waiting: the frame that comes later is dropped too
        data.timeout = 0.2
        with pytest.raises(Unavailable, match="no data-plane frame for reply 10002"):
            data.take(10_002, [1])
        data.timeout = 120.0
        _raw_generate(server, sid, 10_002)
        _wait(lambda: data.replies == 2)
        assert data.unclaimed == (0, 0) and data.dropped == 2
        # 3. a frame no header claims: kept for unclaimed_ttl_s, then dropped with a warning
        data.unclaimed_ttl_s = 0.3
        header = _raw_generate(server, sid, 10_003)
        _wait(lambda: data.replies == 3)
        assert data.unclaimed == (1, header.total_bytes)
        data.discard(10_004)  # a discarded id whose frame never comes is forgotten after the ttl
        time.sleep(0.4)
        caplog.set_level(logging.WARNING, logger="draftfeed.client")
        data.discard(10_005)  # any discard (or frame) sweeps
        assert data.unclaimed == (0, 0) and data.dropped == 3
        assert "dropped frame 10003" in caplog.text and "no reply header claimed it" in caplog.text
        assert set(data._discarded) == {10_005}
        # the session goes on, on the data plane
        assert_same(remote.generate_batch(*inputs()), local.generate_batch(*inputs()))
        assert data.replies == 4 and data.unclaimed == (0, 0)


class _Gate:
    """Holds the scheduler's forward until `open()`, so a request can be in flight while the test
    acts; `entered` is set when a forward starts waiting."""

    def __init__(self, forward):
        self.forward = forward
        self.entered = threading.Event()
        self.event = threading.Event()

    def __call__(self, *args):
        self.entered.set()
        assert self.event.wait(30), "gate never opened"
        return self.forward(*args)


def test_a_call_that_timed_out_leaves_no_frame_behind(model):
    """The client times out while the forward runs; the server, finding the call gone, sends no
    frame; the client keeps nothing; the next call is exact."""
    srv = start_server(model)
    gate = _Gate(srv.scheduler._forward)
    srv.scheduler._forward = gate
    try:
        remote = RemoteDSparkTargetModel.from_urls([srv.url], timeout=1.0)
        data, sid = _data(remote), remote.servers[0].session_id
        with pytest.raises(Exception, match="(?i)deadline"):
            remote.generate_batch(*inputs())
        assert gate.entered.is_set()
        gate.event.set()
        session = srv.sessions.get(sid)
        _wait(lambda: session.stats.requests == 1 and session.stats.in_flight == 0)
        time.sleep(0.2)
        assert data.unclaimed == (0, 0) and data.replies == 0  # nothing was sent for the dead call
        remote.timeout = 30.0
        assert_same(remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs()))
        assert data.replies == 1 and data.unclaimed == (0, 0)
        remote.close()
    finally:
        gate.event.set()
        srv.stop(grace=0)


def test_cancelling_a_stream_cancels_its_queued_requests(model, caplog):
    """Requests queued behind a running forward are cancelled with their call (a stream, or a unary
    Generate): no forward runs for them, the session's in-flight count goes back to 0, and the
    server logs no error for a client that went away."""
    caplog.set_level(logging.WARNING, logger="draftfeed.service")
    srv = start_server(model)
    gate = _Gate(srv.scheduler._forward)
    srv.scheduler._forward = gate
    try:
        stub = TargetStub(grpc.insecure_channel(srv.url.removeprefix("grpc://")))
        sid = stub.OpenSession(pb.OpenSessionRequest(algorithm="dspark"), timeout=30).session_id
        ids, attn, loss = inputs()
        requests_q: list = []
        more = threading.Event()

        def requests():
            for rid in (1, 2, 3):
                if rid == 2:
                    assert more.wait(30)
                yield pb.GenerateRequest(
                    session_id=sid,
                    request_id=rid,
                    input_ids=tensor_to_proto(ids),
                    attention_mask=tensor_to_proto(attn),
                    loss_mask=tensor_to_proto(loss),
                )
                requests_q.append(rid)
            threading.Event().wait(30)  # keep the call open

        call = stub.GenerateStream(requests())
        assert gate.entered.wait(30)  # request 1 is in the forward
        more.set()
        _wait(lambda: srv.scheduler.pending() == 2)  # 2 and 3 queued behind it
        forwards = srv.metrics.forwards
        call.cancel()
        session = srv.sessions.get(sid)
        gate.event.set()
        _wait(lambda: srv.scheduler.pending() == 0 and session.stats.in_flight == 0)
        time.sleep(0.2)
        assert srv.metrics.forwards == forwards + 1  # only request 1 ran
        # unary calls: one in the forward, one queued behind it and cancelled by its client
        gate.entered.clear()
        gate.event.clear()
        request = pb.GenerateRequest(
            session_id=sid,
            input_ids=tensor_to_proto(ids),
            attention_mask=tensor_to_proto(attn),
            loss_mask=tensor_to_proto(loss),
        )
        running = stub.Generate(request, timeout=30)
        assert gate.entered.wait(30)
        queued = stub.Generate(request, timeout=30)
        _wait(lambda: srv.scheduler.pending() == 1)
        queued.cancel()
        gate.event.set()
        assert len(list(running)) > 1  # header + chunks
        _wait(lambda: srv.scheduler.pending() == 0 and session.stats.in_flight == 0)
        time.sleep(0.2)
        assert srv.metrics.forwards == forwards + 2
        assert not [r for r in caplog.records if r.name == "draftfeed.service"], caplog.text
    finally:
        gate.event.set()
        srv.stop(grace=0)


def test_idle_connections_cannot_keep_new_binds_out(caplog):
    """64 connections that never send a ticket (the issue's attack, from the client's own host) hold
    no more than `max_handshakes_per_peer` waiting slots: each new connection past the bound closes
    the oldest waiting one of its peer host, so a real client still binds at once; another peer
    host's waiting connections are not touched."""
    from types import SimpleNamespace

    from draftfeed.server.dataplane import DataPlaneServer

    caplog.set_level(logging.WARNING, logger="draftfeed.dataplane")
    plane = DataPlaneServer("127.0.0.1", 0, handshake_timeout_s=30)  # 64 in all, 8 per peer host
    other = [
        socket.create_connection(("127.0.0.1", plane.port), timeout=5, source_address=("127.0.0.2", 0))
        for _ in range(4)
    ]
    idle = [socket.create_connection(("127.0.0.1", plane.port), timeout=5) for _ in range(64)]
    try:
        for sock in idle[:56]:  # closed once 8 newer ones of the same host wait
            assert sock.recv(1) == b""
        session = SimpleNamespace(id="s" * 32, closed=False)
        client = DataPlaneClient("127.0.0.1", plane.port, plane.issue(session))  # binds at once
        assert plane.connected(session.id)
        assert idle[56].recv(1) == b""  # the oldest waiting one of its host made room
        for sock in other:  # the other host's connections still wait for their ticket
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        assert plane.evicted == 57
        assert "sent no ticket" in caplog.text
        client.close()
    finally:
        for sock in idle + other:
            sock.close()
        plane.close()


def test_a_normal_server_stop_is_a_clean_close_not_a_break(model, caplog):
    """A server that stops (drain, then its sockets close) says so on the data plane before closing it:
    a two-URL client fails over to the other server without any 'data plane broke' warning or log line
    (it logs the clean close at INFO); `test_fallback_when_the_data_plane_breaks` keeps the warning for a
    socket closed while its session lives."""
    caplog.set_level(logging.INFO, logger="draftfeed.client")
    a, b = start_server(model), start_server(model)
    local = HFDFlashTargetModel(model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with RemoteDFlashTargetModel.from_urls([a.url, b.url]) as remote:
                on_a = remote.servers[0].data
                for s in range(2):  # one request on each server, both over their data planes
                    assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
                assert on_a.replies == 1 and remote.servers[1].data.replies == 1
                a.stop(grace=5)
                _wait(lambda: not on_a.usable)
                assert on_a.closed_by_server and "server" in on_a.broken
                for s in range(4):  # a's turns fail over to b
                    assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
                assert remote.servers[1].data.usable
        broke = [str(w.message) for w in caught if "broke" in str(w.message)]
        assert not broke, broke
        warned = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and "data plane" in r.getMessage()
        ]
        assert not warned, warned
        assert "closed this session's data plane" in caplog.text
    finally:
        a.stop(grace=0)
        b.stop(grace=0)
