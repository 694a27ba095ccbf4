"""The one path a data request takes into the server, whichever front-end received it (the gRPC
servicer, server/service.py, and the NeMo HTTP port, server/nemo_http.py):

  check     the server is not draining, the session exists and is ready, every required tensor is
            there and passes target/checks.py (the target's vocab, the per-request limits)
  convert   the request's tensors into a `TokenBatch`
  hold      one of the session's reply holds (its queue limit, --max-queued-per-job)
  charge    the job's token quota (server/auth.py), around
  submit    the scheduler's queue (server/scheduler.py)
  account   once the reply is out: the session's stats and the server's metrics

`check` (with convert) and `enter` (hold, charge, submit) are separate calls because the front-ends
differ in one thing only: a refusal by `enter` (RESOURCE_EXHAUSTED: queue or quota full) goes back
to a gRPC client, which retries, while the NeMo port waits and calls `enter` again (NeMo's client
does not retry). Errors carry their gRPC code; the NeMo port maps codes to HTTP statuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from draftfeed.client.errors import Busy, InvalidArgument, Unavailable
from draftfeed.target.checks import Limits, check_generate_inputs
from draftfeed.target.features import TokenBatch

from .auth import AccessControl, Caller
from .scheduler import BatchScheduler
from .sessions import Session

__all__ = ["Admission", "Admitted", "ReplyHolds", "REQUIRED", "OPTIONAL"]

REQUIRED = ("input_ids", "attention_mask", "loss_mask")
OPTIONAL = ("position_ids", "seq_lens", "doc_remaining")  # packing metadata


class ReplyHolds:
    """Per session: requests admitted whose reply is not yet written out (queued, on the GPU, or
    answered and waiting for the client to read). A GenerateStream client that sends and never
    reads would otherwise make the server keep every answered reply; this count is held to the
    per-job queue limit, checked before a request is queued."""

    def __init__(self, limit: int):
        self.limit = limit
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, session: Session) -> Callable[[], None]:
        """A `release()` for one more request of `session` (call it once its reply is written or
        dropped; later calls do nothing); ResourceExhausted naming the limit when it is reached."""
        with self._lock:
            n = self._count.get(session.id, 0)
            if n >= self.limit:
                raise Busy(
                    f"job {session.job_name!r} has {n} requests whose replies are queued, running or not yet "
                    f"read (per-job limit {self.limit}, --max-queued-per-job); read replies before sending "
                    "more (retry in ~1 s)"
                )
            self._count[session.id] = n + 1
        done = []

        def release():
            with self._lock:
                if done:
                    return
                done.append(True)
                left = self._count[session.id] - 1
                if left:
                    self._count[session.id] = left
                else:
                    del self._count[session.id]

        return release

    def held(self, session_id: str) -> int:
        with self._lock:
            return self._count.get(session_id, 0)


@dataclass
class Admitted:
    """A request in the scheduler: `future` gives its `Reply`; call `release()` once the reply is
    written out or dropped (it frees the session's hold; later calls do nothing)."""

    session: Session
    tb: TokenBatch
    future: Future
    release: Callable[[], None]


class Admission:
    """The admission path of one server, shared by its front-ends (thread-safe)."""

    def __init__(self, scheduler: BatchScheduler, access: AccessControl, limits: Limits, vocab_size: int):
        self.scheduler = scheduler
        self.access = access
        self.limits = limits
        self.vocab_size = vocab_size
        self.holds = ReplyHolds(scheduler.max_queued_per_session)
        self.draining = False  # set when the server drains: new requests get UNAVAILABLE

    def check(
        self,
        find_session: Callable[[], Session],
        tensors: Mapping[str, torch.Tensor | None],
        what: str,
        trainer: tuple[int, float | None] | None = None,
    ) -> tuple[Session, TokenBatch]:
        """Check and convert one request on the CPU, before anything is queued: a bad request never
        reaches the GPU. `find_session()`: the front-end's lookup of the request's session (called
        once the server is known not to be draining); `tensors`: name -> tensor or None (absent)
        for `REQUIRED` and `OPTIONAL`; `what` names the request in messages; `trainer`: the step and
        loss the trainer sent with it (0: none)."""
        if self.draining:
            raise Unavailable("the server is draining and takes no new requests; use another server")
        session = find_session()
        session.check_ready()
        if trainer is not None and trainer[0]:
            session.stats.trainer_reported(*trainer)
        missing = [name for name in REQUIRED if tensors.get(name) is None]
        if missing:
            raise InvalidArgument(
                f"{what}.{missing[0]} is missing; send input_ids, attention_mask and loss_mask"
            )
        tb = TokenBatch(*(tensors.get(name) for name in REQUIRED + OPTIONAL))
        check_generate_inputs(
            tb.input_ids,
            tb.attention_mask,
            tb.loss_mask,
            tb.position_ids,
            tb.seq_lens,
            tb.doc_remaining,
            vocab_size=self.vocab_size,
            limits=self.limits,
        )
        return session, tb

    def enter(self, caller: Caller | None, session: Session, tb: TokenBatch) -> Admitted:
        """Hold, charge and submit a checked request; ResourceExhausted when the session's holds,
        the job's quota (with a retry hint) or the scheduler's queue are full (nothing is kept then)."""
        release = self.holds.take(session)
        try:
            future = self.access.charge(
                caller, tb.input_ids.numel(), lambda: self.scheduler.submit(session, tb)
            )
        except BaseException:
            release()
            raise
        return Admitted(session, tb, future, release)

    def admit(
        self,
        caller: Caller | None,
        find_session: Callable[[], Session],
        tensors: Mapping[str, torch.Tensor | None],
        what: str,
        trainer: tuple[int, float | None] | None = None,
    ) -> Admitted:
        """`check` then `enter`: what a front-end whose client retries refusals calls."""
        session, tb = self.check(find_session, tensors, what, trainer)
        return self.enter(caller, session, tb)

    def account(self, session: Session, tokens: int, nbytes_by_encoding: dict[str, int]) -> None:
        """A reply went out: the session's stats and the server's metrics."""
        session.stats.replied(tokens, sum(nbytes_by_encoding.values()))
        self.scheduler.metrics.record_reply(tokens, nbytes_by_encoding)
