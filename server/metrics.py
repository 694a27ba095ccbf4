"""Server counters, read by the admin app (`/metrics` in Prometheus text, `/sessions`, the status page)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

__all__ = ["ServerMetrics"]


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
    busy_s: float = 0.0
    queue_depth: int = 0
    oom_splits: int = 0
    bytes_by_encoding: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (time, tokens) of recent forwards, for rates over a window
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_forward(self, tokens: int, budget: int, forward_s: float, busy_s: float) -> None:
        with self.lock:
            self.forwards += 1
            self.forward_tokens += tokens
            self.forward_s += forward_s
            self.busy_s += busy_s
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

    @property
    def busy_fraction(self) -> float:
        return self.busy_s / max(self.uptime_s, 1e-9)
