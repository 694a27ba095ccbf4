"""Which of this server's sessions a client's session id names, and who may use it.

A session is opened on one server. When several replicas sit behind one balanced channel
(client/channel.py), a call can land on a replica that never saw the session; the client then
sends the session's spec (an `OpenSessionRequest`) as metadata, and the replica adopts the session:
it opens it from the spec and files it under the client's id. A spec whose vocab mapping differs
from what the session has (the client called `set_vocab_mapping` on another replica) updates it.
Adopted sessions that stay idle are closed after `adopted_idle_s` (their client closes the session
on one replica only).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

from draftfeed.client.errors import NotFound
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import tensor_from_proto

from .auth import AccessControl, Caller
from .sessions import Session, SessionTable

__all__ = ["SessionDirectory"]

log = logging.getLogger("draftfeed.sessions")


def _mapping_digest(spec: pb.OpenSessionRequest) -> bytes | None:
    if not spec.HasField("selected_token_ids"):
        return None
    h = hashlib.sha256(spec.selected_token_ids.SerializeToString())
    h.update(spec.selected_token_mask.SerializeToString())
    return h.digest()


class SessionDirectory:
    """Client session id -> `Session`, with ownership checks and adoption from a spec.

    open_session(spec, caller) opens a session here (the servicer's OpenSession path);
    cancel(local_id) drops its queued requests.
    """

    def __init__(
        self,
        table: SessionTable,
        access: AccessControl,
        open_session: Callable[[pb.OpenSessionRequest, Caller], Session],
        cancel: Callable[[str], object],
        adopted_idle_s: float = 3600.0,
    ):
        self.table = table
        self.access = access
        self.open_session = open_session
        self.cancel = cancel
        self.adopted_idle_s = adopted_idle_s
        self._alias: dict[str, str] = {}  # client id -> local id, for adopted sessions
        self._mapping: dict[
            str, bytes | None
        ] = {}  # local id -> digest of the mapping last taken from a spec
        self._lock = threading.Lock()

    def get(self, session_id: str, caller: Caller, spec: pb.OpenSessionRequest | None = None) -> Session:
        """The session `session_id` names; adopted from `spec` when this server does not know it.
        NotFound without a spec, PermissionDenied when it belongs to another job."""
        with self._lock:
            local = self._alias.get(session_id, session_id)
        try:
            session = self.table.get(local)
        except NotFound:
            if spec is None:
                raise
            session = self._adopt(session_id, caller, spec)
        self.access.check_owner(caller, session)
        if spec is not None:
            self._sync_mapping(session, spec)
        return session

    def close(self, session_id: str, caller: Caller) -> Session:
        session = self.get(session_id, caller)
        self._close(session.id)
        return session

    # -- internals ----------------------------------------------------------------------------

    def _adopt(self, session_id: str, caller: Caller, spec: pb.OpenSessionRequest) -> Session:
        with self._lock:
            local = self._alias.get(session_id)
            if local is not None:  # adopted by a concurrent call meanwhile
                try:
                    return self.table.get(local)
                except NotFound:
                    pass
            self._reap()
            session = self.open_session(spec, caller)
            self._alias[session_id] = session.id
            self._mapping[session.id] = _mapping_digest(spec)
        log.info("session %s adopted from its client's spec (opened on another replica)", session_id[:8])
        return session

    def _sync_mapping(self, session: Session, spec: pb.OpenSessionRequest) -> None:
        digest = _mapping_digest(spec)
        if digest is None or self._mapping.get(session.id) == digest:
            return
        self.table.set_mapping(
            session,
            tensor_from_proto(spec.selected_token_ids, "selected_token_ids"),
            tensor_from_proto(spec.selected_token_mask, "selected_token_mask"),
        )
        self._mapping[session.id] = digest

    def _close(self, local: str) -> None:
        self.table.close(local)
        self.cancel(local)
        self.forget(local)

    def forget(self, local: str) -> None:
        """Drop what the directory keeps about a closed session (its aliases, its mapping digest)."""
        with self._lock:
            self._mapping.pop(local, None)
            for client_id in [c for c, loc in self._alias.items() if loc == local]:
                del self._alias[client_id]

    def _reap(self) -> None:
        """Close adopted sessions idle for longer than `adopted_idle_s` (called under the lock)."""
        cutoff = time.time() - self.adopted_idle_s
        live = {s.id: s for s in self.table.list()}
        for client_id, local in list(self._alias.items()):
            session = live.get(local)
            if session is None:
                del self._alias[client_id]
            elif session.last_seen < cutoff and session.stats.in_flight == 0:
                log.info(
                    "closing adopted session %s: idle for %.0f s",
                    client_id[:8],
                    time.time() - session.last_seen,
                )
                self.table.close(local)
                self.cancel(local)
                del self._alias[client_id]
                self._mapping.pop(local, None)
