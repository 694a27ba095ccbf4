"""Server counters, read by the admin app (`/metrics` in Prometheus text, `/sessions`, the status page).

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

__all__ = ["ServerMetrics", "BusyTime"]


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

    def record_forward(self, tokens: int, budget: int, forward_s: float) -> None:
        with self.lock:
            self.forwards += 1
            self.forward_tokens += tokens
            self.forward_s += forward_s
            self.recent.append((time.time(), tokens, tokens / max(budget, 1)))

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
