"""The server end of the optional TCP data plane: reply payloads on a plain (or TLS) socket.

Python gRPC moves reply bytes at 0.2-0.6x of plain TCP (bench/results/transport-*); control and
reply headers stay on gRPC, and a session that asked for it gets its payloads as frames on a
socket of its own (frame format: client/dataplane.py and the proto's "Data plane" section).

- `DataPlaneServer.issue(session)` makes a random 32-byte ticket for a session (OpenSession sends
  it to the session's client over the authenticated gRPC call). Only its sha256 is kept; it is good
  for one connection within `ticket_ttl_s`.
- A connection sends the ticket within `handshake_timeout_s` and gets one status byte: accepted (the
  socket is now that session's, replacing an older one) or refused. A wrong, used or expired
  ticket is refused and logged with the peer's address, never the ticket. At most
  `max_handshakes_per_peer` connections of one peer host, and `max_handshakes` in all, wait for
  their ticket at once: a new connection past either bound closes the oldest waiting one (of that
  peer, or of all), so idle connections can neither pile up threads nor keep new binds out (a real
  client sends its ticket as soon as it connects). Without a token file
  (and without --insecure-allow-remote) only loopback peers are accepted, as on the gRPC port.
- `reply_frames` yields the gRPC header alone, then sends the reply's payload on its session's
  socket (one `sendall` per tensor, straight from the tensors' memory): the header's trip overlaps
  the payload's (16 MiB replies on the 2-core VM, one stream: 1.75 vs 1.50 GB/s median of 4
  alternating runs against the payload-first order). When the session has no usable socket the
  reply goes as gRPC chunk frames instead. A socket lost between that check and the send loses the
  reply: the client's `take` raises UNAVAILABLE (retryable) and its next requests go on gRPC.
- A socket is closed when its client closes it, when its session closes (CloseSession, expiry,
  shutdown: `session.closed`), or by `close()`; a frame being written is finished first. When its
  session closed or the server stops, the close frame (`CLOSE_FRAME_ID`, no tensors) goes first, so
  the client knows it is no break; a socket closed while its session lives gets none.

With TLS configured, the listener uses the gRPC port's certificate and client-CA rules.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from draftfeed.client.dataplane import ACCEPTED, CLOSE_FRAME_ID, REFUSED, TICKET_BYTES, frame_head, recv_exact
from draftfeed.client.wire import chunk_frames, header_frame, reply_parts

from .auth import AccessControl, is_loopback_peer
from .listening import bind_tcp

__all__ = ["DataPlaneServer", "data_ssl_context", "reply_frames"]

log = logging.getLogger("draftfeed.dataplane")


def data_ssl_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A server TLS context like the gRPC port's: `cert`/`key`, and with `client_ca` mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Connection:
    """One session's socket; frames are written whole, one at a time."""

    def __init__(self, sock: socket.socket, session, peer: str, send_timeout_s: float, forget):
        self.sock = sock
        self.forget = forget  # unregisters the socket from the listener's selector before it closes
        self.session = session
        self.peer = peer
        self.lock = threading.Lock()
        self.closed = False
        self.frames = 0
        # Blocking sends (one syscall moves what the socket takes, no poll/GIL round trips between
        # pieces), with a kernel send timeout so a client that stops reading cannot hold a handler.
        sock.settimeout(None)
        seconds = int(send_timeout_s)
        usec = int((send_timeout_s - seconds) * 1e6)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, usec))

    def send(self, request_id: int, views: list[memoryview]) -> bool:
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(frame_head(request_id, [v.nbytes for v in views]))
                for view in views:
                    if view.nbytes:
                        self.sock.sendall(view)
            except OSError as err:
                log.warning(
                    "data plane of session %s (%s): send failed (%s); replies go on gRPC",
                    self.session.id[:8],
                    self.peer,
                    err,
                )
                self._close_locked()
                return False
            self.frames += 1
            return True

    def close(self, stopping: bool = False) -> None:
        """Closes the socket after the frame being written; with the close frame first when the session
        closed or the server is `stopping` (a clean close the client need not warn about)."""
        with self.lock:
            if not self.closed and (stopping or self.session.closed):
                self._say_close()
            self._close_locked()

    def _say_close(self) -> None:
        """The close frame, without blocking: a client that stopped reading (full buffer) gets none,
        and then sees a break, as it would without the frame."""
        try:
            self.sock.setblocking(False)
            self.sock.send(frame_head(CLOSE_FRAME_ID, []))
        except OSError:  # ssl.SSLWantWriteError and BlockingIOError included
            pass

    def _close_locked(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.forget(self)  # before close: a reused fd number must not find a stale registration
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class _Waiting:
    """A connection that has not sent its ticket yet."""

    def __init__(self, sock: socket.socket, host: str):
        self.sock = sock  # replaced by its TLS socket once wrapped
        self.host = host
        self.since = time.monotonic()
        self.was_cut = False

    def cut(self) -> None:
        """Ends the wait: the handshake thread's read returns and it closes the socket."""
        self.was_cut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DataPlaneServer:
    """The data-plane listener of one server process.

    host, port: where to listen (port 0: a free port, next to the gRPC port's host).
    ssl_context: TLS for every connection (`data_ssl_context`), None for plaintext.
    access: the server's AccessControl (its loopback-only rule applies to peers here too).
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        access: AccessControl | None = None,
        ticket_ttl_s: float = 60.0,
        handshake_timeout_s: float = 10.0,
        send_timeout_s: float = 300.0,
        max_handshakes: int = 64,
        max_handshakes_per_peer: int = 8,
    ):
        self.ssl_context = ssl_context
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_peer = max_handshakes_per_peer
        self.evicted = 0
        self._waiting: dict[int, _Waiting] = {}  # connections waiting for their ticket, oldest first
        self.access = access or AccessControl()
        self.ticket_ttl_s = ticket_ttl_s
        self.handshake_timeout_s = handshake_timeout_s
        self.send_timeout_s = send_timeout_s
        self.listener = bind_tcp(host, port, "--data-port")
        self.port = self.listener.getsockname()[1]
        self._tickets: dict[bytes, tuple[Any, float]] = {}  # sha256(ticket) -> (session, expiry)
        self._conns: dict[str, _Connection] = {}  # session id -> its socket
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="draftfeed-dataplane", daemon=True)
        self._thread.start()

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    # -- tickets and connections --------------------------------------------------------------

    def issue(self, session) -> bytes:
        """A one-time ticket that binds the next connection presenting it to `session`
        (an object with `id` and `closed`, e.g. a sessions.Session)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            for digest, (_s, expiry) in list(self._tickets.items()):
                if expiry < now:
                    del self._tickets[digest]
            self._tickets[hashlib.sha256(ticket).digest()] = (session, now + self.ticket_ttl_s)
        return ticket

    def send(self, session_id: str, request_id: int, views: list[memoryview]) -> bool:
        """Writes one frame on the session's socket; False when it has none or the send failed."""
        with self._lock:
            conn = self._conns.get(session_id)
        return conn is not None and conn.send(request_id, views)

    def connected(self, session_id: str) -> bool:
        with self._lock:
            conn = self._conns.get(session_id)
        return conn is not None and not conn.closed

    def close_session(self, session_id: str) -> None:
        """Closes the session's socket once the frame being written (if any) is finished."""
        with self._lock:
            conn = self._conns.pop(session_id, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Stops listening and closes every socket (frames being written finish first)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
            self._tickets.clear()
        for conn in conns:
            conn.close(stopping=True)

    # -- the listener thread ------------------------------------------------------------------

    def _forget(self, conn: _Connection) -> None:
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                for key, _ in self._selector.select(timeout=0.25):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:  # a bound socket turned readable: its client closed it (it sends nothing)
                        self._drop(key.data, "the client closed it")
                self._reap_closed_sessions()
        finally:
            self._selector.close()
            self.listener.close()

    def _accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except OSError:
            return
        waiting = _Waiting(sock, addr[0])
        with self._lock:
            mine = [w for w in self._waiting.values() if w.host == waiting.host]
            victim = None
            if len(mine) >= self.max_handshakes_per_peer:
                victim = mine[0]
            elif len(self._waiting) >= self.max_handshakes:
                victim = next(iter(self._waiting.values()))
            if victim is not None:
                del self._waiting[id(victim)]
                self.evicted += 1
            self._waiting[id(waiting)] = waiting
        if victim is not None:
            log.warning(
                "data plane: closed a connection from %s that sent no ticket for %.1f s (too many waiting: "
                "at most %d per peer host, %d in all)",
                victim.host,
                time.monotonic() - victim.since,
                self.max_handshakes_per_peer,
                self.max_handshakes,
            )
            victim.cut()
        threading.Thread(
            target=self._handshake_slot,
            args=(waiting, addr),
            name="draftfeed-dataplane-handshake",
            daemon=True,
        ).start()

    def _handshake_slot(self, waiting: _Waiting, addr) -> None:
        try:
            self._handshake(waiting, addr)
        finally:
            with self._lock:
                self._waiting.pop(id(waiting), None)

    def _reap_closed_sessions(self) -> None:
        with self._lock:
            gone = [c for c in self._conns.values() if c.session.closed or c.closed]
        for conn in gone:
            self._drop(conn, "its session closed" if conn.session.closed else "it broke")

    def _drop(self, conn: _Connection, why: str) -> None:
        with self._lock:
            if self._conns.get(conn.session.id) is conn:
                del self._conns[conn.session.id]
        self._forget(conn)  # now: a readable socket must not be reported again before it closes
        if not conn.closed:
            log.info("data plane of session %s (%s) closed: %s", conn.session.id[:8], conn.peer, why)
        threading.Thread(target=conn.close, name="draftfeed-dataplane-close", daemon=True).start()

    def _peer_allowed(self, addr) -> bool:
        if self.access.jobs is not None or self.access.allow_remote:
            return True
        host, port = addr[0], addr[1]
        peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        return is_loopback_peer(peer, self.access.trusted_networks)

    def _handshake(self, waiting: _Waiting, addr) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        sock = waiting.sock
        try:
            sock.settimeout(self.handshake_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._peer_allowed(addr):
                log.warning("data plane: refused %s: only loopback clients without a token file", peer)
                sock.close()
                return
            if self.ssl_context is not None:
                sock = waiting.sock = self.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
                sock.do_handshake()
            ticket = recv_exact(sock, TICKET_BYTES)
        except (OSError, ConnectionError) as err:
            if not waiting.was_cut:
                log.warning("data plane: handshake with %s failed: %s", peer, err)
            sock.close()
            return
        with self._lock:
            entry = self._tickets.pop(hashlib.sha256(ticket).digest(), None)
        session = entry[0] if entry is not None and entry[1] >= time.monotonic() else None
        if session is None or session.closed or self._stopped.is_set():
            log.warning("data plane: refused %s: unknown, used or expired ticket", peer)
            try:
                sock.sendall(REFUSED)
            except OSError:
                pass
            sock.close()
            return
        conn = _Connection(sock, session, peer, self.send_timeout_s, self._forget)
        with self._lock:
            old = self._conns.get(session.id)
            self._conns[session.id] = conn
        if old is not None:
            old.close()
        try:
            sock.sendall(ACCEPTED)
            self._selector.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError, KeyError) as err:
            log.warning("data plane: %s went away during its handshake: %s", peer, err)
            self._drop(conn, "it went away")
            return
        log.info(
            "data plane of session %s bound to %s (%s)",
            session.id[:8],
            peer,
            "TLS" if self.ssl_context else "plaintext",
        )


def reply_frames(
    plane: DataPlaneServer | None,
    session_id: str,
    request_id: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None,
    chunk_bytes: int,
    want: bool,
) -> Iterator[bytes]:
    """The gRPC frames of one reply: its header alone (marked `payload_on_data_plane`) after the
    payload went as one frame on the session's data-plane socket, or header + chunk frames when
    the client did not ask (`want`), the session has no usable socket, or the send failed."""
    header, views = reply_parts(request_id, tensors, meta)
    if want and plane is not None and header.total_bytes and plane.connected(session_id):
        header.payload_on_data_plane = True
        return _data_plane_frames(plane, session_id, request_id, header, views)
    return _grpc_frames(header, views, chunk_bytes)


def _data_plane_frames(plane, session_id, request_id, header, views) -> Iterator[bytes]:
    yield header_frame(header)  # first: its way to the client overlaps the payload's
    if not plane.send(session_id, request_id, views):
        # the socket closed since the check: the client's data plane reports the lost reply as
        # UNAVAILABLE (retryable) and its next requests go on gRPC
        log.info("data plane of session %s: reply %d lost with its socket", session_id[:8], request_id)


def _grpc_frames(header, views, chunk_bytes) -> Iterator[bytes]:
    yield header_frame(header)
    yield from chunk_frames(views, chunk_bytes)
