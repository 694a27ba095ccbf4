"""Sessions: one per training job, each with its own algorithm, layer ids, vocab mapping and encodings.

Closing one session releases only that session; the table never touches the model.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from draftfeed.client.algorithms import get_algorithm
from draftfeed.client.errors import FailedPrecondition, InvalidArgument, NotFound
from draftfeed.client.payload import resolve_encodings
from draftfeed.target.algorithms import ALGORITHMS, get_server_algorithm
from draftfeed.target.features import VocabMapping
from draftfeed.target.supervision import check_vocab_mapping

__all__ = ["Session", "SessionTable", "ALGORITHMS", "MAX_JOB_NAME_CHARS"]

log = logging.getLogger("draftfeed.sessions")

MAX_JOB_NAME_CHARS = 256  # a job name is a label in logs, /sessions and /metrics


def build_features(algorithm: str, ids: list[int], n: int, capture_logits: bool, latent: bool):
    """A session's features object: `ids` defaulted / validated by the algorithm's client-side entry, the
    features built by its target-side one (`target/algorithms/`)."""
    server_side = get_server_algorithm(algorithm)
    return server_side.features(get_algorithm(algorithm).layer_ids(ids, n), n, capture_logits, latent)


@dataclass
class SessionStats:
    """What one session has used, for /sessions, /metrics and the status page. Changed only through
    its methods, under its own lock: the admission path (server/admission.py) reports replies and
    trainer progress, the scheduler (server/scheduler.py) requests entering and leaving its queue."""

    requests: int = 0
    tokens: int = 0
    bytes_sent: int = 0
    queue_wait_s: float = 0.0
    forward_s: float = 0.0
    encode_s: float = 0.0
    in_flight: int = 0
    trainer_step: int = 0  # what the trainer last reported with a request (0: nothing)
    trainer_loss: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def queued(self) -> None:
        """A request entered the scheduler's queue."""
        with self._lock:
            self.in_flight += 1

    def dropped(self) -> None:
        """A queued request left without an answer (cancelled, failed, or its session closed)."""
        with self._lock:
            self.in_flight -= 1

    def served(self, queue_wait_s: float, forward_s: float, encode_s: float) -> None:
        """A queued request was answered: its time waiting, in the forward and encoding."""
        with self._lock:
            self.queue_wait_s += queue_wait_s
            self.forward_s += forward_s
            self.encode_s += encode_s
            self.in_flight -= 1

    def replied(self, tokens: int, nbytes: int) -> None:
        """A reply of `tokens` tokens and `nbytes` payload bytes went to the client."""
        with self._lock:
            self.requests += 1
            self.tokens += tokens
            self.bytes_sent += nbytes

    def trainer_reported(self, step: int, loss: float | None) -> None:
        """The trainer's step (and loss) sent with a request, shown on the status page."""
        with self._lock:
            self.trainer_step, self.trainer_loss = step, loss


@dataclass
class Session:
    id: str
    job_name: str
    algorithm: str
    features: object  # the algorithm's features (target/algorithms/<name>.py)
    encodings: dict[str, str]
    weight: float = 1.0
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    closed: bool = False
    stats: SessionStats = field(default_factory=SessionStats)

    @property
    def layer_ids(self) -> list[int]:
        return list(self.features.layer_ids)

    def check_ready(self) -> None:
        if self.features.takes_vocab_mapping and self.features.mapping is None:
            raise FailedPrecondition(
                f"session {self.id} ({self.job_name}): generate before a vocab mapping; "
                "call SetVocabMapping (set_vocab_mapping) first"
            )


class SessionTable:
    """The live sessions of one server, by id (thread-safe)."""

    def __init__(
        self,
        num_layers: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        default_layer_ids: dict[str, list[int]] | None = None,
    ):
        """`default_layer_ids`: algorithm -> the ids a session that names none gets (the operator's
        `--aux-layer-ids` for "eagle3"); algorithms not listed get their rule's default."""
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.device = device
        self.default_layer_ids = dict(default_layer_ids or {})
        for algorithm, ids in self.default_layer_ids.items():
            build_features(algorithm, list(ids), num_layers, False, False)  # InvalidArgument when unusable
        self._sessions: dict[str, Session] = {}
        self.finished: deque[Session] = deque(maxlen=256)  # the latest closed sessions, for reports
        self._expired: OrderedDict[str, float] = OrderedDict()  # id -> idle seconds, for NOT_FOUND messages
        self._lock = threading.Lock()

    def open(
        self,
        algorithm: str,
        layer_ids: list[int] | None = None,
        job_name: str = "",
        capture_logits: bool = False,
        encodings: dict[str, str] | None = None,
        weight: float = 1.0,
        mapping: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Session:
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unknown algorithm {algorithm!r}; supported: {', '.join(ALGORITHMS)}")
        if not weight > 0:
            raise InvalidArgument(f"session weight must be > 0, got {weight}")
        if len(job_name) > MAX_JOB_NAME_CHARS:
            raise InvalidArgument(
                f"job name of {len(job_name)} characters is over the limit of {MAX_JOB_NAME_CHARS}; use a shorter name"
            )
        layer_ids = list(layer_ids or [])
        if len(layer_ids) > self.num_layers + 1:  # the most any algorithm can use: -1 and every layer
            raise InvalidArgument(
                f"{len(layer_ids)} layer ids asked; a target with {self.num_layers} decoder layers has at "
                f"most {self.num_layers + 1} to capture (the limit is its layer count + 1)"
            )
        enc = resolve_encodings(encodings)
        latent = enc["probs"] == "latent"
        if latent and not get_algorithm(algorithm).latent_probs:
            raise InvalidArgument("the 'latent' probs encoding is for EAGLE-3 sessions only")
        ids = list(layer_ids or []) or list(self.default_layer_ids.get(algorithm, []))
        features = build_features(algorithm, ids, self.num_layers, capture_logits, latent)
        session = Session(uuid.uuid4().hex, job_name or "anonymous", algorithm, features, enc, weight)
        if mapping is not None:
            self.set_mapping(session, *mapping)
        with self._lock:
            self._sessions[session.id] = session
        log.info(
            "session opened: %s job=%s algorithm=%s layers=%s encodings=%s",
            session.id[:8],
            session.job_name,
            algorithm,
            session.layer_ids,
            enc,
        )
        return session

    def set_mapping(
        self, session: Session, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor
    ):
        if not session.features.takes_vocab_mapping:
            raise InvalidArgument(
                f"a vocab mapping is for EAGLE-3 sessions; session {session.id} is {session.algorithm}"
            )
        check_vocab_mapping(selected_token_ids, selected_token_mask, self.vocab_size)
        session.features.mapping = VocabMapping(selected_token_ids, selected_token_mask).to(self.device)

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            with self._lock:
                idle = self._expired.get(session_id)
            if idle is not None:
                raise NotFound(
                    f"session {session_id!r} expired: no request for {idle:.0f} s (the server's --session-ttl); "
                    "open a new session (the draftfeed client re-opens it by itself)"
                )
            raise NotFound(
                f"unknown session {session_id!r}: the server restarted or the session was closed; open a new session"
            )
        session.last_seen = time.time()  # renews its lease
        return session

    def expire(self, ttl_s: float, now: float | None = None) -> list[Session]:
        """Close the sessions whose last request is over `ttl_s` seconds old and that have none in
        flight; returns them (the caller frees what else they hold: queues, data-plane sockets)."""
        now = time.time() if now is None else now
        with self._lock:  # checked and removed at once: a call that finds it after this gets NOT_FOUND
            due = [s for s in self._sessions.values() if now - s.last_seen > ttl_s and s.stats.in_flight == 0]
            for s in due:
                del self._sessions[s.id]
                self._expired[s.id] = now - s.last_seen
            while len(self._expired) > 4096:
                self._expired.popitem(last=False)
        for s in due:
            self._finish(s, f"expired after {now - s.last_seen:.0f} s without a request")
        return due

    def close(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"unknown session {session_id!r}: already closed or never opened")
        self._finish(session, "closed")
        return session

    def _finish(self, session: Session, why: str) -> None:
        session.closed = True
        self.finished.append(session)
        log.info(
            "session %s: %s job=%s tokens=%d requests=%d",
            why,
            session.id[:8],
            session.job_name,
            session.stats.tokens,
            session.stats.requests,
        )

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def close_all(self) -> None:
        for s in self.list():
            self.close(s.id)
