"""Remote target backends: the same interfaces as the in-process ones, served over gRPC.

`RemoteEagle3TargetModel.from_urls(["grpc://gpu-box:50051"], device="cuda")` checks the server's
model info against what it was asked for, opens a session per server and remembers the session's
state, so a server that restarted (NOT_FOUND) gets the session re-opened and the request retried
once. UNAVAILABLE is retried with backoff (0.25 s doubling to 2 s), failing over to the next server,
for up to `retry_budget` seconds (default 60: a server restart of typical length, kill -9 included,
is ridden out); a job over its quota (RESOURCE_EXHAUSTED with a retry hint) waits as told and tries
again; every other error (INVALID_ARGUMENT above all) is raised as is. Several URLs are used
round-robin, and a dead server is skipped with a warning. `generate_batch_async` keeps up to
`max_in_flight` requests in flight over one bidirectional stream per server. Every future it returns
completes: with the batch, or with the error once the retry budget is spent. A stream that breaks
(the server died or restarted) or gives no reply for `timeout` seconds is abandoned, and its
requests are retried as `generate_batch` does; `max_wait_s` bounds how long any future can take.

Data plane (`data_plane=True`, the default): a session on a single-address URL asks the server for
a TCP data plane (client/dataplane.py) and, when offered, reads reply payloads from that socket,
2-4x faster than Python gRPC's frames (bench/results/transport-*); control and reply headers stay on
gRPC. If the data socket cannot be opened or breaks, the session falls back to gRPC frames with one
warning; a socket the server closes on purpose (the session closed, the server stopping: its close
frame) is no break and is logged at INFO only. Re-opening the session (a server restart) opens a new
data socket.

Encodings (`encodings=`, the train CLI's `--encodings`): a preset, `KIND=NAME` overrides, or both
(client/encodings.py `parse_encodings`). The default, `exact`, is bit-exact and compact: an EAGLE-3
session gets the final-norm state and the server-decided position_mask instead of fp32 draft-vocab
probabilities and rebuilds them here (`latent`; raw only when the server does not offer it);
`compact` adds fp8 hidden states (lossy, opt-in). The server's offer is checked before the first
request, with an error naming what it offers.

TLS, mutual TLS and job tokens: `grpcs://` URLs with `ca_file=`, `client_cert=`/`client_key=` and
`token=` (see client/channel.py); the data plane uses the same TLS settings. One URL may also name several servers behind one balanced
channel (`grpc://dns:///NAME:PORT`, `ipv4:A:P,B:P`); every session call then carries the session's
spec so whichever replica answers can serve it.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import tempfile
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path

import grpc
import torch
from torch import nn

from .algorithms import get_algorithm
from .backend import DFlashTargetBackend, DSparkTargetBackend, Eagle3TargetBackend
from .channel import (
    RETRY_AFTER_KEY,
    ChannelSecurity,
    explain_unavailable,
    open_channel,
    parse_target,
    parse_url,
    retry_after_s,
    session_spec_metadata,
)
from .dataplane import DataPlaneClient
from .encodings import parse_encodings, session_encodings
from .errors import DraftfeedError, InvalidArgument, NotFound, ResourceExhausted, Unavailable, error_for_code
from .payload import decode_fields, resolve_encodings
from .pb import draftfeed_pb2 as pb
from .wire import ReplyAssembler, TargetStub, grpc_options, tensor_to_proto

__all__ = [
    "RemoteTargetModel",
    "RemoteEagle3TargetModel",
    "RemoteDFlashTargetModel",
    "RemoteDSparkTargetModel",
    "parse_url",
]

log = logging.getLogger("draftfeed.client")

_INPUTS = ("input_ids", "attention_mask", "loss_mask", "position_ids", "seq_lens", "doc_remaining")
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)  # then 2 s per retry until the retry budget is spent
# a channel whose server went away reconnects with gRPC's backoff (up to 120 s by default): keep its
# attempts close enough that a restarted server is found within a couple of seconds
_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]


def _raise(err: grpc.RpcError) -> DraftfeedError:
    out = error_for_code(err.code(), err.details() or str(err.code()))
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            out.retry_after_s = int(value) / 1000
    return out


class _Server:
    """One server: its channel, its model info, and this client's session on it."""

    def __init__(self, url: str, timeout: float, security: ChannelSecurity):
        self.url = url
        self.target = parse_target(url)
        self.security = security
        self.channel = open_channel(self.target, security, grpc_options() + _RECONNECT)
        self.stub = TargetStub(self.channel)
        self.timeout = timeout
        self.session_id: str | None = None
        self.stream: _Stream | None = None
        self.reopen_lock = threading.Lock()  # one re-open at a time after a restart
        self.data: DataPlaneClient | None = None
        self._data_warned = False  # one fallback warning per session
        try:
            self.info: pb.ModelInfo = self.call(self.stub.GetModelInfo, pb.GetModelInfoRequest())
        except Unavailable as err:
            self.channel.close()
            raise explain_unavailable(self.target, security, err) from None

    @property
    def balanced(self) -> bool:
        """Several replicas behind this one channel: session calls carry the session's spec."""
        return self.target.balanced

    def call(self, method, request, timeout=None, metadata=()):
        try:
            return method(
                request, timeout=timeout or self.timeout, metadata=self.security.metadata + metadata
            )
        except grpc.RpcError as err:
            raise _raise(err) from None

    # -- data plane -----------------------------------------------------------------------------

    def open_data_plane(self, resp: pb.OpenSessionResponse, pin_memory: bool = False) -> None:
        """Connects the data plane the server offered with a (re-)opened session; on failure warns
        once and leaves the session on gRPC frames. `pin_memory`: frames land in page-locked buffers
        (a CUDA client's copies to the GPU then run at full speed and off the trainer's stream)."""
        self.close_data_plane()
        self._data_warned = False
        if not resp.data_port:
            return
        host = self.target.host_port[0]
        try:
            ctx = self.security.ssl_context() if self.target.tls else None
            self.data = DataPlaneClient(
                host,
                resp.data_port,
                resp.data_ticket,
                ssl_context=ctx,
                server_hostname=self.security.server_name or host,
                timeout=self.timeout,
                pin_memory=pin_memory,
            )
        except (OSError, DraftfeedError) as err:
            self._fall_back(
                f"cannot open its data plane {host}:{resp.data_port} ({err}; a server behind a firewall "
                "can fix the port with --data-port N or turn it off with --no-data-plane)"
            )

    def data_plane_usable(self) -> bool:
        """Whether new requests should ask for the data plane; warns once when it broke (a clean close by
        the server, which is stopping or closed the session, is logged at INFO only)."""
        data = self.data
        if data is None:
            return False
        if data.usable:
            return True
        if data.closed_by_server:
            self._fall_back(f"it closed this session's data plane ({data.broken})", clean=True)
        else:
            self._fall_back(f"its data plane broke ({data.broken})")
        return False

    def _fall_back(self, why: str, clean: bool = False) -> None:
        """Says once per session that replies go on gRPC: a warning, or at INFO for a clean close."""
        if not self._data_warned:
            self._data_warned = True
            message = f"draftfeed: {self.url}: {why}; this session's replies go on gRPC from now on"
            if clean:
                log.info(message)
                return
            log.warning(message)
            warnings.warn(message, stacklevel=4)

    def take(self, request_id: int, sizes):
        """Payload of a reply the server put on the data plane (`wire.ReplyAssembler(data_plane=)`)."""
        data = self.data
        if data is None:
            err = Unavailable(f"reply {request_id} went to a data plane this client closed; retry it")
            err.request_id = request_id
            raise err
        return data.take(request_id, sizes)

    def discard(self, request_id: int) -> None:
        if self.data is not None:
            self.data.discard(request_id)

    def close_data_plane(self) -> None:
        if self.data is not None:
            self.data.close()
            self.data = None

    def close(self):
        if self.stream is not None:
            self.stream.close()
        self.close_data_plane()
        self.channel.close()


class RemoteTargetModel:
    """The remote client of any registered algorithm (`client/algorithms/`): `algorithm=` names it (the
    per-algorithm subclasses below set it), `layer_ids=` its target-layer ids (None: the server's
    default; a callable: ids from the target's decoder-layer count N, as the server's model info tells it).
    `generate_batch` returns the algorithm's batch dataclass."""

    algorithm: str | None = None

    def __init__(
        self,
        urls: list[str] | str,
        *,
        algorithm: str | None = None,
        device: str | torch.device = "cpu",
        layer_ids: list[int] | None = None,
        job_name: str = "",
        encodings: str | dict[str, str] | None = None,
        capture_logits: bool = False,
        weight: float | None = None,
        timeout: float = 120.0,
        retry_budget: float = 60.0,
        max_in_flight: int = 2,
        cache_dir: str | Path | None = "~/.cache/draftfeed/weights",
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        token: str | None = None,
        server_name: str | None = None,
        data_plane: bool = True,
    ):
        if algorithm is not None:
            self.algorithm = algorithm
        if self.algorithm is None:
            raise InvalidArgument("RemoteTargetModel needs algorithm= (one of the registered algorithms)")
        self._alg = get_algorithm(self.algorithm)
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise InvalidArgument("from_urls needs at least one server URL (grpc://HOST:PORT)")
        self.device = torch.device(device)
        self._copies = _DeviceCopies(self.device) if self.device.type == "cuda" else None
        self.job_name = job_name
        self._encodings_spec = encodings
        parse_encodings(encodings)  # a bad name fails here, before any server is asked
        self.encodings = resolve_encodings(None)  # set from the server's offer in _check_info
        self.capture_logits = capture_logits
        self.weight = weight
        self.timeout = timeout
        if not retry_budget >= 0:
            raise InvalidArgument(f"retry_budget={retry_budget!r}: expected seconds >= 0")
        self.retry_budget = float(retry_budget)
        self.max_in_flight = max(1, max_in_flight)
        self.data_plane = data_plane
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self._mapping: tuple[torch.Tensor, torch.Tensor] | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._spec_md: tuple | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._progress: tuple[int, float | None] = (0, None)  # report_progress(): sent with requests
        self.security = ChannelSecurity(ca_file, client_cert, client_key, token, server_name)
        self.servers: list[_Server] = []
        failures: list[tuple[str, Unavailable]] = []
        for url in urls:
            try:
                self.servers.append(_Server(url, timeout, self.security))
            except Unavailable as err:
                failures.append((url, err))
        if not self.servers:
            if len(failures) == 1:
                raise failures[0][1]
            raise Unavailable(
                "none of the target servers answered: " + "; ".join(f"{u}: {e}" for u, e in failures)
            )
        for url, err in failures:
            warnings.warn(f"draftfeed: skipping server {url}: {err}", stacklevel=3)
        self.info = self.servers[0].info
        self._check_info(layer_ids)
        self._turn = itertools.cycle(range(len(self.servers)))
        for server in self.servers:
            self._open(server)

    @classmethod
    def from_urls(cls, urls, device="cpu", **kwargs):
        return cls(urls, device=device, **kwargs)

    # -- setup --------------------------------------------------------------------------------

    def _check_info(self, layer_ids):
        info = self.info
        for s in self.servers[1:]:
            if s.info.fingerprint != info.fingerprint:
                raise InvalidArgument(
                    f"servers serve different targets: {self.servers[0].url} has fingerprint {info.fingerprint}, "
                    f"{s.url} has {s.info.fingerprint}; point one job at servers of the same model"
                )
        if self.algorithm not in info.algorithms:
            raise InvalidArgument(
                f"server {self.servers[0].url} does not serve {self.algorithm} (it serves {', '.join(info.algorithms)})"
            )
        asked = session_encodings(self._encodings_spec, self.algorithm, info.encodings, self.servers[0].url)
        self.encodings = resolve_encodings(asked)
        n = info.num_hidden_layers
        if callable(layer_ids):  # a rule of the target's layer count, which the model info tells
            layer_ids = layer_ids(n)
        self.layer_ids = self._alg.validate_layer_ids(layer_ids, n) if layer_ids else None

    def _spec(self) -> pb.OpenSessionRequest:
        """What this client opens a session with (and what a replica adopts it from)."""
        req = pb.OpenSessionRequest(
            algorithm=self.algorithm,
            layer_ids=self.layer_ids or [],
            job_name=self.job_name,
            capture_logits=self.capture_logits,
            encodings=self.encodings,
            weight=self.weight or 0.0,  # 0: the job's weight (the server's operator sets it)
        )
        if self._mapping is not None:
            req.selected_token_ids.CopyFrom(tensor_to_proto(self._mapping[0]))
            req.selected_token_mask.CopyFrom(tensor_to_proto(self._mapping[1]))
        return req

    def _session_metadata(self, server: _Server) -> tuple:
        """Extra metadata of a session call: the spec on a balanced channel, else nothing."""
        if not server.balanced:
            return ()
        md = self._spec_md
        if md is None:
            md = self._spec_md = session_spec_metadata(self._spec())
        return md

    def _open(self, server: _Server) -> None:
        spec = self._spec()
        spec.data_plane = self.data_plane and not server.balanced  # a session lives on one replica
        resp = server.call(server.stub.OpenSession, spec)
        server.session_id = resp.session_id
        self.layer_ids = list(resp.layer_ids)
        self._spec_md = None
        server.open_data_plane(resp, pin_memory=self._copies is not None)

    # -- requests -----------------------------------------------------------------------------

    def report_progress(self, step: int, loss: float | None = None) -> None:
        """Sent with the next requests (GenerateRequest.trainer_step / trainer_loss)."""
        finite = loss is not None and loss == loss and abs(loss) != float("inf")
        self._progress = (max(0, int(step)), float(loss) if finite else None)

    def _request(self, server: _Server, inputs: dict[str, torch.Tensor | None]) -> pb.GenerateRequest:
        step, loss = self._progress
        req = pb.GenerateRequest(
            session_id=server.session_id,
            request_id=next(self._ids),
            data_plane=server.data_plane_usable(),
            trainer_step=step,
            trainer_loss=loss,
        )
        for name in _INPUTS:
            t = inputs.get(name)
            if t is not None:
                getattr(req, name).CopyFrom(tensor_to_proto(t.detach().cpu()))
        return req

    def _reopen(self, server: _Server, stale: str | None) -> None:
        """Re-open the session on `server` unless another thread already did since `stale` failed."""
        with server.reopen_lock:
            if server.session_id == stale:
                log.warning("session unknown on %s (server restarted?): re-opening it", server.url)
                self._open(server)

    def _with_retries(self, fn):
        """Run `fn(server)`: re-open the session once on NOT_FOUND, back off and fail over on
        UNAVAILABLE for up to `retry_budget` seconds, wait out a quota (RESOURCE_EXHAUSTED with a
        retry hint) for up to `timeout`."""
        last = None
        throttled = 0.0
        deadline = time.monotonic() + self.retry_budget
        for attempt in itertools.count():
            server = self.servers[next(self._turn)]
            reopened = False
            while True:
                sid = server.session_id
                try:
                    return fn(server)
                except NotFound:
                    if reopened or server.balanced:
                        raise
                    try:
                        self._reopen(server, sid)
                    except Unavailable as err:  # down again: back off as for any unavailable call
                        last = err
                        break
                    reopened = True
                except ResourceExhausted as err:
                    wait = retry_after_s(err)
                    if wait is None or throttled + wait > self.timeout:
                        raise
                    log.info("%s: %s; waiting %.2f s", server.url, err, wait)
                    time.sleep(wait)
                    throttled += wait
                except Unavailable as err:
                    last = err
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)], left)
            log.warning("%s unavailable (%s); retrying in %.2f s", server.url, last, wait)
            time.sleep(wait)
        raise Unavailable(f"{last} (retried for {self.retry_budget:.0f} s: retry_budget= sets how long)")

    def _generate_on(self, server: _Server, inputs) -> object:
        req = self._request(server, inputs)
        assembler = ReplyAssembler(data_plane=server)
        frames = None
        try:
            metadata = server.security.metadata + self._session_metadata(server)
            frames = server.stub.Generate(req, timeout=self.timeout, metadata=metadata)
            replies = list(assembler.replies(frames))
        except grpc.RpcError as err:
            server.discard(req.request_id)
            raise _raise(err) from None
        except DraftfeedError:
            server.discard(req.request_id)
            if frames is not None:
                frames.cancel()
            raise
        if len(replies) != 1:  # a server must answer a Generate with one reply or an error status
            raise error_for_code(
                grpc.StatusCode.DATA_LOSS,
                f"{server.url} ended Generate with {len(replies)} replies instead of one; retry the batch",
            )
        return self._batch(replies[0])

    def _batch(self, reply):
        if self._copies is not None:
            return self._copies.run(lambda: self._decode(reply))
        return self._decode(reply)

    def _decode(self, reply):
        fields = decode_fields(reply.tensors, reply.meta["fields"], self.device)
        if self._alg.rebuild is not None:  # e.g. latent EAGLE-3 supervision: target_probs rebuilt here
            fields = self._alg.rebuild(self, fields)
        return self._alg.batch(**fields)

    def target_config_dict(self) -> dict | None:
        """The served target's config (`config.to_dict()`) from the server's model info; None from a server
        too old to send it."""
        text = self.info.target_config_json
        return json.loads(text) if text else None

    def _softcap(self):
        return self.info.final_logit_softcapping if self.info.HasField("final_logit_softcapping") else None

    def generate_batch(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ):
        inputs = dict(
            zip(
                _INPUTS,
                (input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining),
                strict=True,
            )
        )
        return self._with_retries(lambda server: self._generate_on(server, inputs))

    @property
    def supports_async(self) -> bool:
        return True

    def generate_batch_async(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ) -> Future:
        inputs = dict(
            zip(
                _INPUTS,
                (input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining),
                strict=True,
            )
        )
        server = self.servers[next(self._turn)]
        with self._lock:
            if server.stream is None or server.stream.broken:
                server.stream = _Stream(self, server)
            stream = server.stream
        fut = stream.submit(inputs)
        if fut is None:  # the stream broke before the request was on it: retry it as generate_batch does
            fut = Future()
            threading.Thread(
                target=_complete, args=(fut, self.generate_batch, inputs), name="draftfeed-retry", daemon=True
            ).start()
        return fut

    @property
    def max_wait_s(self) -> float:
        """The longest a `generate_batch_async` future can take: each request ahead of it on its
        stream may take `timeout`, then the retries (`retry_budget`, then one last `timeout`), then a
        quota wait of up to `timeout`. A caller waiting longer has found a bug, not a slow server."""
        return (self.max_in_flight + 3) * self.timeout + self.retry_budget

    @property
    def num_remote_servers(self) -> int:
        return len(self.servers)

    # -- weights ------------------------------------------------------------------------------

    def _weight(self, name: str) -> torch.Tensor:
        with self._lock:
            if name in self._weights:
                return self._weights[name]
            path = self.cache_dir / self.info.fingerprint / f"{name}.pt" if self.cache_dir else None
            if path is not None and path.is_file():
                w = torch.load(path, map_location="cpu", weights_only=True)
            else:
                server = self.servers[0]
                try:
                    frames = server.stub.StreamWeights(
                        pb.StreamWeightsRequest(name=name),
                        timeout=self.timeout * 10,
                        metadata=server.security.metadata,
                    )
                    (reply,) = list(ReplyAssembler().replies(frames))
                except grpc.RpcError as err:
                    raise _raise(err) from None
                w = reply.tensors[name].clone()
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # a unique name per writer: jobs on one host fetch the same weights at the same time
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".partial")
                    try:
                        with os.fdopen(fd, "wb") as f:
                            torch.save(w, f)
                        os.replace(tmp, path)
                    except BaseException:
                        Path(tmp).unlink(missing_ok=True)
                        raise
            self._weights[name] = w
            return w

    def get_input_embeddings(self) -> nn.Module:
        return nn.Embedding.from_pretrained(self._weight("embed_tokens").to(self.device), freeze=True)

    def get_output_embeddings(self) -> nn.Module:
        w = self._weight("lm_head").to(self.device)
        head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        head.weight = nn.Parameter(w, requires_grad=False)
        return head

    def _lm_head_rows(self) -> torch.Tensor:
        if self._mapping is None:
            raise InvalidArgument("latent supervision needs a vocab mapping; call set_vocab_mapping first")
        if "lm_head_rows" not in self._weights:
            self._weights["lm_head_rows"] = self._weight("lm_head")[self._mapping[0]].to(self.device)
        return self._weights["lm_head_rows"]

    def close(self) -> None:
        for server in self.servers:
            server.close_data_plane()  # first: the server closing its end is not a break
            if server.session_id is not None:
                try:
                    server.call(
                        server.stub.CloseSession,
                        pb.CloseSessionRequest(session_id=server.session_id),
                        10,
                        self._session_metadata(server),
                    )
                except DraftfeedError as err:
                    log.info("closing session on %s: %s", server.url, err)
                server.session_id = None
            server.close()

    def __del__(self):
        try:
            for server in getattr(self, "servers", []):
                server.close_data_plane()
                server.channel.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class _DeviceCopies:
    """A CUDA client decodes replies on its own stream, not the trainer's.

    Decoding a reply onto the GPU is a host-to-device copy of every part (~150 MB for an EAGLE-3 batch of
    16 x 2048) plus the rebuild of latent supervision (a matmul over the draft vocab). On the trainer's
    stream that work queues behind, and blocks, the training step: a pageable copy holds the issuing
    thread until the queued kernels have run. Here it runs on a side stream from page-locked buffers
    (`open_data_plane(pin_memory=True)`), overlapping the step; the reader thread (never the trainer)
    waits for it, so a batch is complete on the device when its future resolves. Its tensors are marked
    as used by the consumer's stream (`record_stream`), so their memory is not handed back to this stream
    while the step that reads them is still queued."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.consumer = torch.cuda.current_stream(device)  # the stream of the thread that built the client

    def run(self, decode):
        with torch.cuda.stream(self.stream):
            batch = decode()
        self.stream.synchronize()
        for t in batch.tensors().values():
            if t.is_cuda:
                t.record_stream(self.consumer)
        return batch


def _complete(fut: Future, fn, inputs) -> None:
    """Run `fn(**inputs)` into `fut` (its result, or the exception it raised)."""
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn(**inputs))
    except Exception as exc:  # noqa: BLE001 - delivered through the future
        fut.set_exception(exc)


class _Stream:
    """One GenerateStream call: up to `max_in_flight` requests outstanding, replies in order.

    The stream is abandoned (`broken`) when it fails, or when a request waits for its reply longer
    than `timeout` (a watchdog cancels the call); its pending requests are then retried with
    `generate_batch` (backoff, failover, the retry budget), so every future completes."""

    def __init__(self, target: RemoteTargetModel, server: _Server):
        self.target = target
        self.server = server
        self.window = threading.Semaphore(target.max_in_flight)
        self.requests: queue.Queue = queue.Queue()
        self.pending: queue.Queue = queue.Queue()  # (future, inputs, request id) in request order
        self.order = threading.Lock()  # a request and its pending entry are queued together
        self.broken = False
        self.closing = False
        self.progress = time.monotonic()  # the last reply, or the first request after an idle spell
        self.done = threading.Event()
        metadata = server.security.metadata + target._session_metadata(server)
        self.call = server.stub.GenerateStream(iter(self.requests.get, None), metadata=metadata)
        self.reader = threading.Thread(target=self._read, name="draftfeed-stream", daemon=True)
        self.reader.start()
        self.watchdog = threading.Thread(target=self._watch, name="draftfeed-stream-watchdog", daemon=True)
        self.watchdog.start()

    def submit(self, inputs) -> Future | None:
        """The request's future, or None when the stream broke before it could be queued."""
        self.window.acquire()
        fut: Future = Future()
        request = self.target._request(self.server, inputs)
        with self.order:  # threads submitting at once: replies come in the order requests were sent
            if self.broken:  # its reader has finished: nobody would answer or retry this request
                self.window.release()
                return None
            if self.pending.empty():
                self.progress = time.monotonic()
            self.pending.put((fut, inputs, request.request_id))
            self.requests.put(request)
        return fut

    def _watch(self):
        """Cancel the call when the oldest request has waited `timeout` seconds for its reply."""
        timeout = self.target.timeout
        while not self.done.wait(min(1.0, timeout / 4)):
            if not self.pending.empty() and time.monotonic() - self.progress > timeout:
                log.warning(
                    "generate stream to %s: no reply for %.0f s; abandoning it and retrying its requests",
                    self.server.url,
                    timeout,
                )
                self.call.cancel()
                return

    def _read(self):
        assembler = ReplyAssembler(data_plane=self.server)
        try:
            for frame in self.call:
                try:
                    reply = assembler.feed(frame)
                except DraftfeedError as err:  # this request failed alone
                    if getattr(err, "request_id", None) is None:
                        raise
                    self._resolve(None, err)
                    continue
                if reply is not None:
                    self._resolve(reply, None)
        except grpc.RpcError as err:
            if not self.closing:
                log.warning("generate stream to %s broke: %s", self.server.url, err.details())
        except DraftfeedError as err:
            log.warning("generate stream to %s broke: %s", self.server.url, err)
            self.call.cancel()  # abandoned: the server stops answering it
        finally:
            with self.order:  # from now on submit() queues nothing here
                self.broken = True
            self.done.set()
            self._retry_pending()

    def _resolve(self, reply, err):
        got = reply.request_id if reply is not None else err.request_id
        due = self.pending.queue[0][2] if self.pending.queue else None  # only this thread takes
        if got != due:  # the server answers in request order; anything else breaks the stream
            raise error_for_code(
                grpc.StatusCode.DATA_LOSS, f"reply {got} came where reply {due} was due; stream abandoned"
            )  # what is pending stays there: _retry_pending retries it
        fut, inputs, _rid = self.pending.get()
        self.progress = time.monotonic()
        self.window.release()
        if not fut.set_running_or_notify_cancel():
            return
        if isinstance(err, NotFound | Unavailable) or (
            isinstance(err, ResourceExhausted) and retry_after_s(err) is not None
        ):
            self._retry(fut, inputs)
            return
        if err is not None:
            fut.set_exception(err)
            return
        try:
            fut.set_result(self.target._batch(reply))
        except Exception as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)

    def _retry(self, fut, inputs):
        try:
            fut.set_result(self.target.generate_batch(**inputs))
        except Exception as exc:  # noqa: BLE001 - delivered through the future
            fut.set_exception(exc)

    def _retry_pending(self):
        """Retry what the broken stream left unanswered; once a retry gave up on an unreachable
        server (its whole retry budget spent), the rest fail with that error at once."""
        gave_up = None
        while True:
            try:
                fut, inputs, rid = self.pending.get_nowait()
            except queue.Empty:
                return
            self.server.discard(rid)  # its frame may still come on the data plane: drop it then
            self.window.release()
            if not fut.set_running_or_notify_cancel():
                continue
            if gave_up is not None:
                fut.set_exception(Unavailable(str(gave_up)))
                continue
            try:
                fut.set_result(self.target.generate_batch(**inputs))
            except Unavailable as exc:
                gave_up = exc
                fut.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - delivered through the future
                fut.set_exception(exc)

    def close(self):
        self.closing = True
        self.done.set()
        self.requests.put(None)
        self.call.cancel()


class RemoteEagle3TargetModel(RemoteTargetModel, Eagle3TargetBackend):
    """EAGLE-3 supervision from a draftfeed server. `aux_layer_ids` default to the server's."""

    algorithm = "eagle3"

    def __init__(self, urls, *, aux_layer_ids: list[int] | None = None, **kwargs):
        super().__init__(urls, layer_ids=aux_layer_ids, **kwargs)

    @property
    def aux_layer_ids(self) -> list[int]:
        return self.layer_ids

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        ids = selected_token_ids.detach().cpu().long()
        mask = selected_token_mask.detach().cpu().bool()
        if mask.numel() != self.info.vocab_size:
            raise InvalidArgument(
                f"selected_token_mask has {mask.numel()} entries but the server's target has a vocab of "
                f"{self.info.vocab_size}; build the mapping from this target's tokenizer"
            )
        with self._lock:
            previous, self._mapping, self._spec_md = self._mapping, (ids, mask), None
        for server in self.servers:
            req = pb.SetVocabMappingRequest(
                session_id=server.session_id,
                selected_token_ids=tensor_to_proto(ids),
                selected_token_mask=tensor_to_proto(mask),
            )
            try:
                server.call(server.stub.SetVocabMapping, req, metadata=self._session_metadata(server))
            except NotFound:
                self._open(server)
            except DraftfeedError:
                self._mapping, self._spec_md = previous, None
                raise
            if server.balanced and server.stream is not None:  # its replica took the old spec
                server.stream.close()
                server.stream = None
        self._weights.pop("lm_head_rows", None)


class RemoteDFlashTargetModel(RemoteTargetModel, DFlashTargetBackend):
    """DFlash features from a draftfeed server."""

    algorithm = "dflash"

    def __init__(self, urls, *, target_layer_ids: list[int] | None = None, **kwargs):
        super().__init__(urls, layer_ids=target_layer_ids, **kwargs)

    @property
    def target_layer_ids(self) -> list[int]:
        return self.layer_ids


class RemoteDSparkTargetModel(RemoteTargetModel, DSparkTargetBackend):
    """DSpark features from a draftfeed server."""

    algorithm = "dspark"

    def __init__(self, urls, *, target_layer_ids: list[int] | None = None, **kwargs):
        super().__init__(urls, layer_ids=target_layer_ids, **kwargs)

    @property
    def target_layer_ids(self) -> list[int]:
        return self.layer_ids

    @property
    def final_logit_softcapping(self) -> float | None:
        return self._softcap()
