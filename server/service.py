"""The gRPC servicer: translates wire <-> domain and makes one domain call per RPC.

Validation lives in server/checks.py, batching in server/scheduler.py, math in features/supervision.
Errors are draftfeed errors carrying their gRPC code; `_rpc` maps them to `abort(code, message)`,
and anything else to INTERNAL, logged with the RPC name, without stopping the server.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading

import grpc
import torch

from draftfeed.client.errors import DraftfeedError, InvalidArgument, Unavailable
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import encode_error_reply, encode_reply, tensor_from_proto

from .checks import Limits, check_generate_inputs
from .features import TokenBatch
from .scheduler import BatchScheduler
from .sessions import SessionTable

__all__ = ["TargetServicer"]

log = logging.getLogger("draftfeed.service")

_WEIGHTS = {"embed_tokens": "get_input_embeddings", "lm_head": "get_output_embeddings"}


def _rpc(fn):
    """Map draftfeed errors to their status; log and report anything else as INTERNAL."""

    def fail(context, name, err):
        if isinstance(err, DraftfeedError):
            context.abort(err.code, str(err))
        log.exception("%s failed", name)
        context.abort(
            grpc.StatusCode.INTERNAL, f"{name} failed inside the server: {type(err).__name__}: {err}"
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(self, request, context):
            try:
                yield from fn(self, request, context)
            except Exception as err:  # noqa: BLE001 - mapped to a status
                fail(context, fn.__name__, err)

        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as err:  # noqa: BLE001 - mapped to a status
            fail(context, fn.__name__, err)

    return unary


def _opt(msg, name):
    return tensor_from_proto(getattr(msg, name), name) if msg.HasField(name) else None


class TargetServicer:
    def __init__(
        self,
        model: torch.nn.Module,
        info: pb.ModelInfo,
        sessions: SessionTable,
        scheduler: BatchScheduler,
        limits: Limits,
        chunk_bytes: int,
    ):
        self.model = model
        self.info = info
        self.sessions = sessions
        self.scheduler = scheduler
        self.limits = limits
        self.chunk_bytes = chunk_bytes
        self.draining = False
        self._weights: dict[str, torch.Tensor] = {}
        self._weights_lock = threading.Lock()

    # -- control ------------------------------------------------------------------------------

    @_rpc
    def GetModelInfo(self, request, context):
        return self.info

    @_rpc
    def OpenSession(self, request, context):
        if self.draining:
            raise Unavailable("the server is draining and opens no new sessions; use another server")
        mapping = None
        if request.HasField("selected_token_ids") or request.HasField("selected_token_mask"):
            mapping = (
                tensor_from_proto(request.selected_token_ids, "selected_token_ids"),
                tensor_from_proto(request.selected_token_mask, "selected_token_mask"),
            )
        session = self.sessions.open(
            request.algorithm,
            list(request.layer_ids),
            request.job_name,
            request.capture_logits,
            dict(request.encodings),
            request.weight or 1.0,
            mapping,
        )
        return pb.OpenSessionResponse(
            session_id=session.id, layer_ids=session.layer_ids, encodings=session.encodings
        )

    @_rpc
    def SetVocabMapping(self, request, context):
        session = self.sessions.get(request.session_id)
        self.sessions.set_mapping(
            session,
            tensor_from_proto(request.selected_token_ids, "selected_token_ids"),
            tensor_from_proto(request.selected_token_mask, "selected_token_mask"),
        )
        return pb.SetVocabMappingResponse()

    @_rpc
    def CloseSession(self, request, context):
        self.sessions.close(request.session_id)
        self.scheduler.cancel_session(request.session_id)
        return pb.CloseSessionResponse()

    # -- data ---------------------------------------------------------------------------------

    def _submit(self, request):
        """Validate one GenerateRequest on the CPU and queue it; a bad request never reaches the GPU."""
        if self.draining:
            raise Unavailable("the server is draining and takes no new requests; use another server")
        session = self.sessions.get(request.session_id)
        session.check_ready()
        for name in ("input_ids", "attention_mask", "loss_mask"):
            if not request.HasField(name):
                raise InvalidArgument(
                    f"GenerateRequest.{name} is missing; send input_ids, attention_mask and loss_mask"
                )
        tb = TokenBatch(
            tensor_from_proto(request.input_ids, "input_ids"),
            tensor_from_proto(request.attention_mask, "attention_mask"),
            tensor_from_proto(request.loss_mask, "loss_mask"),
            _opt(request, "position_ids"),
            _opt(request, "seq_lens"),
            _opt(request, "doc_remaining"),
        )
        check_generate_inputs(
            tb.input_ids,
            tb.attention_mask,
            tb.loss_mask,
            tb.position_ids,
            tb.seq_lens,
            tb.doc_remaining,
            vocab_size=self.info.vocab_size,
            limits=self.limits,
        )
        return session, self.scheduler.submit(session, tb)

    def _frames(self, request_id, session, future):
        reply = future.result()
        reply.wait()
        nbytes = {}
        for name, m in reply.meta.items():
            enc = m["info"]["encoding"]
            nbytes[enc] = nbytes.get(enc, 0) + sum(reply.tensors[f"{name}.{p}"].nbytes for p in m["parts"])
        session.stats.requests += 1
        session.stats.tokens += reply.tokens
        session.stats.bytes_sent += sum(nbytes.values())
        self.scheduler.metrics.record_reply(reply.tokens, nbytes)
        return encode_reply(request_id, reply.tensors, {"fields": reply.meta}, self.chunk_bytes)

    @_rpc
    def Generate(self, request, context):
        session, future = self._submit(request)
        context.add_callback(future.cancel)
        yield from self._frames(request.request_id, session, future)

    @_rpc
    def GenerateStream(self, request_iterator, context):
        """Requests are read and queued as they arrive (several in flight); replies go back in
        request order. A request that fails alone gets an error frame; the stream goes on."""
        pending: queue.Queue = queue.Queue()

        def read():
            try:
                for request in request_iterator:
                    try:
                        pending.put((request.request_id, *self._submit(request)))
                    except DraftfeedError as err:
                        pending.put((request.request_id, None, err))
            except Exception as err:  # noqa: BLE001 - the client went away
                log.debug("GenerateStream reader ended: %s", err)
            finally:
                pending.put(None)

        threading.Thread(target=read, name="draftfeed-stream-reader", daemon=True).start()
        while (item := pending.get()) is not None:
            request_id, session, outcome = item
            if session is None:
                yield encode_error_reply(request_id, outcome)
                continue
            try:
                yield from self._frames(request_id, session, outcome)
            except DraftfeedError as err:
                yield encode_error_reply(request_id, err)

    @_rpc
    def StreamWeights(self, request, context):
        getter = _WEIGHTS.get(request.name)
        if getter is None:
            raise InvalidArgument(f"unknown weight {request.name!r}; available: {', '.join(_WEIGHTS)}")
        with self._weights_lock:
            if request.name not in self._weights:
                w = getattr(self.model, getter)().weight.detach()
                self._weights[request.name] = w.to("cpu").contiguous()
        meta = {"fingerprint": self.info.fingerprint, "name": request.name}
        yield from encode_reply(0, {request.name: self._weights[request.name]}, meta, self.chunk_bytes)
