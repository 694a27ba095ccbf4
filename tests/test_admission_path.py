"""Both front-ends of one real server, the gRPC port and the NeMo HTTP port, take a data request through
the one admission path (server/admission.py): the same refusals with the same messages (a gRPC code
on one port, its HTTP status on the other), and the same accounting in the sessions' stats and the
server's metrics."""

from __future__ import annotations

import grpc
import pytest
import requests
from test_backends import inputs, mapping
from test_nemo_http import Client, gen_blob
from test_service import _generate_request

from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import ReplyAssembler, TargetStub, tensor_to_proto
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.server.nemo_http import NemoHTTPServer
from draftfeed.target.checks import Limits


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ports(model):
    # a per-request cap of 64 tokens: inputs() (2x12) passes, 2x40 does not
    cfg = ServeConfig(port=0, limits=Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=64))
    target = TargetServer(cfg, model=model).start()
    nemo = NemoHTTPServer(target, "127.0.0.1", 0).start()
    yield target, nemo
    nemo.stop()
    target.stop(grace=1)


def _grpc(target, session_id, args):
    """(reply or None, (code, message) or None) of one unary Generate."""
    stub = TargetStub(grpc.insecure_channel(target.url.removeprefix("grpc://")))
    try:
        return list(
            ReplyAssembler().replies(stub.Generate(_generate_request(session_id, *args), timeout=60))
        ), None
    except grpc.RpcError as err:
        return None, (err.code(), err.details())


def _counts(session):
    st = session.stats
    return st.requests, st.tokens, st.in_flight


def test_both_ports_refuse_alike_and_account_alike(ports):
    target, nemo = ports
    stub = TargetStub(grpc.insecure_channel(target.url.removeprefix("grpc://")))
    sel, mask = mapping(160)
    opened = stub.OpenSession(
        pb.OpenSessionRequest(
            algorithm="eagle3",
            job_name="grpc-job",
            selected_token_ids=tensor_to_proto(sel),
            selected_token_mask=tensor_to_proto(mask),
        )
    )
    grpc_session = target.sessions.get(opened.session_id)
    http = Client(nemo.url)
    http.set_vocab_mapping(sel, mask)
    (http_session,) = [s for s in target.sessions.list() if s.job_name.startswith("nemo-http")]
    assert target.servicer.admission is target.admission  # the one path both ports hold

    # admitted on both: one request, its tokens, a payload, nothing left in flight
    good = inputs()
    replies, refused = _grpc(target, opened.session_id, good)
    assert refused is None and len(replies) == 1
    http.generate(*good)
    for session in (grpc_session, http_session):
        assert _counts(session) == (1, good[0].numel(), 0) and session.stats.bytes_sent > 0
    assert target.metrics.requests == 2 and target.metrics.tokens == 2 * good[0].numel()
    assert target.admission.holds.held(grpc_session.id) == target.admission.holds.held(http_session.id) == 0

    # over the per-request cap, and a token outside the vocab: the same decision and message on both
    big = inputs(b=2, s=40)
    bad = (good[0].clone().fill_(999), *good[1:])
    for args, code, status, message in (
        (
            big,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            413,
            "2x40 = 80 tokens is over this server's per-request limit of 64",
        ),
        (bad, grpc.StatusCode.INVALID_ARGUMENT, 400, "token id 999, outside the target vocab"),
    ):
        _, (got_code, got_message) = _grpc(target, opened.session_id, args)
        r = http.post("generate", gen_blob(*args))
        assert got_code == code and r.status_code == status, (got_code, r.status_code, r.text)
        assert message in got_message and r.json()["detail"] == got_message
    # refused before the queue: nothing counted, nothing held, nothing reached the GPU
    for session in (grpc_session, http_session):
        assert _counts(session) == (1, good[0].numel(), 0)
    assert target.metrics.requests == 2 and target.metrics.forward_tokens == 2 * good[0].numel()
    assert target.admission.holds.held(grpc_session.id) == target.admission.holds.held(http_session.id) == 0

    # while the server drains, both refuse new requests as UNAVAILABLE (HTTP 503)
    target.admission.draining = True
    try:
        _, (got_code, got_message) = _grpc(target, opened.session_id, good)
        r = http.post("generate", gen_blob(*good))
        assert got_code == grpc.StatusCode.UNAVAILABLE and r.status_code == 503
        assert "draining" in got_message and r.json()["detail"] == got_message
    finally:
        target.admission.draining = False
    assert requests.get(f"{nemo.url}/health", timeout=5).status_code == 200
