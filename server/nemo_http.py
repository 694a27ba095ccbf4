"""NeMo AutoModel's remote-target HTTP protocol (docs/architecture.md, NeMo port) on its own port, so a NeMo
recipe with `target_model_backend: remote` can point `remote_urls` at a draftfeed server unchanged.

Endpoints, the NMET blob (server/nemo_blob.py) and the reply dtypes are theirs. What differs, on purpose:

- Each HTTP client gets its OWN EAGLE-3 session (the server's default aux layer ids, raw encodings) on
  the shared scheduler, so its requests batch with the gRPC jobs and its vocab mapping never reaches
  another client. `/disconnect` closes only that session; the server keeps serving.
- Caps count per job (per peer host without a token file): at most `max_clients_per_job` clients
  per job (a new one closes the job's least recently used idle client) and `max_clients` in all (a
  job finding the server full makes room among its own clients, or gets 503); one job's clients
  never close another job's.
- A client's session expires like any other (`--session-ttl`), but their client never re-opens
  one (it never calls /heartbeat), so its next request re-opens it from the vocab mapping it sent.
- A `/generate` takes the server's one admission path (server/admission.py: checks, the per-job
  queue limit, the job's quota, the scheduler, the session's stats), as a gRPC GenerateRequest does;
  only a refusal for a full queue or quota differs: it waits here (see below).
- `/init_nccl` answers `disabled`, so clients stay on the HTTP path.
- The server's access rules hold here as on the gRPC port: with a token file every endpoint but
  `/health` needs a job token, which an unchanged NeMo client sends when it is in the URL
  (`remote_urls: [http://JOB:TOKEN@host:port]`: `requests` turns it into HTTP Basic auth; the password,
  or the user name when the password is empty as in `http://TOKEN:@host:port`, is the token) or as `Authorization: Bearer <token>`;
  the job's algorithms and quotas apply (a request over quota waits, as on a full queue), and a
  client's session belongs to its job. Without a token file only loopback peers are answered
  (unless --insecure-allow-remote). With --tls-cert the port speaks HTTPS with the same certificate
  (their client then needs `REQUESTS_CA_BUNDLE` for a private CA); with --tls-client-ca it requires a
  client certificate, which NeMo's client as published cannot present.
- Errors: malformed input is 4xx, the rest 500, with the message in the JSON body
  (`{"detail": ...}`) and, as NeMo's server does, in the status line's reason phrase (ASCII, at most
  `_REASON_CHARS`), which is all their client shows (`raise_for_status()`: "400 Client Error: <reason>").
  uvicorn always sends the standard phrase, so this port runs uvicorn's h11 protocol with one change
  (`_ReasonH11Protocol`: an `X-Draftfeed-Reason` header becomes the reason phrase). Their client retries only connection errors and timeouts, so every 4xx/5xx
  fails the call the same way as their 500 did. Messages are capped (client/errors.py `capped`) and
  never echo an Authorization header. A client that disconnects mid-request is logged at INFO, without
  a traceback.

Which client is which. ASGI gives a handler no connection object: `scope["client"]` (peer host, port)
is one TCP connection, but a NeMo client does not keep one connection. uvicorn closes a connection
idle for `timeout_keep_alive`, their `generate_batch_async` pool (2 threads) can hold two pooled
connections of one `requests.Session`, and a retry after a connection error reconnects; each of
these arrives from a new port (checked: after an idle timeout and after `Session.close()` the port
changed). A `requests.Session` does keep cookies across all its connections and threads, so the key
is the first of these that is present.
Every key is scoped by the caller's job when tokens are on, so one job can never reach another's
session (by a guessed header or a stolen cookie). In order:
  1. the `X-Draftfeed-Client` header (a client that names itself; also its job name);
  2. the `draftfeed_client` cookie this server sets on its first answer to a client;
  3. the connection (host, port) for clients that keep no cookies: bound to the id minted for it
     and forgotten once idle longer than the keep-alive timeout (then the connection is closed).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import h11
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from draftfeed.client.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    capped,
)
from draftfeed.client.payload import decode_fields
from draftfeed.target.features import TokenBatch

from .admission import Admission
from .auth import Caller
from .http_thread import UvicornThread, http_peer
from .nemo_blob import BlobLimits, BlobTooLarge, blob_segments, decode_blob
from .sessions import Session

__all__ = ["NemoHTTPServer", "NemoClients", "build_nemo_app", "CLIENT_HEADER", "CLIENT_COOKIE"]

log = logging.getLogger("draftfeed.nemo_http")

CLIENT_HEADER = "X-Draftfeed-Client"
CLIENT_COOKIE = "draftfeed_client"
_HEADER_ID = re.compile(r"[\x21-\x7e]{1,128}")
_COOKIE_ID = re.compile(r"[0-9a-f]{32}")
_GENERATE_KEYS = ("input_ids", "attention_mask", "loss_mask")
_SMALL_BODY = 64 << 10
_DRAIN_CAP = 64 << 20  # read and drop up to this much of an oversize body, so the 413 reaches the client
_TOKEN_HINT = (
    "put it in the URL (remote_urls: [http://JOB:TOKEN@host:port]; requests sends it as HTTP Basic auth) "
    "or send the header 'Authorization: Bearer <token>'"
)
_REASON_HEADER = "X-Draftfeed-Reason"
_REASON_CHARS = 1024  # http.client reads a status line of up to 64 KiB; a reason stays far below
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_CHUNK = 1 << 20  # measured (2-core VM, loopback, 277 MiB reply): 2.3-2.6 GB/s sent at 1 MiB, 1-1.9 at 4 MiB

# error class -> HTTP status (the first matching base wins; anything else is 500)
_STATUS = (
    (BlobTooLarge, 413),
    (InvalidArgument, 400),
    (FailedPrecondition, 409),
    (NotFound, 404),
    (Busy, 429),
    (ResourceExhausted, 413),
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (Unavailable, 503),
)


@dataclass
class _Client:
    key: str
    how: str  # how the client was identified, for messages
    job: str  # the bucket its caps count in: "job:NAME" with tokens, else "host:PEER"
    job_name: str  # its session's label
    session: Session
    mapping: tuple[torch.Tensor, torch.Tensor]  # kept to re-open an expired session
    last_seen: float
    weight: float = 1.0  # its job's scheduling weight (the token file's; 1 without one)


class NemoClients:
    """Who each HTTP client is, and its own EAGLE-3 session (thread-safe).

    Caps count per job (per peer host without a token file): a job holds at most
    `max_clients_per_job` clients, and a new one past that closes the job's least recently used
    idle client; the server holds at most `max_clients`, and a job that finds it full can only
    make room among its own clients. One job's clients never close another job's."""

    def __init__(
        self, server, keep_alive_s: float = 75.0, max_clients: int = 256, max_clients_per_job: int = 64
    ):
        self.server = server
        self.keep_alive_s = keep_alive_s
        self.max_clients = max_clients
        self.max_clients_per_job = max_clients_per_job
        self.reopened = 0
        self._clients: dict[str, _Client] = {}
        self._by_conn: dict[tuple, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def job_of(request: Request, caller: Caller | None) -> str:
        """The bucket a client's caps count in: its job with tokens, else its peer host."""
        if caller is not None and caller.job is not None:
            return f"job:{caller.name}"
        peer = request.scope.get("client")
        return f"host:{peer[0] if peer else '?'}"

    def identify(self, request: Request, caller: Caller | None = None) -> tuple[str, str, str | None]:
        """(key, how it was identified, a cookie value to set or None); the key is scoped by the
        caller's job when there is one."""
        key, how, mint = self._identify(request)
        if caller is not None and caller.job is not None:
            return f"job:{caller.name}|{key}", f"{how} of job {caller.name!r}", mint
        return key, how, mint

    def _identify(self, request: Request) -> tuple[str, str, str | None]:
        named = request.headers.get(CLIENT_HEADER)
        if named is not None:
            if not _HEADER_ID.fullmatch(named):
                raise InvalidArgument(
                    f"{CLIENT_HEADER} must be 1-128 visible ASCII characters without spaces, got {named[:40]!r}"
                )
            return f"header:{named}", f"header {CLIENT_HEADER}={named}", None
        cookie = request.cookies.get(CLIENT_COOKIE)
        if cookie is not None and _COOKIE_ID.fullmatch(cookie):
            return f"cookie:{cookie}", f"cookie {CLIENT_COOKIE}={cookie[:8]}...", None
        peer = request.scope.get("client")
        now = time.monotonic()
        with self._lock:
            bound = self._by_conn.get(peer) if peer else None
            cid = bound[0] if bound and now - bound[1] <= self.keep_alive_s else uuid.uuid4().hex
            if peer:
                self._by_conn[peer] = (cid, now)
                if len(self._by_conn) > 4096:
                    self._by_conn = {
                        p: b for p, b in self._by_conn.items() if now - b[1] <= self.keep_alive_s
                    }
        how = (
            f"its connection {peer[0]}:{peer[1]} (it sent no {CLIENT_HEADER} header and did not send back "
            f"the {CLIENT_COOKIE} cookie, so a new connection is a new client)"
            if peer
            else "nothing stable (no header, no cookie, no peer address)"
        )
        return f"cookie:{cid}", how, cid

    def session(self, key: str) -> Session | None:
        """The client's live session; one that expired (--session-ttl) is re-opened from the client's
        vocab mapping, since NeMo's client cannot re-open it (it never calls /heartbeat)."""
        with self._lock:
            c = self._clients.get(key)
            if c is None:
                return None
            if c.session.closed:
                if not self.server.ready:  # closed by the server stopping
                    del self._clients[key]
                    return None
                c.session = self.server.sessions.open(
                    "eagle3", None, c.job_name, False, None, c.weight, c.mapping
                )
                self.reopened += 1
                log.info("NeMo HTTP client %s: its expired session re-opened as %s", c.how, c.session.id[:8])
            c.last_seen = time.monotonic()
            c.session.last_seen = time.time()  # renews its lease; what /sessions and the status page show
            return c.session

    def set_mapping(
        self,
        key: str,
        how: str,
        job: str,
        job_name: str,
        ids: torch.Tensor,
        mask: torch.Tensor,
        weight: float = 1.0,
    ) -> Session:
        """Set the client's vocab mapping, opening its session on first use (`job`: its caps' bucket)."""
        with self._lock:
            c = self._clients.get(key)
            if c is not None and not c.session.closed:
                self.server.sessions.set_mapping(c.session, ids, mask)
                c.mapping = (ids, mask)
                c.last_seen = time.monotonic()
                c.session.last_seen = time.time()
                return c.session
            if c is None:
                self._make_room_locked(job)
            session = self.server.sessions.open("eagle3", None, job_name, False, None, weight, (ids, mask))
            self._clients[key] = _Client(
                key, how, job, job_name, session, (ids, mask), time.monotonic(), weight
            )
            return session

    def _make_room_locked(self, job: str) -> None:
        own = [c for c in self._clients.values() if c.job == job]
        if len(own) < self.max_clients_per_job and len(self._clients) < self.max_clients:
            return
        idle = [c for c in own if c.session.stats.in_flight == 0]
        if not idle:
            if len(own) >= self.max_clients_per_job:
                raise Busy(
                    f"this job already has {len(own)} NeMo HTTP clients on this server (the cap per job), all "
                    "busy; retry later or disconnect clients it no longer uses"
                )
            raise Unavailable(
                f"this server already serves {len(self._clients)} NeMo HTTP clients (its cap); retry later "
                "or use another server"
            )
        old = min(idle, key=lambda c: c.last_seen)
        log.warning("NeMo HTTP clients of %s at the cap: closing its least recently used, %s", job, old.how)
        del self._clients[old.key]
        self._close_session(old.session)

    def disconnect(self, key: str) -> bool:
        with self._lock:
            c = self._clients.pop(key, None)
        if c is None:
            return False
        self._close_session(c.session)
        return True

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            self._close_session(c.session)

    def _close_session(self, session: Session) -> None:
        try:
            self.server.sessions.close(session.id)
        except NotFound:
            pass
        self.server.scheduler.cancel_session(session.id)


def http_token(request: Request) -> str | None:
    """The job token of an `Authorization: Bearer <token>` or `Basic` header (the password, or the
    user name when the password is empty: `requests` sends `http://JOB:TOKEN@host` or `http://TOKEN:@host`
    so), or None."""
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, cred = value.strip().partition(" ")
    cred = cred.strip()
    if scheme.lower() == "bearer":
        return cred or None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(cred, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument(
                "the Authorization header's Basic credentials are not base64 of user:password"
            ) from None
        return password or user or None
    # the value is never echoed: a header without a scheme is often the bare token itself
    raise InvalidArgument(
        "the Authorization header's scheme is not supported here (its value is not shown: it may be a "
        f"credential); use Basic or Bearer: {_TOKEN_HINT}"
    )


def _reason(message: str) -> str:
    """An HTTP reason phrase carrying `message`: printable ASCII, one line, at most `_REASON_CHARS`."""
    text = _UNPRINTABLE.sub(" ", message).strip()
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _error_response(message: str, status: int) -> JSONResponse:
    """`{"detail": message}`, the message also marked to go out as the reason phrase."""
    return JSONResponse({"detail": message}, status_code=status, headers={_REASON_HEADER: _reason(message)})


class _ReasonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, except that a response with an `X-Draftfeed-Reason` header sends its
    value as the status line's reason phrase instead (and not as a header): uvicorn writes the standard
    phrase for every status, and its ASGI messages have no field for another."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain = self.conn.send  # the connection every request-response cycle of this socket writes to
        key = _REASON_HEADER.lower().encode()

        def send(event):
            if isinstance(event, h11.Response):
                reason = next((v for k, v in event.headers if k == key), None)
                if reason is not None:
                    headers = [(k, v) for k, v in event.headers if k != key]
                    event = h11.Response(status_code=event.status_code, headers=headers, reason=reason)
            return plain(event)

        self.conn.send = send


def _status_of(err: BaseException) -> int:
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500


def _endpoint(fn):
    """Run a handler; draftfeed errors become their 4xx/5xx, anything else 500, each with the message
    as JSON `detail`. A cookie minted for a new client is set on every answer, errors included."""

    @functools.wraps(fn)
    async def handler(request: Request) -> Response:
        name = fn.__name__.removeprefix("_")
        try:
            response = await fn(request)
        except ClientDisconnect:  # nobody to answer: not a server error
            log.info("/%s: the client disconnected before sending the whole request", name)
            return Response(status_code=400)
        except Exception as err:  # noqa: BLE001 - mapped to a status; the server keeps serving
            status = _status_of(err)
            if status == 500:
                log.exception("/%s failed", name)
                msg = capped(f"/{name} failed inside the server: {type(err).__name__}: {err}")
            else:
                msg = capped(str(err))  # a message that echoes a huge input stays small
                log.info("/%s: %d %s", name, status, msg)
            response = _error_response(msg, status)
            if status in (429, 503):
                response.headers["Retry-After"] = "1"
            if status == 401:
                response.headers["WWW-Authenticate"] = 'Basic realm="draftfeed", charset="UTF-8"'

        cookie = getattr(request.state, "mint_cookie", None)
        if cookie:
            response.set_cookie(CLIENT_COOKIE, cookie, path="/", httponly=True, samesite="strict")
        return response

    return handler


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or BlobTooLarge past `limit` bytes (after reading and dropping up to
    `_DRAIN_CAP` more, so the client can finish sending and read the answer)."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise InvalidArgument(f"Content-Length {declared!r} is not a byte count")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            chunks.append(chunk)
        elif total > limit + _DRAIN_CAP:
            break
    if total > limit:
        raise BlobTooLarge(
            f"request body of {declared or total} bytes is over this endpoint's limit of {limit} bytes"
        )
    return b"".join(chunks)


async def _chunks(parts: list[memoryview]) -> AsyncIterator[memoryview]:
    for p in parts:
        for i in range(0, len(p), _CHUNK):
            yield p[i : i + _CHUNK]


def _blob_response(tensors: dict[str, torch.Tensor | None]) -> tuple[Response, int]:
    total, parts = blob_segments(tensors)
    headers = {"content-length": str(total)}
    return StreamingResponse(_chunks(parts), media_type="application/octet-stream", headers=headers), total


def build_nemo_app(server, clients: NemoClients, queue_wait_s: float = 60.0) -> FastAPI:
    """The FastAPI app for `server` (a TargetServer: sessions, scheduler, info, model, cfg)."""
    app = FastAPI(
        title="draftfeed NeMo remote-target protocol", docs_url=None, redoc_url=None, openapi_url=None
    )
    info, admission = server.info, server.admission
    generate_limit = 3 * 8 * server.cfg.limits.max_request_tokens + 4096
    mapping_limit = 9 * info.vocab_size + 4096

    def authorize(request: Request) -> Caller:
        """The server's access rules (read at each call: the token file's jobs, or loopback only)."""
        caller = server.access.check(http_peer(request), http_token(request), _TOKEN_HINT)
        request.state.caller = caller
        return caller

    def identify(request: Request) -> tuple[str, str]:
        key, how, mint = clients.identify(request, authorize(request))
        request.state.mint_cookie = mint
        return key, how

    def ok(body: dict | None = None) -> Response:
        return JSONResponse(body or {"status": "ok"})

    def check_serving() -> None:
        if not server.ready:
            raise Unavailable("the server is draining and takes no new work; use another server")

    async def _health(request: Request):
        if not server.ready:
            return JSONResponse({"status": "draining"}, status_code=503)
        return ok()

    async def _heartbeat(request: Request):
        key, _ = identify(request)
        await _read_body(request, _SMALL_BODY)
        clients.session(key)  # refreshes last_seen
        return ok()

    async def _model_info(request: Request):
        identify(request)
        await _read_body(request, _SMALL_BODY)
        return ok(
            {
                "num_hidden_layers": info.num_hidden_layers,
                "hidden_size": info.hidden_size,
                "vocab_size": info.vocab_size,
                "aux_layer_ids": list(info.eagle3_default_layer_ids),
            },
        )

    def embeddings() -> torch.Tensor:  # not kept: NeMo's client asks once and caches it
        # the servicer's gather: a host copy, and under tensor parallel the full weight from every rank
        return server.servicer.gather("get_input_embeddings")

    async def _input_embeddings(request: Request):
        identify(request)
        await _read_body(request, _SMALL_BODY)
        return _blob_response({"weight": await run_in_threadpool(embeddings)})[0]

    async def _set_vocab_mapping(request: Request):
        key, how = identify(request)
        check_serving()
        blob = decode_blob(await _read_body(request, mapping_limit), BlobLimits(mapping_limit, max_entries=4))
        _expect_keys(blob, ("selected_token_ids", "selected_token_mask"), "set_vocab_mapping")
        caller = request.state.caller
        server.access.check_algorithm(caller, "eagle3")
        named = request.headers.get(CLIENT_HEADER)
        job = server.access.job_name(caller, named if named is not None else _job_name(request, key))
        bucket = clients.job_of(request, caller)
        weight = server.access.session_weight(caller, 0)  # the job's, from the token file
        clients.set_mapping(
            key, how, bucket, job, blob["selected_token_ids"], blob["selected_token_mask"], weight
        )
        return ok()

    async def _init_nccl(request: Request):
        identify(request)
        await _read_body(request, _SMALL_BODY)
        return ok({"status": "disabled"})

    async def _disconnect(request: Request):
        key, _ = identify(request)
        await _read_body(request, _SMALL_BODY)
        clients.disconnect(key)
        return ok()

    async def _generate(request: Request):
        key, how = identify(request)
        blob = decode_blob(
            await _read_body(request, generate_limit), BlobLimits(generate_limit, max_entries=8)
        )
        _expect_keys(blob, _GENERATE_KEYS, "generate")

        def find_session() -> Session:
            session = clients.session(key)
            if session is None:
                raise FailedPrecondition(
                    "no vocab mapping for this client yet: POST /set_vocab_mapping first. Each client has "
                    f"its own mapping on this server; this one is identified by {how}"
                )
            return session

        # the server's one admission path (server/admission.py), as for a gRPC GenerateRequest
        session, tb = admission.check(find_session, blob, "generate blob")
        admitted = await _enter(admission, request.state.caller, session, tb, queue_wait_s)
        try:
            reply = await _result(session, admitted.future)
            if reply.ready is not None:
                await run_in_threadpool(reply.wait)
            fields = decode_fields(reply.tensors, reply.meta)
            response, nbytes = _blob_response(
                {
                    "aux_hidden_states": fields["aux_hidden_states"],
                    "target_probs": fields["target_probs"].float(),
                    "position_mask": fields["position_mask"].bool(),
                    "input_ids": fields["input_ids"].long(),
                    "loss_mask": fields["loss_mask"].long(),
                }
            )
        finally:
            admitted.release()
        admission.account(session, reply.tokens, {"raw": nbytes})
        return response

    routes = {
        "/health": (["GET", "POST"], _health),
        "/heartbeat": (["GET", "POST"], _heartbeat),
        "/model_info": (["GET", "POST"], _model_info),
        "/input_embeddings": (["POST"], _input_embeddings),
        "/set_vocab_mapping": (["POST"], _set_vocab_mapping),
        "/init_nccl": (["POST"], _init_nccl),
        "/generate": (["POST"], _generate),
        "/disconnect": (["POST"], _disconnect),
    }
    for path, (methods, fn) in routes.items():
        app.add_api_route(path, _endpoint(fn), methods=methods, include_in_schema=False)
    return app


def _job_name(request: Request, key: str) -> str:
    peer = request.scope.get("client")
    client = key.rpartition("|")[2].removeprefix("cookie:")
    return f"nemo-http {peer[0] if peer else '?'} {client[:8]}"


def _expect_keys(blob: dict, keys: tuple[str, ...], endpoint: str) -> None:
    missing = [k for k in keys if blob.get(k) is None]
    extra = [k for k in blob if k not in keys]
    if missing or extra:
        problems = [
            f"{what} {names}" for what, names in (("missing", missing), ("unexpected", extra)) if names
        ]
        raise InvalidArgument(
            f"the /{endpoint} blob must hold exactly {', '.join(keys)} as tensors; {'; '.join(problems)}"
        )


async def _enter(admission: Admission, caller: Caller, session: Session, tb: TokenBatch, wait_s: float):
    """`admission.enter` (hold, charge, submit); while the job is over quota or the queue is full,
    wait (their client does not retry a refusal), up to `wait_s`."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + wait_s, 0.01
    while True:
        try:
            return admission.enter(caller, session, tb)
        except ResourceExhausted as err:
            hinted = getattr(err, "retry_after_s", None)
            pause = delay if hinted is None else max(hinted, 0.01)
            if loop.time() + pause > deadline:
                what = (
                    "this job stayed over its quota"
                    if hinted is not None
                    else "the server's queue stayed full"
                )
                raise Unavailable(f"{what} for {wait_s:.0f} s ({err})") from None
            await asyncio.sleep(pause)
            delay = min(2 * delay, 0.5)


async def _result(session: Session, future):
    """The scheduler's reply, without blocking the event loop; fails if the session closes meanwhile."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=1.0)
        if done:
            if waiting.cancelled():
                break
            return waiting.result()
        if session.closed:
            future.cancel()
            break
    raise FailedPrecondition(
        "this client's session was closed (/disconnect or shutdown) while its request waited"
    )


class NemoHTTPServer(UvicornThread):
    """The NeMo protocol for `target_server` on its own port (server/http_thread.py); `stop()` also
    closes the sessions it opened."""

    def __init__(
        self,
        target_server,
        host: str,
        port: int,
        *,
        keep_alive_s: float = 75.0,
        max_clients: int = 256,
        max_clients_per_job: int = 64,
        queue_wait_s: float = 60.0,
        grace_s: float = 10.0,
    ):
        self.clients = NemoClients(target_server, keep_alive_s, max_clients, max_clients_per_job)
        self.app = build_nemo_app(target_server, self.clients, queue_wait_s)
        super().__init__(
            self.app, host, port, name="draftfeed-nemo-http", flag="--nemo-http-port", grace_s=grace_s,
            timeout_keep_alive=int(keep_alive_s), timeout_graceful_shutdown=int(grace_s),
            http=_ReasonH11Protocol,
        )  # fmt: skip

    def start(self) -> NemoHTTPServer:
        super().start()
        log.info("NeMo remote-target HTTP protocol on %s", self.url)
        return self

    def stop(self) -> None:
        super().stop()
        self.clients.close_all()
