"""Between the gRPC handlers and the model: a bounded queue and one GPU worker.

Handlers `submit` validated requests. The worker takes requests from all sessions that share a
sequence length (and packing), up to a token budget, in weighted-fair order, runs ONE target
forward for the union of the layers their sessions need, and hands the captures to a second
thread, the post stage, then goes on to the next batch. The post stage gives each request its own
slice on its own CUDA stream: shift, draft-vocab projection and encoding run on the device while
the next forward is issued and runs, then an asynchronous copy into pinned host memory on a side
stream. The reply writer waits on that copy's event, then verifies the encode's checks and runs
host stages (`Reply.wait`). At most one forwarded batch waits for the post stage (its captures are
the memory held), so a slow post stage holds the worker back instead of growing a queue. Nothing
after the forward waits on the device: no `.item()`, no data-dependent dtype or shape, no pageable
copy (tests/test_host_syncs.py proves it), and request ids reach the GPU from pinned memory with
non-blocking copies.

Why two threads: a forward is issued from Python in a few to tens of milliseconds, and the
per-request post-processing is as many small kernels again. Issued from one thread the GPU idles
while the next forward waits for the previous batch's post-processing to be issued; with the post
stage on its own thread and stream, that work overlaps the next forward (bench/serving.py).

GPU busy time is the union of the intervals between CUDA timing events (each forward on the
compute stream, each post stage on its stream, each reply's copy on the side stream), converted to
the host clock and merged by `ServerMetrics.busy` (server/metrics.py): overlapping intervals count
once. A forward's duration (the metrics' forward time, the status page's "forward ms") is on a GPU its
GPU time between the same events, recorded once it has run: issuing a graphed forward takes ~1 ms of host
time whatever it costs the GPU. On a card shared with other processes it includes their time slices.

The forward is `forward_for`, or on a GPU `GraphedForward` (server/graphs.py: a CUDA graph per
repeated batch shape). Requests are checked for padding on the handler's thread (host memory); a
batch with none reaches the forward with `attention_mask=None`, so HF need not read the mask on the
device (target/causal_mask.py).

Stacking only requests of equal length keeps every answer bit-identical to serving it alone on
CPU in fp32; padding to a common length changes sdpa's numerics (measured: 1.3e-6 max abs on
SmolLM2 dims), so requests of other lengths run in their own forward.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch

from draftfeed.client.errors import Busy, DraftfeedError, NotFound, ResourceExhausted, Unavailable
from draftfeed.client.payload import PendingFields, encode_fields_on_device
from draftfeed.target.backends import forward_for
from draftfeed.target.capture import Captured, TargetLayout
from draftfeed.target.features import TokenBatch
from draftfeed.target.packing import stack_packed

from .metrics import ServerMetrics
from .sessions import Session

__all__ = ["BatchScheduler", "Reply"]

log = logging.getLogger("draftfeed.scheduler")


class Reply:
    """A request's encoded reply. `wait()` (or reading `tensors`/`meta`) waits for its copy to the
    host, verifies what the encode checked on the device (NaN/inf refused, ids in range) and runs
    host stages; a failed check raises InvalidArgument for this request alone, on every call."""

    def __init__(
        self,
        pending: PendingFields,
        ready: torch.cuda.Event | None = None,
        tokens: int = 0,
        on_error=None,
    ):
        self.ready = ready
        self.tokens = tokens
        self._pending: PendingFields | None = pending
        self._on_error = on_error
        self._lock = threading.Lock()
        self._result: tuple[dict[str, torch.Tensor], dict] | None = None
        self._error: DraftfeedError | None = None

    def wait(self) -> None:
        with self._lock:
            if self._pending is not None:
                if self.ready is not None:
                    self.ready.synchronize()
                pending, self._pending = self._pending, None
                try:
                    self._result = pending.finish()
                except DraftfeedError as err:
                    self._error = err
                    if self._on_error is not None:
                        self._on_error()
            if self._error is not None:
                raise self._error

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        self.wait()
        return self._result[0]

    @property
    def meta(self) -> dict:
        self.wait()
        return self._result[1]


@dataclass(eq=False)
class _Work:
    session: Session
    tb: TokenBatch
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)
    unpadded: bool = False  # no padding, checked on the host at submit (see target/causal_mask.py)

    @property
    def tokens(self) -> int:
        return self.tb.input_ids.numel()

    @property
    def key(self) -> tuple:
        return (self.tb.input_ids.shape[1], self.tb.packed)


@dataclass(eq=False)
class _Forwarded:
    """A batch whose forward has been issued: what the post stage needs."""

    works: list[_Work]
    tbs: list[TokenBatch]
    cap: Captured
    t0: float
    t1: float
    done: torch.cuda.Event | None = None  # the forward's end on the compute stream


class BatchScheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        layout: TargetLayout,
        *,
        max_forward_tokens: int = 16384,
        max_queue: int = 256,
        max_queued_per_session: int = 32,
        metrics: ServerMetrics | None = None,
        forward=forward_for,
        max_forwarded: int = 1,
    ):
        self.model = model
        self.layout = layout
        self.device = next(model.parameters()).device
        self.max_forward_tokens = max_forward_tokens
        self.max_queue = max_queue
        self.max_queued_per_session = max_queued_per_session
        self.metrics = metrics or ServerMetrics()
        self._forward = forward
        self._queues: dict[str, deque[_Work]] = {}
        self._vtime: dict[str, float] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self.vocab_size = layout.vocab_size
        on_gpu = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._post_stream = torch.cuda.Stream(self.device) if on_gpu else None
        # forwarded batches that may wait for the post stage (their captures are the memory held)
        self._posts: queue.Queue[_Forwarded | None] = queue.Queue(maxsize=max_forwarded)
        # (start, end, forward tokens or None) CUDA timing events not yet accounted as busy time
        self._gpu_spans: list = []
        self._spans_lock = threading.Lock()
        if on_gpu:  # the one host sync: pair a CUDA event with the host clock, before any request
            anchor = torch.cuda.Event(enable_timing=True)
            anchor.record(torch.cuda.current_stream(self.device))
            anchor.synchronize()
            self._clock = (anchor, time.perf_counter())
            self.metrics.poll_busy = self._account_gpu_time
        self._thread = threading.Thread(target=self._loop, name="draftfeed-gpu-worker", daemon=True)
        self._post_thread = threading.Thread(target=self._post_loop, name="draftfeed-post", daemon=True)
        self._thread.start()
        self._post_thread.start()

    # -- handler side -------------------------------------------------------------------------

    def submit(self, session: Session, tb: TokenBatch) -> Future:
        if self._copy_stream is not None:  # pinned on the handler's thread: the worker copies without waiting
            tb = TokenBatch(**{k: (v.pin_memory() if v is not None else None) for k, v in vars(tb).items()})
        fut: Future = Future()
        mask = tb.attention_mask
        unpadded = not tb.packed and mask is not None and mask.device.type == "cpu" and bool(mask.all())
        with self._cv:
            if self._stopping:
                raise Unavailable(
                    "the server is shutting down and takes no new requests; retry on another server"
                )
            q = self._queues.setdefault(session.id, deque())
            if len(q) >= self.max_queued_per_session:
                raise Busy(
                    f"job {session.job_name!r} already has {len(q)} requests queued (per-job limit "
                    f"{self.max_queued_per_session}); wait for replies before sending more (retry in ~1 s)"
                )
            if self.metrics.queue_depth >= self.max_queue:
                raise Busy(f"the server queue is full ({self.max_queue} requests); retry in ~1 s")
            if session.id not in self._vtime:  # a newcomer starts level with the others, not ahead
                self._vtime[session.id] = min(self._vtime.values(), default=0.0)
            q.append(_Work(session, tb, fut, unpadded=unpadded))
            self.metrics.queue_depth += 1
            session.stats.queued()
            self._cv.notify()
        return fut

    def cancel_session(self, session_id: str) -> int:
        """Drop a closed session's queued requests: each future fails with NotFound naming the
        session (its call answers that, never nothing). Requests already on the GPU finish."""
        with self._cv:
            q = self._queues.pop(session_id, deque())
            self._vtime.pop(session_id, None)
            self.metrics.queue_depth -= len(q)
        for w in q:
            w.session.stats.dropped()
            if w.future.set_running_or_notify_cancel():  # not cancelled with its call meanwhile
                w.future.set_exception(_closed(w.session))
        return len(q)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._cv:
            self._stopping = True
            if not drain:
                for sid in list(self._queues):
                    for w in self._queues.pop(sid):
                        w.future.set_exception(Unavailable("the server stopped before this request ran"))
                self.metrics.queue_depth = 0
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._thread.join(timeout)
        if not self._thread.is_alive():  # the worker hands over nothing more: end the post stage
            self._posts.put(None)
            self._post_thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    # -- worker side --------------------------------------------------------------------------

    def _take(self) -> list[_Work] | None:
        """The next batch: the lead request from the session with the least weighted service, then
        more requests of the same shape class, one per session in that order, round after round, up
        to the token budget. A session gives at most half of what it has queued (at least one), so
        its other requests form the next batch, which runs while this one's replies are encoded and
        sent: a job with several requests in flight never waits for all of them at once."""
        with self._cv:
            while not any(self._queues.values()):
                if self._stopping:
                    return None
                self._cv.wait()
            order = sorted((sid for sid, q in self._queues.items() if q), key=lambda sid: self._vtime[sid])
            lead = self._queues[order[0]][0]
            share = {sid: (len(self._queues[sid]) + 1) // 2 for sid in order}
            batch, budget = [], self.max_forward_tokens
            while budget > 0:
                took = False
                for sid in order:
                    q = self._queues[sid]
                    if share[sid] and q and q[0].key == lead.key and (not batch or q[0].tokens <= budget):
                        w = q.popleft()
                        batch.append(w)
                        budget -= w.tokens
                        share[sid] -= 1
                        self._vtime[sid] += w.tokens / w.session.weight
                        took = True
                if not took:
                    break
            self.metrics.queue_depth -= len(batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                live = []
                for w in batch:
                    if not w.future.set_running_or_notify_cancel():  # cancelled with its call
                        w.session.stats.dropped()
                    elif w.session.closed:  # closed after it was taken: cancel_session no longer sees it
                        w.session.stats.dropped()
                        w.future.set_exception(_closed(w.session))
                    else:
                        live.append(w)
                if live:
                    self._run(live)
            except Exception:  # the worker must outlive any batch
                log.exception("the GPU worker hit an error outside a batch")

    def _run(self, works: list[_Work]) -> None:
        try:
            self._serve(works)
        except torch.OutOfMemoryError:
            if len(works) == 1:
                self._fail_out_of_memory(works[0], "running")
                return
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.metrics.oom_splits += 1
            log.warning("out of memory on a batch of %d requests; splitting it", len(works))
            half = len(works) // 2
            self._run(works[:half])
            self._run(works[half:])
        except Exception as err:  # one batch failing must never stop the worker
            log.exception("batch of %d requests failed", len(works))
            for w in works:
                self._fail(w, err)

    def _fail_out_of_memory(self, w: _Work, doing: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        b, s = w.tb.input_ids.shape
        self._fail(
            w,
            ResourceExhausted(
                f"out of device memory {doing} one request of {b}x{s} tokens; send smaller batches "
                "or retry when the server is less busy"
            ),
        )

    def _fail(self, w: _Work, err: BaseException) -> None:
        w.session.stats.dropped()
        self.metrics.requests_failed += 1
        if not w.future.done():
            w.future.set_exception(err)

    def _host_time(self, event: torch.cuda.Event) -> float:
        """perf_counter time of a completed timing event, from the latest reference event."""
        ref, ref_host = self._clock
        return ref_host + ref.elapsed_time(event) / 1e3

    def _account_gpu_time(self) -> None:
        """Turn finished CUDA spans into busy intervals (a running one counts up to now). Only
        `Event.query`: never waits on the device. Safe from any thread."""
        with self._spans_lock:
            left = []
            for span in self._gpu_spans:
                start, end, tokens = span
                if end.query():
                    self.metrics.busy.close(span, self._host_time(end))
                    self.metrics.busy.add(self._host_time(start), self._host_time(end))
                    self._clock = (end, self._host_time(end))  # keep the reference recent
                    if (
                        tokens is not None
                    ):  # a forward: its duration is its GPU time (issuing one takes ~1 ms)
                        seconds = start.elapsed_time(end) / 1e3
                        self.metrics.record_forward(tokens, self.max_forward_tokens, seconds)
                elif start.query():
                    self.metrics.busy.open(span, self._host_time(start))
                    left.append(span)
                else:
                    left.append(span)
            self._gpu_spans = left

    def _gpu_span(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        return start

    def _end_gpu_span(
        self, start: torch.cuda.Event, stream: torch.cuda.Stream, forward_tokens: int | None = None
    ) -> torch.cuda.Event:
        """Close a span; a forward's (`forward_tokens` given) is recorded as one once it has run."""
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        with self._spans_lock:
            self._gpu_spans.append((start, end, forward_tokens))
        return end

    def _serve(self, works: list[_Work]) -> None:
        """The forward stage: copy the requests in, run one forward, hand the captures on."""
        t0 = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            self._account_gpu_time()
            compute = torch.cuda.current_stream(self.device)
            start_ev = self._gpu_span(compute)
        tbs = [w.tb.to(self.device, non_blocking=True) for w in works]
        stacked = _stack(tbs)
        if not stacked.packed and all(w.unpadded for w in works):
            stacked = replace(stacked, attention_mask=None)  # the forward skips reading it (causal_mask.py)
        needs = works[0].session.features.needs
        for w in works[1:]:
            needs = needs | w.session.features.needs
        cap = self._forward(self.model, self.layout, stacked, needs)
        t1 = time.perf_counter()
        tokens = sum(w.tokens for w in works)
        if on_gpu:  # recorded with its GPU time once it has run (_account_gpu_time)
            done = self._end_gpu_span(start_ev, compute, forward_tokens=tokens)
        else:
            done = None
            self.metrics.busy.add(t0, t1)
            self.metrics.record_forward(tokens, self.max_forward_tokens, t1 - t0)
        self._posts.put(_Forwarded(works, tbs, cap, t0, t1, done))  # waits while the post stage is behind

    def _post_loop(self) -> None:
        while (item := self._posts.get()) is not None:
            try:
                self._post(item)
            except Exception as err:  # the post stage must outlive any batch
                log.exception("post-processing a batch of %d requests failed", len(item.works))
                for w in item.works:
                    if not w.future.done():
                        self._fail(w, err)

    def _post(self, item: _Forwarded) -> None:
        """The post stage: each request's slice, shifted, projected and encoded on the device, then
        copied to the host; on a GPU on the post stream, after the forward's event."""
        stream = self._post_stream
        if stream is not None:
            stream.wait_event(item.done)
            # allocated on the compute stream, freed here: not reused before the post stream read them
            for t in _device_tensors(item.cap, item.tbs):
                t.record_stream(stream)
            start_ev = self._gpu_span(stream)
        p0 = time.perf_counter()
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            row = 0
            for w, tb in zip(item.works, item.tbs, strict=True):
                rows = slice(row, row + tb.input_ids.shape[0])
                row = rows.stop
                e0 = time.perf_counter()
                try:
                    fields = w.session.features.fields(_slice(item.cap, rows), tb)
                    pending = encode_fields_on_device(
                        fields, w.session.encodings, self.layout.hidden_size, vocab_size=self.vocab_size
                    )
                    reply = self._to_host(pending, w)
                except torch.OutOfMemoryError:
                    self._fail_out_of_memory(w, "encoding the reply of")
                    continue
                except Exception as err:  # this request's post-processing failed: it fails alone
                    log.exception("post-processing a request of job %r failed", w.session.job_name)
                    self._fail(w, err)
                    continue
                now = time.perf_counter()
                w.session.stats.served(item.t0 - w.enqueued, item.t1 - item.t0, now - e0)
                self.metrics.record_request(
                    w.session.job_name, item.t0 - w.enqueued, now - w.enqueued, now - e0
                )
                w.future.set_result(reply)
        if stream is not None:
            self._end_gpu_span(start_ev, stream)
        else:
            self.metrics.busy.add(p0, time.perf_counter())

    def _reply_failed(self) -> None:
        self.metrics.requests_failed += 1

    def _to_host(self, pending: PendingFields, w: _Work) -> Reply:
        """The designated device-to-host step: copy the encoded parts (and the checks' values) into
        pinned host buffers on the side stream; the reply's event marks the copy done."""
        if self._copy_stream is None:
            return Reply(pending, None, w.tokens, self._reply_failed)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(stream):
            copy_start = self._gpu_span(stream)
            for k, v in pending.device_tensors().items():
                v.record_stream(stream)
                h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                h.copy_(v, non_blocking=True)
                host[k] = h
            event = self._end_gpu_span(copy_start, stream)
        return Reply(pending.rebind(host), event, w.tokens, self._reply_failed)


def _closed(session: Session) -> NotFound:
    return NotFound(
        f"session {session.id} (job {session.job_name!r}) was closed while this request was queued; "
        "open a new session and send it again"
    )


def _stack(tbs: list[TokenBatch]) -> TokenBatch:
    """The forward's batch: the requests' rows, one under the other. Packed requests may each send
    another subset of the packing metadata; `stack_packed` gives every row the documents and
    positions its request has alone. Replies are built from each request's own `TokenBatch`."""
    if len(tbs) == 1:
        return tbs[0]

    def cat(name):
        return torch.cat([getattr(t, name).long() for t in tbs])

    ids, attn, loss = cat("input_ids"), cat("attention_mask"), cat("loss_mask")
    if not tbs[0].packed:  # a batch's requests share one shape class (`_Work.key`): all packed or none
        return TokenBatch(ids, attn, loss)
    seq_lens, position_ids = stack_packed(tbs)
    return TokenBatch(ids, attn, loss, position_ids, seq_lens)


def _slice(cap: Captured, rows: slice) -> Captured:
    return cap.map(lambda t: t[rows])


def _device_tensors(cap: Captured, tbs: list[TokenBatch]):
    yield from cap.tensors()
    for tb in tbs:
        yield from (t for t in vars(tb).values() if t is not None)
