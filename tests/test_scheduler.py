"""The batch scheduler on a real model: exact answers across mixed jobs, fairness, OOM splitting,
cancellation of a closed session's queued requests."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_backends import inputs, mapping
from test_packing import packed_inputs

from draftfeed.client.errors import NotFound, ResourceExhausted
from draftfeed.client.payload import decode_fields
from draftfeed.server.scheduler import BatchScheduler
from draftfeed.server.sessions import SessionTable
from draftfeed.target.backends import (
    HFDFlashTargetModel,
    HFDSparkTargetModel,
    HFEagle3TargetModel,
    forward_for,
)
from draftfeed.target.capture import discover
from draftfeed.target.features import TokenBatch


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def tb(args):
    return TokenBatch(*args)


def fields_of(fut):
    reply = fut.result(timeout=60)
    reply.wait()
    return decode_fields(reply.tensors, reply.meta)


class Gate:
    """A forward that waits for `event` (set by the test), so requests pile up behind it."""

    def __init__(self, fail_over_rows: int | None = None):
        self.event = threading.Event()
        self.entered = threading.Event()  # a forward is at the gate: what a test waits for, not a sleep
        self.rows: list[int] = []
        self.fail_over_rows = fail_over_rows

    def __call__(self, model, layout, batch, needs):
        self.entered.set()
        self.event.wait(300)  # only bounds a test that never opens it
        rows = batch.input_ids.shape[0]
        self.rows.append(rows)
        if self.fail_over_rows is not None and rows > self.fail_over_rows:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return forward_for(model, layout, batch, needs)


def test_mixed_jobs_in_one_forward_get_their_own_exact_answers(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate()
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gate)
    sel, mask = mapping(160)
    e = table.open("eagle3", [1, 3, 4], "e", mapping=(sel, mask))
    f = table.open("dflash", [2, 6], "f", capture_logits=True)
    s = table.open("dspark", [-1, 2, 7], "s")
    blocker = sched.submit(f, tb(inputs(seed=9, s=5)))  # holds the worker at the gate
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    reqs = [
        (e, inputs(seed=0)),
        (f, inputs(seed=1)),
        (s, inputs(seed=2)),
        (e, inputs(seed=3, s=7)),  # another length: its own forward
        (s, packed_inputs(seed=4)),  # packed: its own forward
        (f, packed_inputs(seed=5)),
    ]
    futures = [sched.submit(sess, tb(args)) for sess, args in reqs]
    gate.event.set()
    blocker.result(timeout=60)
    local = {
        "e": HFEagle3TargetModel(model, [1, 3, 4]),
        "f": HFDFlashTargetModel(model, [2, 6], capture_logits=True),
        "s": HFDSparkTargetModel(model, [-1, 2, 7]),
    }
    local["e"].set_vocab_mapping(sel, mask)
    for (sess, args), fut in zip(reqs, futures, strict=True):
        got = fields_of(fut)
        want = local[sess.job_name].generate_batch(*args).tensors()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (sess.job_name, k)
    assert max(gate.rows) == 6  # the three same-shape unpacked requests (2 rows each) ran as one forward
    sched.stop()


def test_a_flooding_job_does_not_starve_a_light_one(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate()
    sched = BatchScheduler(model, layout, max_forward_tokens=24, max_queued_per_session=64, forward=gate)
    heavy = table.open("dspark", [1, 2], "heavy")
    light = table.open("dspark", [1, 2], "light")
    done: list[str] = []
    flood = [sched.submit(heavy, tb(inputs(seed=i))) for i in range(20)]  # 24 tokens each: one per forward
    for fut in flood:
        fut.add_done_callback(lambda _f: done.append("heavy"))
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    mine = sched.submit(light, tb(inputs(seed=99)))
    mine.add_done_callback(lambda _f: done.append("light"))
    gate.event.set()
    mine.result(timeout=60)
    for fut in flood:
        fut.result(timeout=60)
    # served after at most the heavy request already running and one more, not after the 20 queued
    assert done.index("light") <= 2, done
    sched.stop()


def test_a_job_gives_half_of_its_queue_to_a_batch(model):
    """With several requests queued, a job's batch takes half of them (at least one), so its other
    requests make the next batch, which runs while the first one's replies go out; two jobs' requests
    interleave in one batch instead of one job filling it."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate()
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gate)
    a, b = table.open("dspark", [1, 2], "a"), table.open("dspark", [1, 2], "b")
    blocker = sched.submit(a, tb(inputs(seed=0)))  # 2 rows each
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    futures = [sched.submit(a, tb(inputs(seed=i))) for i in range(1, 5)]
    gate.event.set()
    for f in [blocker, *futures]:
        f.result(timeout=60)
    assert gate.rows == [2, 4, 2, 2], gate.rows  # 4 queued: 2, then 1 of 2, then the last
    gate.rows.clear()
    gate.event.clear()
    gate.entered.clear()
    order = []
    blocker = sched.submit(a, tb(inputs(seed=0)))
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    futures = [sched.submit(s, tb(inputs(seed=i))) for s in (a, b) for i in range(1, 5)]
    for f, name in zip(futures, ["a"] * 4 + ["b"] * 4, strict=True):
        f.add_done_callback(lambda _f, name=name: order.append(name))
    gate.event.set()
    for f in [blocker, *futures]:
        f.result(timeout=60)
    assert gate.rows[:2] == [2, 8], gate.rows  # 2 of a's and 2 of b's together
    assert sorted(order[:4]) == ["a", "a", "b", "b"], order
    sched.stop()


def test_out_of_memory_splits_the_batch(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate(fail_over_rows=2)
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gate)
    jobs = [table.open("dflash", [1, 5], f"job{i}") for i in range(4)]
    first = sched.submit(jobs[0], tb(inputs(seed=0)))
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    futures = [sched.submit(j, tb(inputs(seed=i))) for i, j in enumerate(jobs)]
    gate.event.set()
    first.result(timeout=60)
    local = HFDFlashTargetModel(model, [1, 5])
    for i, fut in enumerate(futures):
        got = fields_of(fut)
        assert torch.equal(got["hidden_states"], local.generate_batch(*inputs(seed=i)).hidden_states)
    assert 8 in gate.rows and sched.metrics.oom_splits >= 1  # 4x2 rows failed, then halves ran
    sched.stop()


def test_closing_a_session_cancels_only_its_queued_requests(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate()
    sched = BatchScheduler(model, layout, max_forward_tokens=24, forward=gate)
    a = table.open("dspark", [1, 2], "a")
    b = table.open("dspark", [1, 2], "b")
    running = sched.submit(a, tb(inputs(seed=0)))
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    queued_a = [sched.submit(a, tb(inputs(seed=i))) for i in range(3)]
    queued_b = [sched.submit(b, tb(inputs(seed=i))) for i in range(3)]
    table.close(a.id)
    assert sched.cancel_session(a.id) == 3
    gate.event.set()
    for f in queued_a:  # answered with NotFound naming the closed session, never left without an answer
        with pytest.raises(
            NotFound, match=f"session {a.id} \\(job 'a'\\) was closed while this request was queued"
        ):
            f.result(timeout=60)
    for fut in queued_b:
        assert fields_of(fut)["target_hidden_states"].shape == (2, 12, 64)
    running.result(timeout=60)  # already on the GPU: finishes
    assert a.stats.in_flight == 0 and b.stats.in_flight == 0
    sched.stop()


def test_busy_time_is_the_union_of_intervals_never_above_wall_time():
    from draftfeed.server.metrics import BusyTime

    busy = BusyTime(since=0.0)
    busy.add(1.0, 3.0)  # a batch on the compute stream
    busy.add(2.5, 3.5)  # its reply's copy on the side stream, overlapping it
    busy.add(2.0, 2.2)  # accounted late, inside what is already counted
    busy.add(5.0, 6.0)
    busy.add(3.5, 4.0)  # touches the first union
    assert busy.between(0.0, 10.0) == pytest.approx(4.0)  # [1, 4] + [5, 6]: overlaps count once
    assert busy.between(2.0, 5.5) == pytest.approx(2.5)
    assert busy.between(3.9, 3.9) == 0.0
    for t0 in (0.0, 0.5, 1.0, 2.9, 4.5):  # any window: busy <= its length
        for t1 in (t0 + 0.1, t0 + 1.0, t0 + 3.0, 10.0):
            assert busy.between(t0, t1) <= t1 - t0 + 1e-12
    # the sum of the intervals would exceed the window; the union does not
    crowded = BusyTime(since=0.0)
    for i in range(100):
        crowded.add(i * 0.01, i * 0.01 + 0.5)
    assert crowded.between(0.0, 1.49) == pytest.approx(1.49)


def test_busy_time_counts_a_running_interval_up_to_now_and_folds_old_ones():
    from draftfeed.server.metrics import BusyTime

    now = time.perf_counter()
    busy = BusyTime(since=now - 10.0, keep_s=1.0)
    busy.open("span", now - 2.0)
    assert busy.total(now=now) == pytest.approx(2.0)  # the running interval counts up to now
    assert busy.total(now=now + 0.5) == pytest.approx(2.5)
    assert 2.0 <= busy.total() <= 2.0 + (time.perf_counter() - now)  # the default `now` is the clock
    busy.close("span", now - 1.0)
    assert busy.total() == pytest.approx(1.0)
    for k in range(5):  # old intervals fold into a total, the newest stay
        busy.add(now - 9.0 + k * 0.5, now - 9.0 + k * 0.5 + 0.25)
    assert busy.total() == pytest.approx(1.0 + 5 * 0.25)
    assert len(busy._starts) <= 3


def test_server_busy_fraction_stays_within_one(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000)
    job = table.open("dflash", [1, 5], "j")
    t0 = time.perf_counter()
    futures = [sched.submit(job, tb(inputs(seed=i))) for i in range(6)]
    for fut in futures:
        fut.result(timeout=60).wait()
    t1 = time.perf_counter()
    m = sched.metrics
    assert 0 < m.busy_between(t0, t1) <= t1 - t0
    assert 0 < m.busy_fraction <= 1 and m.busy_s <= time.perf_counter() - m.busy.since
    m.busy.add(t0 - 0.5, t1)  # an overlapping span accounted late adds only what it does not overlap
    assert m.busy_between(t0, t1) == pytest.approx(t1 - t0) and m.busy_fraction <= 1
    sched.stop()


def test_post_processing_overlaps_the_next_forward(model):
    """The post stage of one batch runs while the next batch's forward runs: the first batch's post
    stage is held until the second forward has started. Done one after the other on one thread, this
    would never finish."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    second_forward = threading.Event()
    calls = []

    def forward(model_, layout_, batch, needs):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            second_forward.set()
        return forward_for(model_, layout_, batch, needs)

    sched = BatchScheduler(model, layout, max_forward_tokens=10, forward=forward)  # one request per forward
    post, stages = sched._post, []

    def held_post(item):
        stages.append(threading.current_thread().name)
        if len(stages) == 1:
            assert second_forward.wait(30), "the next forward did not start while a batch was post-processed"
        post(item)

    sched._post = held_post
    job = table.open("dflash", [1, 5], "job")
    futures = [sched.submit(job, tb(inputs(seed=i, s=5))) for i in range(3)]
    local = HFDFlashTargetModel(model, [1, 5])
    for i, fut in enumerate(futures):
        assert torch.equal(
            fields_of(fut)["hidden_states"], local.generate_batch(*inputs(seed=i, s=5)).hidden_states
        )
    sched.stop()
    assert set(calls) == {"draftfeed-gpu-worker"} and set(stages) == {"draftfeed-post"}


def test_a_request_failing_after_the_forward_fails_alone(model):
    """Post-processing that fails for one request (here its session's features raise; an
    out-of-memory error while encoding is answered RESOURCE_EXHAUSTED) leaves its batch-mates served."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate = Gate()
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gate)
    broken, oom, fine = (table.open("dflash", [1, 5], name) for name in ("broken", "oom", "fine"))

    class Raising:
        def __init__(self, features, err):
            self.features, self.err = features, err
            self.needs = features.needs

        def fields(self, cap, tb_):
            raise self.err

    broken.features = Raising(broken.features, ValueError("injected: a bug in this session's features"))
    oom.features = Raising(oom.features, torch.OutOfMemoryError("injected: CUDA out of memory"))
    blocker = sched.submit(fine, tb(inputs(seed=9, s=5)))  # holds the worker at the gate
    assert gate.entered.wait(300)  # the worker holds the first request at the gate
    futures = [sched.submit(s, tb(inputs(seed=i))) for i, s in enumerate((broken, oom, fine))]
    gate.event.set()
    blocker.result(timeout=60)
    with pytest.raises(ValueError, match="injected"):
        futures[0].result(timeout=60)
    with pytest.raises(ResourceExhausted, match="out of device memory encoding the reply"):
        futures[1].result(timeout=60)
    got = fields_of(futures[2])["hidden_states"]
    assert torch.equal(got, HFDFlashTargetModel(model, [1, 5]).generate_batch(*inputs(seed=2)).hidden_states)
    assert gate.rows == [2, 6]  # the blocker, then the three in one forward
    assert sched.metrics.requests_failed == 2 and fine.stats.in_flight == broken.stats.in_flight == 0
    sched.stop()


PACKING = ("position_ids", "seq_lens", "doc_remaining")
# every subset of the packing metadata a request may send (doc_remaining needs one of the others)
SUBSETS = [
    ("position_ids",),
    ("seq_lens",),
    ("position_ids", "seq_lens"),
    ("position_ids", "doc_remaining"),
    ("seq_lens", "doc_remaining"),
    ("position_ids", "seq_lens", "doc_remaining"),
]


def _packed(seed, subset):
    ids, attn, loss, *meta = packed_inputs(seed=seed)
    return (ids, attn, loss, *(m if name in subset else None for name, m in zip(PACKING, meta, strict=True)))


class EnteredGate(Gate):
    """A Gate that also says when the worker has reached it (so requests queue behind it)."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()

    def __call__(self, model, layout, batch, needs):
        self.entered.set()
        return super().__call__(model, layout, batch, needs)


def test_packed_requests_with_any_metadata_subset_share_a_batch_exactly(model):
    """Issue 16.1: two jobs' packed requests of one length, each sending any subset of the packing
    metadata, in either order, share a forward; each gets what it gets served alone."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    first = table.open("dspark", [-1, 2, 7], "first")
    second = table.open("dflash", [1, 4, 6], "second", capture_logits=True)
    local = {
        "first": HFDSparkTargetModel(model, [-1, 2, 7]),
        "second": HFDFlashTargetModel(model, [1, 4, 6], capture_logits=True),
    }
    want = {}
    for name, backend in local.items():
        for i, subset in enumerate(SUBSETS):
            want[name, subset] = backend.generate_batch(*_packed(i, subset)).tensors()
    checked = 0
    for subset_a in SUBSETS:
        for subset_b in SUBSETS:
            # every (lead's subset, other's subset) pair; which job leads alternates
            flip = (SUBSETS.index(subset_a) + SUBSETS.index(subset_b)) % 2
            for lead, other in [((first, second), (second, first))[flip]]:
                gate = EnteredGate()
                sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gate)
                blocker = sched.submit(lead, tb(inputs(seed=9, s=5)))  # the lead's queue comes first
                assert gate.entered.wait(30)
                sa, sb = subset_a, subset_b
                futures = [
                    (lead, sa, sched.submit(lead, tb(_packed(SUBSETS.index(sa), sa)))),
                    (other, sb, sched.submit(other, tb(_packed(SUBSETS.index(sb), sb)))),
                ]
                gate.event.set()
                blocker.result(timeout=60)
                for session, subset, fut in futures:
                    got = fields_of(fut)
                    expected = want[session.job_name, subset]
                    assert set(got) == set(expected), (session.job_name, subset)
                    for k in expected:
                        assert torch.equal(got[k], expected[k]), (lead.job_name, sa, sb, session.job_name, k)
                    checked += 1
                assert gate.rows == [2, 4], gate.rows  # the two packed requests (2 rows each) in one forward
                sched.stop()
    assert checked == 2 * len(SUBSETS) ** 2
