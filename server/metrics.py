"""Server counters, read by the admin app (`/metrics` in Prometheus text, `/sessions`, the status page).

Distributions are prometheus_client histograms in the server's own registry (`ServerMetrics.registry`,
exposed by `server/prometheus.py`): request latency (queued to reply ready) and queue wait, labelled by
job name (`JobLabels`: at most `MAX_JOB_LABELS` names of at most `JOB_LABEL_CHARS` characters, the rest
count under "other"), and the duration of each target forward.

Busy time is the measure of the UNION of busy intervals (`BusyTime`), on the host's
`time.perf_counter` clock: intervals that overlap (the compute stream's batch and the copy stream's
device-to-host copies, or a span accounted late) count once, so busy time never exceeds wall time.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["ServerMetrics", "BusyTime", "JobLabels", "MAX_JOB_LABELS", "JOB_LABEL_CHARS", "OTHER_JOBS"]

MAX_JOB_LABELS = 64  # distinct job label values at once; more jobs share the label OTHER_JOBS
JOB_LABEL_CHARS = 64
OTHER_JOBS = "other"
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class JobLabels:
    """Job name -> metric label value, with a bounded number of values (a label per job, never per
    session: job names come from the token file or the client, and a series costs memory per value)."""

    def __init__(self, limit: int = MAX_JOB_LABELS):
        self.limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def label(self, job: str) -> str:
        name = job[:JOB_LABEL_CHARS]
        with self._lock:
            if name in self._names:
                return name
            if len(self._names) < self.limit:
                self._names.add(name)
                return name
        return OTHER_JOBS

    def retain(self, jobs) -> list[str]:
        """Keep the labels of `jobs` (the live ones); return the labels dropped."""
        keep = {j[:JOB_LABEL_CHARS] for j in jobs}
        with self._lock:
            gone = sorted(self._names - keep)
            self._names &= keep
        return gone


class BusyTime:
    """The union of busy intervals [start, end] (perf_counter seconds) measured up to now.

    `add` takes closed intervals in any order; `open`/`close` mark an interval whose start is known
    and whose end is not yet (it counts up to now). Intervals ending more than `keep_s` before the
    newest are folded into one running total, so memory stays bounded.
    """

    def __init__(self, since: float | None = None, keep_s: float = 600.0):
        self.since = time.perf_counter() if since is None else since  # nothing before counts
        self.keep_s = keep_s
        self._starts: list[float] = []  # disjoint intervals, sorted
        self._ends: list[float] = []
        self._folded = 0.0  # measure of the union up to `_horizon`, no longer kept as intervals
        self._horizon = self.since
        self._open: dict[object, float] = {}
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._add(start, end)

    def _add(self, start: float, end: float) -> None:
        start = max(start, self._horizon)
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)  # first interval that ends at or after `start`
        j = bisect.bisect_right(self._starts, end)  # intervals [i, j) overlap or touch [start, end]
        if i < j:
            start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        cut = self._ends[-1] - self.keep_s
        while len(self._starts) > 1 and self._ends[0] < cut:
            self._folded += self._ends[0] - self._starts[0]
            self._horizon = self._ends[0]
            del self._starts[0], self._ends[0]

    def open(self, key: object, start: float) -> None:
        with self._lock:
            self._open[key] = start

    def close(self, key: object, end: float) -> None:
        with self._lock:
            start = self._open.pop(key, None)
            if start is not None:
                self._add(start, end)

    def between(self, t0: float, t1: float | None = None, now: float | None = None) -> float:
        """Busy seconds inside [t0, t1] (t1 default now; `now` default the clock): at most t1 - t0."""
        now = time.perf_counter() if now is None else now
        t1 = now if t1 is None else min(t1, now)
        with self._lock:
            spans = list(zip(self._starts, self._ends, strict=True))
            opened = list(self._open.values())
            folded, horizon = self._folded, self._horizon
        if opened:  # an interval still running counts up to now, merged with the rest
            merged = BusyTime(since=self.since, keep_s=float("inf"))
            for a, b in spans:
                merged._add(a, b)
            for a in opened:
                merged._add(a, now)
            spans = list(zip(merged._starts, merged._ends, strict=True))
        total = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)
        if t0 <= self.since and horizon > self.since:  # the folded part lies in [since, horizon]
            total += folded if t1 >= horizon else 0.0
        return min(total, max(t1 - t0, 0.0))

    def total(self, now: float | None = None) -> float:
        """Busy seconds since `since`, up to `now` (default the clock)."""
        return self.between(self.since, now=now)


@dataclass
class ServerMetrics:
    started: float = field(default_factory=time.time)
    requests: int = 0
    requests_failed: int = 0
    tokens: int = 0
    forwards: int = 0
    forward_tokens: int = 0
    forward_s: float = 0.0
    encode_s: float = 0.0
    queue_wait_s: float = 0.0
    queue_depth: int = 0
    oom_splits: int = 0
    bytes_by_encoding: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (time, tokens) of recent forwards, for rates over a window
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))
    lock: threading.Lock = field(default_factory=threading.Lock)
    busy: BusyTime = field(default_factory=BusyTime)  # the worker's (GPU's) busy intervals
    poll_busy: Callable[[], None] | None = None  # set by the scheduler: account finished GPU spans
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)  # the histograms below
    job_labels: JobLabels = field(default_factory=JobLabels)

    def __post_init__(self):
        self.request_latency = Histogram(
            "draftfeed_request_latency_seconds",
            "Time from a request's arrival in the queue to its reply being ready, by job.",
            ["job"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.request_queue_wait = Histogram(
            "draftfeed_request_queue_wait_seconds",
            "Time a request waited in the queue before its batch ran, by job.",
            ["job"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.forward_duration = Histogram(
            "draftfeed_forward_duration_seconds",
            "Duration of one batched target forward (its GPU time on a GPU server).",
            buckets=FORWARD_BUCKETS,
            registry=self.registry,
        )

    def record_forward(self, tokens: int, budget: int, forward_s: float) -> None:
        with self.lock:
            self.forwards += 1
            self.forward_tokens += tokens
            self.forward_s += forward_s
            self.recent.append((time.time(), tokens, tokens / max(budget, 1)))
        self.forward_duration.observe(forward_s)

    def record_request(self, job: str, queue_wait_s: float, latency_s: float, encode_s: float) -> None:
        """A request of `job` whose reply is ready: it waited `queue_wait_s`, took `latency_s` in all."""
        with self.lock:
            self.queue_wait_s += queue_wait_s
            self.encode_s += encode_s
        label = self.job_labels.label(job)
        self.request_queue_wait.labels(label).observe(queue_wait_s)
        self.request_latency.labels(label).observe(latency_s)

    def forget_jobs(self, live_jobs) -> None:
        """Drop the histogram series of jobs that have no live session any more."""
        live_jobs = set(live_jobs)
        gone = self.job_labels.retain(live_jobs)
        if len(live_jobs) <= self.job_labels.limit:  # every live job has its own label again
            gone.append(OTHER_JOBS)
        for label in gone:
            self.request_queue_wait.remove(label)
            self.request_latency.remove(label)

    def record_reply(self, tokens: int, nbytes_by_encoding: dict[str, int]) -> None:
        with self.lock:
            self.requests += 1
            self.tokens += tokens
            for enc, n in nbytes_by_encoding.items():
                self.bytes_by_encoding[enc] += n

    def window(self, seconds: float = 60.0) -> dict[str, float]:
        """Tokens/s and mean batch fill over the last `seconds`."""
        now = time.time()
        with self.lock:
            rows = [(t, n, f) for t, n, f in self.recent if now - t <= seconds]
        if not rows:
            return {"tokens_per_s": 0.0, "batch_fill": 0.0}
        span = max(now - rows[0][0], 1e-3)
        return {
            "tokens_per_s": sum(n for _, n, _ in rows) / span,
            "batch_fill": sum(f for *_, f in rows) / len(rows),
        }

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started

    def busy_between(self, t0: float, t1: float | None = None) -> float:
        """Busy seconds in [t0, t1] on the perf_counter clock (GPU spans accounted first)."""
        if self.poll_busy is not None:
            self.poll_busy()
        return self.busy.between(t0, t1)

    @property
    def busy_s(self) -> float:
        """Busy seconds since the server started: the union of busy intervals, never above uptime."""
        return self.busy_between(self.busy.since)

    @property
    def busy_fraction(self) -> float:
        return min(1.0, self.busy_s / max(time.perf_counter() - self.busy.since, 1e-9))
