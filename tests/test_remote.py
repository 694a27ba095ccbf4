"""The remote client (client/remote.py) when servers fail: every `generate_batch_async` future completes
(with the answer, or with the error once the retry budget is spent), whether the server is down, one of
two is killed, or it hangs; a trainer rides out its server's kill -9 and restart mid-run."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import pytest
from test_backends import inputs, mapping
from test_lifecycle import Served
from test_service import assert_same, start_server

from draftfeed.client.errors import DraftfeedError, Unavailable
from draftfeed.client.remote import RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.target.backends import HFDSparkTargetModel

WAIT = 120  # a bound for the test itself: a future that does not complete fails the test, not hangs it


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def test_async_to_a_server_that_went_down_completes_with_unavailable(model):
    srv = start_server(model)
    remote = RemoteEagle3TargetModel.from_urls([srv.url], retry_budget=1.0, timeout=10)
    remote.set_vocab_mapping(*mapping(160))
    remote.generate_batch_async(*inputs()).result(WAIT)  # a live stream first
    srv.stop(grace=0)
    try:
        # on the stream that broke, and on new streams whose reader dies before the request is queued
        futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(5)]
        for fut in futures:
            with pytest.raises(Unavailable, match="retry_budget"):
                fut.result(WAIT)
        assert remote.max_wait_s < float("inf")
    finally:
        remote.close()


def test_async_with_one_of_two_servers_killed_delivers_every_batch(model):
    a, b = start_server(model), start_server(model)
    local = HFDSparkTargetModel(model)
    remote = RemoteDSparkTargetModel.from_urls([a.url, b.url], retry_budget=30, max_in_flight=3)
    try:
        remote.generate_batch_async(*inputs()).result(WAIT)
        remote.generate_batch_async(*inputs()).result(WAIT)  # a stream to each
        b.stop(grace=0)
        futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(12)]
        for s, fut in enumerate(futures):
            assert_same(fut.result(WAIT), local.generate_batch(*inputs(seed=s)))
    finally:
        remote.close()
        a.stop(grace=0)


def _restart_on(port: int, model_dir: str, killed: Served, box: dict) -> None:
    """kill -9 `killed`, then start a new server on the same port (in the background of the test)."""
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(30)
    try:
        box["served"] = Served(model_dir, "--port", str(port), timeout=WAIT)
    except BaseException as err:  # noqa: BLE001 - reported by the test
        box["error"] = err
        box["served"] = killed


@pytest.fixture(scope="module")
def served(tiny_dirs):
    """A `draftfeed serve` subprocess of the tiny Llama; a test that restarts it puts the new one here."""
    box = {"served": Served(tiny_dirs("llama"))}
    yield box
    box["served"].kill()


def test_a_server_that_stops_answering_fails_the_futures_after_the_timeout(served):
    served = served["served"]
    remote = RemoteDSparkTargetModel.from_urls([served.url], timeout=2, retry_budget=1)
    try:
        remote.generate_batch_async(*inputs()).result(WAIT)
        served.proc.send_signal(signal.SIGSTOP)  # alive, connected, never answering
        futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(2)]
        for fut in futures:
            with pytest.raises(DraftfeedError):
                fut.result(WAIT)
    finally:
        served.proc.send_signal(signal.SIGCONT)
        remote.close()


def test_trainer_survives_a_kill_9_and_restart_mid_run(tmp_path, tiny_dirs, served):
    from test_loop import losses, make_cfg, word_tokenizer, write_chats

    from draftfeed.trainer.train import build_run, run_training

    target_dir = tmp_path / "target"
    shutil.copytree(tiny_dirs("llama"), target_dir)
    word_tokenizer().save_pretrained(target_dir)
    data = write_chats(tmp_path / "chats.jsonl", 24)
    loop = {"steps": 8, "log_every": 1, "prefetch": 3, "device": "cpu", "export": False}
    reference = run_training(make_cfg(tmp_path / "local", str(target_dir), data, loop=loop))

    box = served
    served = box["served"]
    port = int(served.url.rpartition(":")[2])
    run = build_run(
        make_cfg(tmp_path / "remote", str(target_dir), data, target={"url": [served.url]}, loop=loop)
    )

    class KillAtThirdBatch:
        """The data iterator: handing out the third batch kills the server and starts its restart."""

        def __init__(self, inner):
            self.inner, self.n, self.restart = inner, 0, None

        def __next__(self):
            self.n += 1
            if self.n == 3:
                self.restart = threading.Thread(
                    target=_restart_on, args=(port, tiny_dirs("llama"), served, box)
                )
                self.restart.start()
            return next(self.inner)

        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    batches = run.trainer.batches = KillAtThirdBatch(run.trainer.batches)
    try:
        t0 = time.perf_counter()
        result = run.trainer.train()
        took = time.perf_counter() - t0
        batches.restart.join(WAIT)
        assert "error" not in box, box.get("error")
        assert result.steps == 8
        assert losses(result) == losses(reference), took  # every batch delivered, each the right one
    finally:
        run.close()


def test_the_trainers_wait_for_a_batch_is_bounded(tmp_path, tiny_dirs):
    """A backend future that never completes (the bug of issue 16) stops the run with a clear error
    after the backend's `max_wait_s`, instead of hanging it."""
    from concurrent.futures import Future

    from test_loop import make_cfg, word_tokenizer, write_chats

    from draftfeed.trainer.train import build_run

    target_dir = tmp_path / "target"
    shutil.copytree(tiny_dirs("llama"), target_dir)
    word_tokenizer().save_pretrained(target_dir)
    run = build_run(make_cfg(tmp_path / "out", str(target_dir), write_chats(tmp_path / "c.jsonl", 8)))
    inner = run.trainer.backend

    class NeverAnswers:
        max_wait_s = 1.0

        def __getattr__(self, name):
            return getattr(inner, name)

        def generate_batch_async(self, *args, **kwargs):
            return Future()

    run.trainer.backend = NeverAnswers()
    try:
        with pytest.raises(Unavailable, match="no answer for a batch in 1 s"):
            run.trainer.train()
    finally:
        run.close()
