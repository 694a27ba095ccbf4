"""The errors draftfeed raises, each carrying the gRPC status code it travels as.

The server's interceptor turns them into `context.abort(code, message)`; the remote client turns a
status back into the same class, so in-process and remote backends fail the same way.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DraftfeedError",
    "InvalidArgument",
    "FailedPrecondition",
    "NotFound",
    "ResourceExhausted",
    "Busy",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "error_for_code",
    "capped",
    "MAX_MESSAGE_BYTES",
]

MAX_MESSAGE_BYTES = 2048


class DraftfeedError(Exception):
    """Base class: `code` is the gRPC status this error is sent as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(DraftfeedError, ValueError):
    """The request itself is wrong (shape, dtype, ids, layer ids); retrying will not help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(DraftfeedError, RuntimeError):
    """The call is valid but comes too early (e.g. generate before a vocab mapping)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(DraftfeedError, KeyError):
    """Unknown session (the server restarted or the session was closed)."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(DraftfeedError, RuntimeError):
    """Over a limit: request size, queue depth or a job's quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Busy(ResourceExhausted):
    """Over a limit on requests or clients at once (a queue, a job's requests in flight): the same request
    fits once earlier ones are done. RESOURCE_EXHAUSTED on gRPC, 429 with Retry-After on HTTP (a request
    too large to ever fit stays a plain ResourceExhausted: 413)."""


class Unavailable(DraftfeedError, ConnectionError):
    """The server cannot take the request now (draining, restarting, unreachable)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(DraftfeedError, PermissionError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DraftfeedError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        NotFound,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
    )
}


def capped(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` cut to at most `limit` UTF-8 bytes. An error that echoes its input (a list of ids, a
    name) must stay small: a gRPC status message travels percent-encoded in a trailer, and past the
    peer's metadata limit (8-16 KiB) the client sees RESOURCE_EXHAUSTED instead of the real error."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    kept = data[: max(0, limit - 40)].decode("utf-8", "ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes)"


def error_for_code(code: grpc.StatusCode, message: str) -> DraftfeedError:
    """The draftfeed error for a gRPC status (INTERNAL and unknown codes give the base class)."""
    cls = _BY_CODE.get(code, DraftfeedError)
    err = cls(message)
    if cls is DraftfeedError:
        err.code = code
    return err
