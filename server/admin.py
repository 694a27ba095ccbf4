"""The admin HTTP app (fastapi on its own port): health, readiness, Prometheus metrics
(server/prometheus.py), sessions, and the status page (`/` or `/status`, polling `/status.json`).

Read-only and without tokens (probes and scrapers carry none; it shows job names, never tokens). It
follows the server's peer rule: without a token file only loopback peers are answered (403 for
others) unless --insecure-allow-remote; with a token file every peer that reaches the port is, so bind
or publish it for monitoring hosts only."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse

from draftfeed.client.errors import PermissionDenied

from .http_thread import UvicornThread, http_peer
from .prometheus import CONTENT_TYPE, prometheus_text
from .status import StatusHistory, nemo_session_ids, status_json, status_page, status_page_csp, transport

__all__ = ["build_admin_app", "AdminServer", "prometheus_text", "sessions_json"]


def sessions_json(server) -> list[dict]:
    out = []
    nemo_ids = nemo_session_ids(server)
    for s in server.sessions.list():
        st = s.stats
        out.append(
            {
                "session_id": s.id,
                "job_name": s.job_name,
                "algorithm": s.algorithm,
                "layer_ids": s.layer_ids,
                "encodings": s.encodings,
                "transport": transport(server, s, nemo_ids),
                "trainer_step": st.trainer_step,
                "trainer_loss": st.trainer_loss,
                "weight": s.weight,
                "requests": st.requests,
                "tokens": st.tokens,
                "bytes_sent": st.bytes_sent,
                "bytes_per_token": st.bytes_sent / st.tokens if st.tokens else 0.0,
                "queue_wait_s": st.queue_wait_s,
                "in_flight": st.in_flight,
                "created": s.created,
                "last_seen": s.last_seen,
            }
        )
    return out


def build_admin_app(server) -> FastAPI:
    history = StatusHistory(server)
    page = status_page()
    page_headers = {
        "Content-Security-Policy": status_page_csp(page),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    # the sampler is started and stopped by AdminServer, not an ASGI lifespan: uvicorn cancels a
    # lifespan still running when it is stopped at once, and logs a CancelledError traceback for it
    app = FastAPI(title="draftfeed admin", docs_url=None, redoc_url=None)
    app.state.status_history = history

    @app.middleware("http")
    async def peer_rule(request: Request, call_next):
        try:
            server.access.check_peer(http_peer(request))  # read at each call, as on the gRPC port
        except PermissionDenied as err:
            return JSONResponse({"error": str(err)}, status_code=403)
        return await call_next(request)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        saturated = server.saturated  # every Generate/GenerateStream slot taken (server/call_slots.py)
        ready = server.ready and not saturated
        body = {"ready": ready, "draining": server.servicer.draining, "saturated": saturated}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics():
        return Response(prometheus_text(server), media_type=CONTENT_TYPE)

    @app.get("/sessions")
    def sessions():
        return {"time": time.time(), "sessions": sessions_json(server)}

    @app.get("/", response_class=HTMLResponse)
    @app.get("/status", response_class=HTMLResponse)
    def status():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/status.json")
    def status_document():
        return JSONResponse(status_json(server, history), headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    return app


class AdminServer(UvicornThread):
    """The admin app of `server` on its own port (server/http_thread.py)."""

    def __init__(self, server, host: str, port: int):
        app = build_admin_app(server)
        self.history = app.state.status_history
        super().__init__(app, host, port, name="draftfeed-admin", flag="--admin-port")

    def start(self) -> AdminServer:
        self.history.start()
        try:
            return super().start()
        except BaseException:
            self.history.stop()
            raise

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.history.stop()
