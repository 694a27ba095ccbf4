"""Session leases: a session that goes `ttl_s` seconds without a request is closed and freed.

Any call naming a session renews its lease (`SessionTable.get`); a session with requests in flight
never expires. An expired session is closed like a CloseSession: its queued requests are dropped,
its data-plane socket gets the close frame, the directory forgets its aliases, and the status
sampler drops its ring at its next sample. Its client gets NOT_FOUND on its next call, which the
draftfeed client answers by re-opening the session (client/remote.py), so a client that was only
slow carries on; a NeMo HTTP client's session is re-opened from its kept vocab mapping
(server/nemo_http.py).
"""

from __future__ import annotations

import logging
import threading

__all__ = ["SessionLeases"]

log = logging.getLogger("draftfeed.sessions")


class SessionLeases:
    """Expires the idle sessions of `server` (a TargetServer) every `ttl_s / 8` seconds (at most 5 s)."""

    def __init__(self, server, ttl_s: float):
        self.server = server
        self.ttl_s = ttl_s
        self.interval = min(5.0, max(0.01, ttl_s / 8))
        self.expired = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="draftfeed-session-leases", daemon=True)

    def start(self) -> SessionLeases:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def sweep(self) -> list:
        """Close and free the sessions whose lease ran out; returns them."""
        srv = self.server
        gone = srv.sessions.expire(self.ttl_s)
        for session in gone:
            srv.scheduler.cancel_session(session.id)
            if srv.dataplane is not None:
                srv.dataplane.close_session(session.id)
            srv.servicer.directory.forget(session.id)
        self.expired += len(gone)
        return gone

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the lease keeper must never take the server down
                log.exception("expiring idle sessions failed")
