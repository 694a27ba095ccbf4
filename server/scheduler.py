"""Between the gRPC handlers and the model: a bounded queue and one GPU worker.

Handlers `submit` validated requests. The worker takes requests from all sessions that share a
sequence length (and packing), up to a token budget, in weighted-fair order, runs ONE target
forward for the union of the layers their sessions need, and gives each request its own slice:
shift, draft-vocab projection and encoding run on the device, then an asynchronous copy into
pinned host memory on a side stream. The reply writer waits on that copy's event; the worker has
already moved on to the next batch.

Stacking only requests of equal length keeps every answer bit-identical to serving it alone on
CPU in fp32; padding to a common length changes sdpa's numerics (measured: 1.3e-6 max abs on
SmolLM2 dims), so requests of other lengths run in their own forward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from draftfeed.client.errors import ResourceExhausted, Unavailable
from draftfeed.client.payload import encode_fields

from .backends import forward_for
from .capture import Captured, TargetLayout
from .features import TokenBatch
from .metrics import ServerMetrics
from .sessions import Session

__all__ = ["BatchScheduler", "Reply"]

log = logging.getLogger("draftfeed.scheduler")


@dataclass
class Reply:
    """A request's encoded reply tensors on the host; wait on `ready` before reading them."""

    tensors: dict[str, torch.Tensor]
    meta: dict
    ready: torch.cuda.Event | None = None
    tokens: int = 0

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


@dataclass(eq=False)
class _Work:
    session: Session
    tb: TokenBatch
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> int:
        return self.tb.input_ids.numel()

    @property
    def key(self) -> tuple:
        return (self.tb.input_ids.shape[1], self.tb.packed)


class BatchScheduler:
    def __init__(
        self,
        model: torch.nn.Module,
        layout: TargetLayout,
        *,
        max_batch_tokens: int = 16384,
        max_queue: int = 256,
        max_queued_per_session: int = 32,
        metrics: ServerMetrics | None = None,
        forward=forward_for,
    ):
        self.model = model
        self.layout = layout
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.max_queued_per_session = max_queued_per_session
        self.metrics = metrics or ServerMetrics()
        self._forward = forward
        self._queues: dict[str, deque[_Work]] = {}
        self._vtime: dict[str, float] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._gpu_spans: deque = deque()  # (start, end) CUDA events of batches not yet accounted
        self._thread = threading.Thread(target=self._loop, name="draftfeed-gpu-worker", daemon=True)
        self._thread.start()

    # -- handler side -------------------------------------------------------------------------

    def submit(self, session: Session, tb: TokenBatch) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise Unavailable(
                    "the server is shutting down and takes no new requests; retry on another server"
                )
            q = self._queues.setdefault(session.id, deque())
            if len(q) >= self.max_queued_per_session:
                raise ResourceExhausted(
                    f"job {session.job_name!r} already has {len(q)} requests queued (per-job limit "
                    f"{self.max_queued_per_session}); wait for replies before sending more (retry in ~1 s)"
                )
            if self.metrics.queue_depth >= self.max_queue:
                raise ResourceExhausted(
                    f"the server queue is full ({self.max_queue} requests); retry in ~1 s"
                )
            if session.id not in self._vtime:  # a newcomer starts level with the others, not ahead
                self._vtime[session.id] = min(self._vtime.values(), default=0.0)
            q.append(_Work(session, tb, fut))
            self.metrics.queue_depth += 1
            session.stats.in_flight += 1
            self._cv.notify()
        return fut

    def cancel_session(self, session_id: str) -> int:
        """Drop a closed session's queued requests (their futures are cancelled)."""
        with self._cv:
            q = self._queues.pop(session_id, deque())
            self._vtime.pop(session_id, None)
            self.metrics.queue_depth -= len(q)
        for w in q:
            w.future.cancel()
            w.session.stats.in_flight -= 1
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
        self._thread.join(timeout)

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    # -- worker side --------------------------------------------------------------------------

    def _take(self) -> list[_Work] | None:
        """The next batch: the lead request from the session with the least weighted service,
        then more requests of the same shape class in the same order, up to the token budget."""
        with self._cv:
            while not any(self._queues.values()):
                if self._stopping:
                    return None
                self._cv.wait()
            order = sorted((sid for sid, q in self._queues.items() if q), key=lambda sid: self._vtime[sid])
            lead = self._queues[order[0]][0]
            batch, budget = [], self.max_batch_tokens
            for sid in order:
                q = self._queues[sid]
                while q and q[0].key == lead.key and (not batch or q[0].tokens <= budget):
                    w = q.popleft()
                    batch.append(w)
                    budget -= w.tokens
                    self._vtime[sid] += w.tokens / w.session.weight
                if budget <= 0:
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
                    if w.session.closed:
                        w.future.cancel()  # closed after it was taken: cancel_session no longer sees it
                    if not w.future.cancelled() and w.future.set_running_or_notify_cancel():
                        live.append(w)
                    else:
                        w.session.stats.in_flight -= 1
                if live:
                    self._run(live)
            except Exception:  # the worker must outlive any batch
                log.exception("the GPU worker hit an error outside a batch")

    def _run(self, works: list[_Work]) -> None:
        try:
            self._serve(works)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(works) == 1:
                w = works[0]
                b, s = w.tb.input_ids.shape
                self._fail(
                    w,
                    ResourceExhausted(
                        f"out of device memory for one request of {b}x{s} tokens; send smaller batches"
                    ),
                )
                return
            self.metrics.oom_splits += 1
            log.warning("out of memory on a batch of %d requests; splitting it", len(works))
            half = len(works) // 2
            self._run(works[:half])
            self._run(works[half:])
        except Exception as err:  # one batch failing must never stop the worker
            log.exception("batch of %d requests failed", len(works))
            for w in works:
                self._fail(w, err)

    def _fail(self, w: _Work, err: BaseException) -> None:
        w.session.stats.in_flight -= 1
        self.metrics.requests_failed += 1
        if not w.future.done():
            w.future.set_exception(err)

    def _account_gpu_time(self) -> None:
        """Add the GPU time of finished batches to busy_s (CUDA events; no synchronisation)."""
        while self._gpu_spans and self._gpu_spans[0][1].query():
            start, end = self._gpu_spans.popleft()
            self.metrics.busy_s += start.elapsed_time(end) / 1e3

    def _serve(self, works: list[_Work]) -> None:
        t0 = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            self._account_gpu_time()
            start_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
        tbs = [w.tb.to(self.device) for w in works]
        stacked = _stack(tbs)
        needs = works[0].session.features.needs
        for w in works[1:]:
            needs = needs | w.session.features.needs
        cap = self._forward(self.model, self.layout, stacked, needs)
        t1 = time.perf_counter()
        row = 0
        for w, tb in zip(works, tbs, strict=True):
            rows = slice(row, row + tb.input_ids.shape[0])
            row = rows.stop
            e0 = time.perf_counter()
            fields = w.session.features.fields(_slice(cap, rows), tb)
            tensors, meta = encode_fields(fields, w.session.encodings, self.layout.hidden_size)
            reply = self._to_host(tensors, meta, w.tokens)
            now = time.perf_counter()
            st = w.session.stats
            st.queue_wait_s += t0 - w.enqueued
            st.forward_s += t1 - t0
            st.encode_s += now - e0
            self.metrics.queue_wait_s += t0 - w.enqueued
            self.metrics.encode_s += now - e0
            st.in_flight -= 1
            w.future.set_result(reply)
        tokens = sum(w.tokens for w in works)
        if on_gpu:
            end_ev = torch.cuda.Event(enable_timing=True)
            end_ev.record()
            self._gpu_spans.append((start_ev, end_ev))
        busy = 0.0 if on_gpu else time.perf_counter() - t0
        self.metrics.record_forward(tokens, self.max_batch_tokens, t1 - t0, busy)

    def _to_host(self, tensors: dict[str, torch.Tensor], meta: dict, tokens: int) -> Reply:
        if self._copy_stream is None:
            return Reply({k: v.contiguous() for k, v in tensors.items()}, meta, None, tokens)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(stream):
            for k, v in tensors.items():
                v.record_stream(stream)
                h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                h.copy_(v, non_blocking=True)
                host[k] = h
            event = torch.cuda.Event()
            event.record(stream)
        return Reply(host, meta, event, tokens)


def _stack(tbs: list[TokenBatch]) -> TokenBatch:
    if len(tbs) == 1:
        return tbs[0]

    def cat(name, pad_docs=False):
        ts = [getattr(t, name) for t in tbs]
        if ts[0] is None:
            return None
        ts = [t.long() for t in ts]
        if pad_docs:
            width = max(t.shape[1] for t in ts)
            ts = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in ts]
        return torch.cat(ts)

    return TokenBatch(
        cat("input_ids"),
        cat("attention_mask"),
        cat("loss_mask"),
        cat("position_ids"),
        cat("seq_lens", pad_docs=True),
        cat("doc_remaining"),
    )


def _slice(cap: Captured, rows: slice) -> Captured:
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return Captured(
        {i: t[rows] for i, t in cap.layers.items()}, pick(cap.first_input), pick(cap.final), pick(cap.logits)
    )
