"""Graceful lifecycle with a real `draftfeed serve` subprocess (SIGTERM drains and loses no request in
flight; a second SIGTERM exits at once), and clients across several servers: a list of URLs fails
over, one balanced gRPC target (`ipv4:A,B`, round_robin) spreads requests and survives one going away."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from test_backends import inputs, mapping
from test_service import assert_same, start_server

from draftfeed.client.channel import check_health, parse_target
from draftfeed.client.errors import InvalidArgument, Unavailable
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteEagle3TargetModel
from draftfeed.client.wire import TargetStub, tensor_to_proto
from draftfeed.target.backends import HFDFlashTargetModel, HFEagle3TargetModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


class Served:
    """`draftfeed serve` in a subprocess; stdout/stderr collected by threads."""

    def __init__(self, model_dir, *args, launcher=(sys.executable,), timeout=300):  # bounds a hang only
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        cmd = [*launcher, "-m", "draftfeed.server.cli", "serve", "--model", model_dir, "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--device", "cpu", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(
                target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True
            ).start()
        deadline = time.time() + timeout
        while not any("serving on" in line for line in self.out):
            assert self.proc.poll() is None and time.time() < deadline, "".join(self.err)[-3000:]
            time.sleep(0.05)
        banner = next(line for line in self.out if "serving on" in line)
        self.banner = banner
        self.url = re.search(r"(grpc://[0-9.]+:[0-9]+)", banner).group(1)
        m = re.search(r"admin on http://[^:]+:([0-9]+)", banner)
        self.admin = f"http://127.0.0.1:{m.group(1)}" if m else None

    def wait_for(self, text, timeout=300):  # bounds a hang only
        deadline = time.time() + timeout
        while not any(text in line for line in self.err):
            assert time.time() < deadline, f"no {text!r} in stderr: {''.join(self.err)[-3000:]}"
            time.sleep(0.01)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_sigterm_finishes_every_request_in_flight(tiny_dirs, model):
    import requests

    served = Served(tiny_dirs("llama"), "--admin-port", "0", "--grace-seconds", "30")
    try:
        assert "only clients on this machine" in served.banner
        big = [inputs(seed=s, b=8, s=256) for s in range(8)]
        # the references first, before any request: the timed window below is the drain alone, not the
        # test's own forwards competing for the same CPUs (under load they once pushed it to 37 s)
        local = HFDFlashTargetModel(model, capture_logits=True)
        expected = [local.generate_batch(*b) for b in big]
        streamed = RemoteDFlashTargetModel.from_urls([served.url], capture_logits=True, max_in_flight=8)
        unary = RemoteDFlashTargetModel.from_urls([served.url], capture_logits=True)
        futures = [streamed.generate_batch_async(*b) for b in big]
        unary_out: dict[int, object] = {}
        threads = [
            threading.Thread(target=lambda i=i: unary_out.__setitem__(i, unary.generate_batch(*big[i])))
            for i in range(3)
        ]
        for t in threads:
            t.start()
        futures[0].result(timeout=60)
        done_at_signal = sum(f.done() for f in futures)
        served.proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        served.wait_for("draining")
        try:  # while draining (or already gone): never SERVING, never ready
            assert check_health(served.url, timeout=2) == "NOT_SERVING"
            assert requests.get(f"{served.admin}/readyz", timeout=2).status_code == 503
        except (Unavailable, requests.ConnectionError):
            pass
        with pytest.raises(Unavailable):  # new work is refused
            RemoteDFlashTargetModel.from_urls([served.url], timeout=5).generate_batch(*inputs())
        assert served.proc.wait(30) == 0
        drain_s = time.perf_counter() - t0
        for fut, want in zip(futures, expected, strict=True):
            assert_same(fut.result(timeout=60), want)
        for t in threads:
            t.join(60)
        for i in range(3):
            assert_same(unary_out[i], expected[i])
        assert drain_s < 30, f"SIGTERM to exit took {drain_s:.1f} s"
        assert done_at_signal < len(futures), "every request finished before SIGTERM; the test proves nothing"
        assert any("drained and stopped" in line for line in served.err)
    finally:
        served.kill()


def unread_stream(url: str, n: int):
    """(channel, call): a stream of `n` requests whose big replies (~13 MB each) nobody reads, so a
    draining server waits on flow control."""
    channel = grpc.insecure_channel(parse_target(url).address)
    stub = TargetStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest(algorithm="dflash", capture_logits=True)).session_id
    ids, attn, loss = inputs(b=64, s=256)
    request = pb.GenerateRequest(
        session_id=sid,
        input_ids=tensor_to_proto(ids),
        attention_mask=tensor_to_proto(attn),
        loss_mask=tensor_to_proto(loss),
    )
    return channel, stub.GenerateStream(iter([request] * n))


def wait_until(predicate, what: str, timeout: float = 300.0) -> None:
    """Poll `predicate` until it holds (`timeout` only bounds a hang, it is no guess of how long)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def test_second_sigterm_exits_at_once(tiny_dirs):
    import requests

    served = Served(tiny_dirs("llama"), "--grace-seconds", "60", "--admin-port", "0")
    try:
        # a stream whose big replies nobody reads keeps the drain waiting on flow control
        channel, call = unread_stream(served.url, 4)

        def stream_reached_the_server():
            listed = requests.get(f"{served.admin}/sessions", timeout=30).json()["sessions"]
            return any(s["requests"] or s["in_flight"] for s in listed)

        wait_until(stream_reached_the_server, "the unread stream's requests reach the server")
        served.proc.send_signal(signal.SIGTERM)
        served.wait_for("draining")
        time.sleep(1.0)
        assert served.proc.poll() is None, "the drain should still be waiting for the unread replies"
        t0 = time.perf_counter()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(10) == 1
        assert time.perf_counter() - t0 < 5
        call.cancel()
        channel.close()
    finally:
        served.kill()


def test_a_list_of_urls_fails_over(model):
    a, b = start_server(model), start_server(model)
    try:
        local = HFDFlashTargetModel(model)
        with RemoteDFlashTargetModel.from_urls([a.url, b.url]) as remote:
            for s in range(4):
                assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
            assert a.metrics.requests > 0 and b.metrics.requests > 0
            assert len(a.sessions.list()) == 1
            a.stop(grace=5)
            assert a.sessions.list() == [] and not a.ready  # the drain closed its session
            for s in range(4):  # UNAVAILABLE from a -> retried on b
                assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_one_balanced_target_spreads_sessions_across_replicas(model):
    a, b = start_server(model), start_server(model)
    try:
        url = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        assert (
            parse_target(url).balanced
            and parse_target(f"grpc://127.0.0.1:{a.port},127.0.0.1:{b.port}").balanced
        )
        with pytest.raises(InvalidArgument, match="several hosts by name"):
            parse_target("grpc://gpu-a:1,gpu-b:2")
        sel, mask = mapping(160)
        local = HFEagle3TargetModel(model)
        local.set_vocab_mapping(sel, mask)
        remote = RemoteEagle3TargetModel.from_urls(url)
        remote.set_vocab_mapping(sel, mask)
        for s in range(6):
            assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
        served = [sum(x.stats.requests for x in srv.sessions.list()) for srv in (a, b)]
        assert min(served) >= 2, served  # round_robin: both replicas answered, one session each
        # a new mapping reaches whichever replica answers next, and the prefetch stream too
        sel2, mask2 = mapping(160, vd=25, seed=7)
        remote.set_vocab_mapping(sel2, mask2)
        local.set_vocab_mapping(sel2, mask2)
        futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(3)]
        for s, fut in enumerate(futures):
            assert_same(fut.result(timeout=60), local.generate_batch(*inputs(seed=s)))
        for s in range(4):
            assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
        # one replica goes away: the channel keeps working on the other
        a.stop(grace=2)
        for s in range(4):
            got = remote.generate_batch(*inputs(seed=s))
            assert torch.equal(got.target_probs, local.generate_batch(*inputs(seed=s)).target_probs)
        remote.close()
        assert b.sessions.list() == [] or all(x.stats.in_flight == 0 for x in b.sessions.list())
    finally:
        a.stop(grace=0)
        b.stop(grace=0)


def test_a_draining_server_sends_new_requests_to_the_other_url(model):
    """While one server drains (held open by a stream whose replies nobody reads), new requests of a
    two-URL client get UNAVAILABLE there and are answered by the other server; the drain then ends."""
    a, b = start_server(model), start_server(model)
    channel = None
    try:
        local = HFDFlashTargetModel(model)
        remote = RemoteDFlashTargetModel.from_urls([a.url, b.url])
        channel, call = unread_stream(a.url, 3)
        wait_until(  # only the stream has sent requests to a so far
            lambda: any(x.stats.requests or x.stats.in_flight for x in a.sessions.list()),
            "the unread stream's requests reach a",
        )
        stopper = threading.Thread(target=a.stop, kwargs={"grace": 60})
        stopper.start()
        wait_until(lambda: a.servicer.draining, "a starts draining")
        mine = a.sessions.get(remote.servers[0].session_id)  # the two-URL client's session on a
        before = (mine.stats.requests, sum(x.stats.requests for x in b.sessions.list()))
        for s in range(4):  # every other request is a's turn: refused there, answered by b
            assert_same(remote.generate_batch(*inputs(seed=s)), local.generate_batch(*inputs(seed=s)))
        assert stopper.is_alive() and not a.ready, "a should still be draining"
        assert mine.stats.requests == before[0]
        assert sum(x.stats.requests for x in b.sessions.list()) == before[1] + 4
        with pytest.raises(Unavailable):
            RemoteDFlashTargetModel.from_urls([a.url], timeout=5)
        call.cancel()
        stopper.join(300)
        assert not stopper.is_alive() and a.sessions.list() == []
        remote.close()
    finally:
        if channel is not None:
            channel.close()
        a.stop(grace=0)
        b.stop(grace=0)
