"""Binding the server's listening ports, each refusing to start when its port is taken.

Every port the server opens (gRPC, data plane, admin, NeMo HTTP) is bound exclusively: a second
`draftfeed serve` on a port in use fails at start with an error that names the port and the flag
that set it, instead of sharing the port with the first server (gRPC's default SO_REUSEPORT
would let two servers split new connections between them).
"""

from __future__ import annotations

import socket

from draftfeed.client.errors import FailedPrecondition

__all__ = ["GRPC_EXCLUSIVE_PORT", "bind_tcp", "port_taken"]

# gRPC server option: no SO_REUSEPORT, so binding a port another process listens on fails
GRPC_EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def port_taken(flag: str, host: str, port: int, why: object = "address already in use") -> FailedPrecondition:
    """The error for a port that cannot be bound: which flag, which address, what to do."""
    return FailedPrecondition(
        f"{flag} {port}: cannot listen on {host}:{port} ({why}); another process (another "
        f"`draftfeed serve`?) holds it. Stop that process or pass a free {flag} (0 picks one)"
    )


def bind_tcp(host: str, port: int, flag: str) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); `port_taken(flag, ...)` when it is taken.

    SO_REUSEADDR (Python's default here) only lets a new listener take a port whose old connections
    linger in TIME_WAIT; it never lets two listeners share one port on Linux."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        return socket.create_server((bare, port), family=family)
    except OSError as err:
        raise port_taken(flag, host, port, err.strerror or err) from None
