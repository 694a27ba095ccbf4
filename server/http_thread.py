"""A fastapi app served by uvicorn on a background thread, and the access rules' view of an HTTP
peer: what the admin port (server/admin.py) and the NeMo port (server/nemo_http.py) share."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import Request

from .listening import bind_tcp

__all__ = ["UvicornThread", "http_peer"]


class UvicornThread:
    """`app` on `host:port` (0 picks a free port; `port` is the bound one after `start()`). Extra
    keyword arguments go to `uvicorn.Config`; TLS is set on `config` before `start()` (server/app.py)."""

    def __init__(self, app, host: str, port: int, *, name: str, flag: str, grace_s: float = 10.0, **config):
        # no ASGI lifespan: `stop()` ends the server at once (force_exit), and uvicorn then cancels a
        # lifespan still waiting for its shutdown event and logs a CancelledError traceback for it
        config.setdefault("lifespan", "off")
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", **config)
        self.uvicorn = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.host, self.port, self.grace_s, self.flag = host, port, grace_s, flag
        self.sock = None

    def _run(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        return f"{'https' if self.config.ssl_certfile else 'http'}://{host}:{self.port}"

    def start(self):
        """Bind the port (`port_taken` naming `flag` when it is in use), then serve on the thread."""
        self.sock = bind_tcp(self.host, self.port, self.flag)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.uvicorn.started and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        if not self.uvicorn.started:
            self.sock.close()
            raise OSError(f"{self.thread.name} did not start on {self.config.host}:{self.config.port}")
        self.port = self.sock.getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop listening, let the requests in flight finish (up to `grace_s`), then close every
        connection at once: an idle keep-alive TLS connection would otherwise hold the thread for
        asyncio's 30 s TLS shutdown timeout (measured: 30.1 s per stop with one NeMo client connected
        over TLS, 1.0 s after)."""
        self.uvicorn.should_exit = True
        deadline = time.monotonic() + self.grace_s
        while self.thread.is_alive() and self.uvicorn.server_state.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        self.uvicorn.force_exit = True
        self.thread.join(5)


def http_peer(request: Request) -> str:
    """The request's peer as a gRPC peer string (`ipv4:HOST:PORT`, `ipv6:[HOST]:PORT`) for the access rules."""
    client = request.scope.get("client")
    if not client:
        return "unknown:"
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
