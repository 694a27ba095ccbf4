"""Worker threads for the long gRPC calls, bounded per job and in all.

The gRPC server runs each call on a thread of its pool, and a data call holds its thread for as
long as it lasts: a unary `Generate` until its reply, a `GenerateStream` until the client ends it,
even when the client sends nothing. So data calls take a slot here first: at most `per_job` at a
time per job (per client connection without a token file), at most `total` in all, `total` being
the pool less a reserve, so that short calls (health checks, GetModelInfo, OpenSession,
CloseSession, SetVocabMapping) always find a thread, and other jobs find slots of their own. A
data call over its job's bound, or over the total, gets RESOURCE_EXHAUSTED with a retry hint (the
draftfeed client waits and retries), and the admin port's `/readyz` answers 503 while every slot
is taken.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from draftfeed.client.errors import ResourceExhausted

__all__ = ["CallSlots", "reserve_for"]

log = logging.getLogger("draftfeed.service")


def reserve_for(workers: int) -> int:
    """Threads kept for short calls out of a pool of `workers`: a quarter, at least 4."""
    return max(4, workers // 4)


class CallSlots:
    """Counts the long calls in flight, per job and in all (thread-safe)."""

    def __init__(self, total: int, per_job: int, retry_after_s: float = 0.5):
        self.total = total
        self.per_job = per_job
        self.retry_after_s = retry_after_s
        self.in_use = 0
        self.refused = 0
        self._by_job: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def saturated(self) -> bool:
        return self.in_use >= self.total

    def held(self, job: str) -> int:
        with self._lock:
            return self._by_job.get(job, 0)

    @contextlib.contextmanager
    def hold(self, job: str, what: str) -> Iterator[None]:
        """A slot for one call of `job` while the block runs; ResourceExhausted (with a retry
        hint) when the job or the server has none free. `what` names the job in messages."""
        with self._lock:
            mine = self._by_job.get(job, 0)
            if mine >= self.per_job or self.in_use >= self.total:
                self.refused += 1
                full = mine >= self.per_job
                err = ResourceExhausted(
                    f"{what} already has {mine} Generate/GenerateStream calls open on this server (the bound per "
                    "job, --max-streams-per-job); end idle streams or wait for replies"
                    if full
                    else f"all {self.total} Generate/GenerateStream slots of this server are taken (by other "
                    "jobs); retry shortly or use another server"
                )
                err.retry_after_s = self.retry_after_s
                raise err
            self._by_job[job] = mine + 1
            self.in_use += 1
        try:
            yield
        finally:
            with self._lock:
                left = self._by_job[job] - 1
                if left:
                    self._by_job[job] = left
                else:
                    del self._by_job[job]
                self.in_use -= 1
