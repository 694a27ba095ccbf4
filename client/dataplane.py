"""The client end of a session's TCP data plane: reply payloads without Python gRPC.

Python gRPC moves reply bytes at 0.2-0.6x of a plain TCP socket (bench/results/transport-*), so a
session may ask for a data plane (proto: "Data plane"). The server answers OpenSession with a port
and a one-time ticket; `DataPlaneClient` connects (TLS when the gRPC channel is TLS), sends the
ticket, and a reader thread takes each frame

    u64 request_id, u64 total_bytes, u32 n_tensors, n_tensors x u64 nbytes, the bytes

and `recv_into`s its tensors straight into one buffer (each tensor 64-byte aligned, so its slice
can be viewed as any dtype without a copy). The gRPC reply of such a request is its header alone;
`wire.ReplyAssembler(data_plane=...)` matches it to the frame by request id (`take`). Several
requests may be in flight: frames wait by request id until their header claims them.

Late frames: a frame travels apart from its gRPC reply header, so a request whose call failed or
timed out on the client (`discard`, or a `take` that gave up) may still get its frame afterwards.
Such a request id is remembered for `unclaimed_ttl_s` and its frame is dropped when it comes; a
frame no header claimed within `unclaimed_ttl_s` is dropped too (with a warning). So frames nobody
will take never pile up: what waits is bounded by what arrives in `unclaimed_ttl_s`.

A connection that breaks (server gone, reset, a malformed frame) marks the client `broken`: waiting
and later `take`s raise Unavailable (a retryable error), and the remote client falls back to the
gRPC frames for the rest of its session. A server that closes the socket on purpose (its session
closed, or the server is stopping) first sends the close frame, a frame head with request id
`CLOSE_FRAME_ID` and no tensors: the client then ends the same way but `closed_by_server` is set, and
nobody calls it a break.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence

import grpc
import torch

from .errors import DraftfeedError, Unavailable, error_for_code

__all__ = [
    "FRAME_HEAD",
    "TICKET_BYTES",
    "ACCEPTED",
    "REFUSED",
    "MAX_FRAME_TENSORS",
    "CLOSE_FRAME_ID",
    "frame_head",
    "recv_exact",
    "DataPlaneClient",
]

log = logging.getLogger("draftfeed.client")

FRAME_HEAD = struct.Struct("<QQI")  # request_id, total_bytes, n_tensors; then n_tensors x u64
TICKET_BYTES = 32
ACCEPTED, REFUSED = b"\x01", b"\x00"
MAX_FRAME_TENSORS = 4096  # a frame announcing more is malformed
# a frame head with this request id and no tensors: the server closes the socket on purpose
CLOSE_FRAME_ID = 2**64 - 1
_ALIGN = 64


def frame_head(request_id: int, sizes: Sequence[int]) -> bytes:
    """The bytes that precede a frame's payload: ids, total, count and each tensor's byte count."""
    return FRAME_HEAD.pack(request_id, sum(sizes), len(sizes)) + struct.pack(f"<{len(sizes)}Q", *sizes)


def recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    """Exactly `nbytes` from `sock`; ConnectionError when the peer closes first."""
    buf = bytearray(nbytes)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:], total - got)
        if n == 0:
            raise ConnectionError(f"the server closed the data plane after {got} of {total} bytes")
        got += n


class _ClosedByServer(Exception):
    """The close frame arrived: the server closes this socket because the session or the server ends."""


def _data_loss(message: str, request_id: int) -> DraftfeedError:
    err = error_for_code(grpc.StatusCode.DATA_LOSS, message)
    err.request_id = request_id
    return err


class DataPlaneClient:
    """One session's data-plane connection and its reader thread.

    host, port, ticket: from OpenSessionResponse (the host is the gRPC URL's).
    ssl_context, server_hostname: TLS like the gRPC channel (None: plaintext).
    timeout: how long `take` waits for a frame whose header arrived.
    reuse_buffers: 0 gives each frame a fresh buffer (its tensors stay valid); K > 0 reuses a ring
        of K buffers, so a frame's tensors are overwritten K frames later (see wire.ReplyAssembler).
    pin_memory: page-locked buffers (fast asynchronous copies to a GPU).
    on_break(reason): called from the reader thread once when the connection breaks (not when this
        client closes it, nor when the server closes it with the close frame).
    unclaimed_ttl_s: how long a frame waits for its header, and how long a discarded request id is
        remembered so its late frame is dropped (default: `timeout`).

    Raises OSError / ssl.SSLError when the port cannot be reached, and Unavailable when the server
    refuses the ticket.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ticket: bytes,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 120.0,
        reuse_buffers: int = 0,
        pin_memory: bool = False,
        on_break: Callable[[str], None] | None = None,
        unclaimed_ttl_s: float | None = None,
    ):
        if reuse_buffers < 0:
            raise ValueError(f"reuse_buffers must be >= 0, got {reuse_buffers}")
        self.address = (host, port)
        self.timeout = timeout
        self.unclaimed_ttl_s = timeout if unclaimed_ttl_s is None else unclaimed_ttl_s
        self.reuse_buffers = reuse_buffers
        self.pin_memory = pin_memory
        self.on_break = on_break
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            sock.sendall(ticket)
            status = recv_exact(sock, 1)
        except BaseException:
            sock.close()
            raise
        if status != ACCEPTED:
            sock.close()
            raise Unavailable(f"the data plane at {host}:{port} refused this session's ticket")
        sock.settimeout(None)
        self.sock = sock
        self.tls = ssl_context is not None
        self.replies = 0  # frames received
        self.bytes = 0  # payload bytes received
        self.dropped = 0  # frames dropped: late (their request was discarded) or never claimed
        self.broken: str | None = None  # why the connection ended; None while it works
        self.closed_by_server = False  # it ended with the server's close frame: a clean close, not a break
        self._closing = False
        # request id -> (buffer, offsets, sizes, arrival time) of frames no header claimed yet
        self._frames: dict[int, tuple[torch.Tensor | None, list[int], tuple[int, ...], float]] = {}
        self._discarded: dict[int, float] = {}  # request id -> until when its late frame is dropped
        self._cond = threading.Condition()
        self._ring: list[tuple[torch.Tensor, memoryview] | None] = [None] * reuse_buffers
        self._turn = 0
        self._reader = threading.Thread(target=self._read, name="draftfeed-dataplane", daemon=True)
        self._reader.start()

    # -- reader thread ------------------------------------------------------------------------

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        turn = self._turn
        if self.reuse_buffers:
            self._turn = (turn + 1) % self.reuse_buffers
            slot = self._ring[turn]
            if slot is not None and slot[0].numel() >= nbytes:
                return slot
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        slot = (buf, memoryview(buf.numpy()))
        if self.reuse_buffers:
            self._ring[turn] = slot
        return slot

    def _read_frame(self) -> None:
        rid, total, count = FRAME_HEAD.unpack(recv_exact(self.sock, FRAME_HEAD.size))
        if rid == CLOSE_FRAME_ID and not total and not count:
            raise _ClosedByServer("closed by the server: its session closed or the server is stopping")
        if count > MAX_FRAME_TENSORS:
            raise ValueError(f"frame {rid} announces {count} tensors (at most {MAX_FRAME_TENSORS})")
        sizes = struct.unpack(f"<{count}Q", recv_exact(self.sock, 8 * count)) if count else ()
        if sum(sizes) != total:
            raise ValueError(f"frame {rid} announces {total} bytes but its tensors hold {sum(sizes)}")
        offsets, end = [], 0
        for n in sizes:
            offsets.append(end)
            end += -(-n // _ALIGN) * _ALIGN
        buf, view = self._buffer(end) if end else (None, None)
        for off, n in zip(offsets, sizes, strict=True):
            if n:
                _recv_into(self.sock, view[off : off + n])
        with self._cond:
            self.replies += 1
            self.bytes += total
            now = time.monotonic()
            if self._discarded.pop(rid, None) is not None:
                self.dropped += 1
                log.debug("data plane %s:%d: dropped late frame %d (%d bytes)", *self.address, rid, total)
            else:
                self._frames[rid] = (buf, offsets, sizes, now)
            self._expire(now)
            self._cond.notify_all()

    def _expire(self, now: float) -> None:
        """Forget discarded ids past their ttl and drop frames unclaimed for longer (lock held)."""
        for rid in [r for r, until in self._discarded.items() if until < now]:
            del self._discarded[rid]
        cutoff = now - self.unclaimed_ttl_s
        for rid in [r for r, f in self._frames.items() if f[3] < cutoff]:
            _buf, _offsets, sizes, _t = self._frames.pop(rid)
            self.dropped += 1
            log.warning(
                "data plane %s:%d: dropped frame %d (%d bytes): no reply header claimed it within %g s",
                *self.address,
                rid,
                sum(sizes),
                self.unclaimed_ttl_s,
            )

    def _read(self) -> None:
        clean = False
        try:
            while True:
                self._read_frame()
        except Exception as err:  # noqa: BLE001 - any failure ends the connection (OSError, a bad frame)
            reason = str(err) or type(err).__name__
            clean = isinstance(err, _ClosedByServer)
        with self._cond:
            closing = self._closing
            self.broken = "closed by this client" if closing else reason
            self.closed_by_server = clean and not closing
            self._cond.notify_all()
        self._shutdown()
        if self.closed_by_server:
            log.info("data plane %s:%d %s", *self.address, reason)
        elif not closing:
            log.warning("data plane %s:%d broke: %s", *self.address, reason)
            if self.on_break is not None:
                self.on_break(reason)

    # -- consumer side ------------------------------------------------------------------------

    def take(self, request_id: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """The payload of reply `request_id` as one uint8 tensor per entry of `sizes` (views of one
        buffer), waiting up to `timeout` for its frame. Unavailable (retryable) when the connection
        broke or the frame does not come; DATA_LOSS when the frame's sizes differ from `sizes`."""
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while request_id not in self._frames:
                if self.broken is not None:
                    err = Unavailable(
                        f"the data plane lost reply {request_id} ({self.broken}); the request can be retried"
                    )
                    err.request_id = request_id
                    raise err
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    self._discarded[request_id] = now + self.unclaimed_ttl_s  # its frame may still come
                    err = Unavailable(f"no data-plane frame for reply {request_id} within {self.timeout:g} s")
                    err.request_id = request_id
                    raise err
                self._cond.wait(left)
            buf, offsets, got, _t = self._frames.pop(request_id)
        if list(got) != list(sizes):
            raise _data_loss(
                f"reply {request_id}: its header announces tensors of {list(sizes)} bytes, its data-plane "
                f"frame holds {list(got)}",
                request_id,
            )
        return [
            buf[off : off + n] if n else torch.empty(0, dtype=torch.uint8)
            for off, n in zip(offsets, sizes, strict=True)
        ]

    def discard(self, request_id: int) -> None:
        """Drops the frame of a request whose call failed or was given up: now if it came, else
        when it comes (within `unclaimed_ttl_s`), so it is never kept."""
        with self._cond:
            now = time.monotonic()
            if self._frames.pop(request_id, None) is not None:
                self.dropped += 1
            elif self.broken is None and not self._closing:
                self._discarded[request_id] = now + self.unclaimed_ttl_s
            self._expire(now)

    @property
    def unclaimed(self) -> tuple[int, int]:
        """(frames, payload bytes) received and not yet taken."""
        with self._cond:
            return len(self._frames), sum(sum(f[2]) for f in self._frames.values())

    @property
    def usable(self) -> bool:
        return self.broken is None and not self._closing

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        """Closes the connection (the server then stops using it) and ends the reader thread."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        self._shutdown()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
