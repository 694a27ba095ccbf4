"""The gRPC servicer: translates wire <-> domain and makes one domain call per RPC.

A data request's path in (check, convert, hold, charge, submit, account; shared with the NeMo HTTP
port) lives in server/admission.py, validation in target/checks.py, batching in server/scheduler.py, math in features/supervision,
who-may-do-what in server/auth.py, session ids (and adoption across replicas) in server/directory.py,
the optional TCP data plane for reply payloads in server/dataplane.py, the per-job bound on open
Generate/GenerateStream calls (each holds a worker thread) in server/call_slots.py.
`_rpc` authenticates every call and maps draftfeed errors to `abort(code, message)` (a quota error
also sends its retry hint as trailing metadata), and anything else to INTERNAL, logged with the RPC
name, without stopping the server. While draining, new work gets UNAVAILABLE and open streams end
once the requests they already queued are answered.

Request bytes that are not a valid protobuf message get INVALID_ARGUMENT (grpcio answers a raising
deserializer with INTERNAL "Exception deserializing request!", so `lenient_deserializer` returns a
`_Malformed` marker that `_rpc` refuses; on GenerateStream the stream ends with it after the
requests before it are answered). The health and reflection services keep grpcio's INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
from concurrent.futures import CancelledError

import grpc
import torch

from draftfeed.client.channel import RETRY_AFTER_KEY, session_spec_from_metadata
from draftfeed.client.errors import DraftfeedError, FailedPrecondition, InvalidArgument, Unavailable, capped
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import encode_error_reply, encode_reply, tensor_from_proto

from .admission import OPTIONAL, REQUIRED, Admission, Admitted
from .auth import AccessControl, Caller
from .call_slots import CallSlots
from .dataplane import DataPlaneServer, reply_frames
from .directory import SessionDirectory
from .sessions import Session, SessionTable

__all__ = ["TargetServicer", "lenient_deserializer"]

log = logging.getLogger("draftfeed.service")

_WEIGHTS = {"embed_tokens": "get_input_embeddings", "lm_head": "get_output_embeddings"}
_DRAIN = object()  # put into a stream's queue when the server starts draining


class _Malformed:
    """Stands for request bytes that did not parse as `kind`; `_rpc` answers INVALID_ARGUMENT."""

    def __init__(self, kind: str, err: Exception):
        self.error = InvalidArgument(
            f"the request is not a valid {kind} protobuf message ({type(err).__name__}); "
            "send messages built from draftfeed's proto (draftfeed.client.pb)"
        )


def lenient_deserializer(message_class):
    """A request deserializer that never raises: bad bytes become a `_Malformed`."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as err:  # noqa: BLE001 - DecodeError differs between protobuf implementations
            return _Malformed(message_class.__name__, err)

    return parse


def _rpc(fn):
    """Authenticate the caller, then run `fn(self, request, context, caller)`; map draftfeed errors
    to their status; log and report anything else as INTERNAL."""

    def fail(context, name, err):
        if isinstance(err, DraftfeedError):
            retry = getattr(err, "retry_after_s", None)
            if retry is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(round(retry * 1000))),))
            context.abort(err.code, capped(str(err)))  # a message that echoes a huge input stays small
        log.exception("%s failed", name)
        context.abort(
            grpc.StatusCode.INTERNAL, capped(f"{name} failed inside the server: {type(err).__name__}: {err}")
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(self, request, context):
            try:
                caller = self.access.authenticate(context)
                if isinstance(request, _Malformed):
                    raise request.error
                yield from fn(self, request, context, caller)
            except Exception as err:  # noqa: BLE001 - mapped to a status
                fail(context, fn.__name__, err)

        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        try:
            caller = self.access.authenticate(context)
            if isinstance(request, _Malformed):
                raise request.error
            return fn(self, request, context, caller)
        except Exception as err:  # noqa: BLE001 - mapped to a status
            fail(context, fn.__name__, err)

    return unary


def _slot(fn):
    """Hold one of the caller's long-call slots (server/call_slots.py) while the call runs."""

    @functools.wraps(fn)
    def call(self, request, context, caller):
        if caller.job is not None:
            job, what = f"job:{caller.name}", f"job {caller.name!r}"
        else:  # no token file: each client connection is its own job
            job = what = f"client {context.peer()}"
        with self.slots.hold(job, what):
            yield from fn(self, request, context, caller)

    return call


def _opt(msg, name):
    return tensor_from_proto(getattr(msg, name), name) if msg.HasField(name) else None


def _spec(context) -> pb.OpenSessionRequest | None:
    return session_spec_from_metadata(context.invocation_metadata())


class TargetServicer:
    def __init__(
        self,
        model: torch.nn.Module,
        info: pb.ModelInfo,
        sessions: SessionTable,
        admission: Admission,
        chunk_bytes: int,
        access: AccessControl | None = None,
        gather=None,
        dataplane: DataPlaneServer | None = None,
        slots: CallSlots | None = None,
        tokenizer: pb.Tokenizer | None = None,
    ):
        """`gather(getter) -> tensor`: a full host copy of `model.<getter>().weight` (the tensor-parallel
        group's gather when the weights are sharded). `dataplane`: offered to sessions that ask.
        `tokenizer`: the GetTokenizer reply (client/tokenizer.py), None when the server has none.
        `admission`: the server's one admission path (server/admission.py), shared with the NeMo port."""
        self.model = model
        self.info = info
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.admission = admission
        self.scheduler = admission.scheduler
        self.chunk_bytes = chunk_bytes
        self.access = access or AccessControl()
        self.dataplane = dataplane
        self.slots = slots or CallSlots(total=1 << 30, per_job=1 << 30)  # default: unbounded
        self.directory = SessionDirectory(sessions, self.access, self._open, self.scheduler.cancel_session)
        self.gather = gather or (lambda getter: getattr(model, getter)().weight.detach().cpu().contiguous())
        self._weights: dict[str, torch.Tensor] = {}
        self._weights_lock = threading.Lock()
        self._streams: dict[int, tuple[queue.Queue, threading.Lock]] = {}
        self._streams_lock = threading.Lock()

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def drain(self) -> None:
        """Stop admitting work: new requests and sessions get UNAVAILABLE; each open stream ends
        after answering the requests it had already queued."""
        self.admission.draining = True
        with self._streams_lock:
            streams = list(self._streams.values())
        for pending, gate in streams:
            with gate:  # a reader between its draining check and its put finishes first
                pending.put(_DRAIN)

    # -- control ------------------------------------------------------------------------------

    @_rpc
    def GetModelInfo(self, request, context, caller):
        return self.info

    @_rpc
    def GetTokenizer(self, request, context, caller):
        if self.tokenizer is None:
            raise FailedPrecondition(
                "this server has no tokenizer (the target's directory holds none); give the trainer a local "
                "copy of the target's tokenizer with --target-model DIR"
            )
        return self.tokenizer

    def _open(self, request: pb.OpenSessionRequest, caller: Caller) -> Session:
        if self.draining:
            raise Unavailable("the server is draining and opens no new sessions; use another server")
        self.access.check_algorithm(caller, request.algorithm)
        mapping = None
        if request.HasField("selected_token_ids") or request.HasField("selected_token_mask"):
            mapping = (
                tensor_from_proto(request.selected_token_ids, "selected_token_ids"),
                tensor_from_proto(request.selected_token_mask, "selected_token_mask"),
            )
        return self.sessions.open(
            request.algorithm,
            list(request.layer_ids),
            self.access.job_name(caller, request.job_name),
            request.capture_logits,
            dict(request.encodings),
            self.access.session_weight(caller, request.weight),
            mapping,
        )

    @_rpc
    def OpenSession(self, request, context, caller):
        session = self._open(request, caller)
        resp = pb.OpenSessionResponse(
            session_id=session.id, layer_ids=session.layer_ids, encodings=session.encodings
        )
        if request.data_plane and self.dataplane is not None:
            resp.data_port, resp.data_ticket = self.dataplane.port, self.dataplane.issue(session)
        return resp

    @_rpc
    def SetVocabMapping(self, request, context, caller):
        session = self.directory.get(request.session_id, caller, _spec(context))
        self.sessions.set_mapping(
            session,
            tensor_from_proto(request.selected_token_ids, "selected_token_ids"),
            tensor_from_proto(request.selected_token_mask, "selected_token_mask"),
        )
        return pb.SetVocabMappingResponse()

    @_rpc
    def CloseSession(self, request, context, caller):
        session = self.directory.close(request.session_id, caller)
        if self.dataplane is not None:
            self.dataplane.close_session(session.id)
        return pb.CloseSessionResponse()

    # -- data ---------------------------------------------------------------------------------

    def _submit(self, request, caller: Caller, spec: pb.OpenSessionRequest | None) -> Admitted:
        """One GenerateRequest through the admission path (server/admission.py)."""
        loss = request.trainer_loss if request.HasField("trainer_loss") else None
        return self.admission.admit(
            caller,
            lambda: self.directory.get(request.session_id, caller, spec),
            {name: _opt(request, name) for name in REQUIRED + OPTIONAL},
            "GenerateRequest",
            (request.trainer_step, loss),
        )

    def _frames(self, request_id, session, future, data_plane, context):
        """The frames of one answered request; its payload goes on the data plane only when the
        client asked and the call is still live (a cancelled call's client is no longer waiting)."""
        try:
            reply = future.result()
        except CancelledError:  # cancelled with its call (the client went away): nothing to send
            return iter(())
        reply.wait()
        data_plane = data_plane and context.is_active()
        nbytes = {}
        for name, m in reply.meta.items():
            enc = m["info"]["encoding"]
            nbytes[enc] = nbytes.get(enc, 0) + sum(reply.tensors[f"{name}.{p}"].nbytes for p in m["parts"])
        self.admission.account(session, reply.tokens, nbytes)
        meta = {"fields": reply.meta}
        return reply_frames(
            self.dataplane, session.id, request_id, reply.tensors, meta, self.chunk_bytes, data_plane
        )

    @_rpc
    @_slot
    def Generate(self, request, context, caller):
        admitted = self._submit(request, caller, _spec(context))
        context.add_callback(admitted.future.cancel)
        try:
            yield from self._frames(
                request.request_id, admitted.session, admitted.future, request.data_plane, context
            )
        finally:
            admitted.release()

    @_rpc
    @_slot
    def GenerateStream(self, request_iterator, context, caller):
        """Requests are read and queued as they arrive (several in flight); replies go back in
        request order. A request that fails alone gets an error frame; the stream goes on. When
        the server drains, the stream ends after the requests it already queued."""
        pending: queue.Queue = queue.Queue()
        gate = threading.Lock()
        ended = threading.Event()  # set under `gate` when the writer is done: the reader queues no more
        spec = _spec(context)

        def read():
            try:
                for request in request_iterator:
                    if isinstance(request, _Malformed):  # no request id to answer: the stream ends with it
                        pending.put(request)
                        return
                    with gate:
                        if ended.is_set():
                            return
                        try:
                            a = self._submit(request, caller, spec)
                            pending.put(
                                (request.request_id, a.session, a.future, a.release, request.data_plane)
                            )
                        except DraftfeedError as err:
                            pending.put((request.request_id, None, err, None, False))
            except Exception as err:  # noqa: BLE001 - the client went away
                log.debug("GenerateStream reader ended: %s", err)
            finally:
                pending.put(None)

        def cancel_queued():  # the call ended (or was cancelled): queued requests need no forward
            for item in list(pending.queue):
                if isinstance(item, tuple) and item[1] is not None:
                    item[2].cancel()

        context.add_callback(cancel_queued)
        with self._streams_lock:
            self._streams[id(pending)] = (pending, gate)
        try:
            threading.Thread(target=read, name="draftfeed-stream-reader", daemon=True).start()
            draining = False
            while True:
                if draining:
                    try:
                        item = pending.get_nowait()
                    except queue.Empty:
                        return
                else:
                    item = pending.get()
                if item is None:
                    return
                if item is _DRAIN:
                    draining = True
                    continue
                if isinstance(item, _Malformed):
                    raise item.error
                yield from self._answer(*item, context)
        finally:
            with self._streams_lock:
                self._streams.pop(id(pending), None)
            with gate:
                ended.set()
            for item in list(pending.queue):  # never answered: no reply is kept for them
                if isinstance(item, tuple) and item[1] is not None:
                    item[2].cancel()
                    item[3]()

    def _answer(self, request_id, session, outcome, release, data_plane, context):
        if session is None:
            yield encode_error_reply(request_id, outcome)
            return
        try:
            yield from self._frames(request_id, session, outcome, data_plane, context)
        except DraftfeedError as err:
            yield encode_error_reply(request_id, err)
        finally:
            release()

    @_rpc
    def StreamWeights(self, request, context, caller):
        getter = _WEIGHTS.get(request.name)
        if getter is None:
            raise InvalidArgument(f"unknown weight {request.name!r}; available: {', '.join(_WEIGHTS)}")
        with self._weights_lock:
            if request.name not in self._weights:
                self._weights[request.name] = self.gather(getter)
        meta = {"fingerprint": self.info.fingerprint, "name": request.name}
        yield from encode_reply(0, {request.name: self._weights[request.name]}, meta, self.chunk_bytes)
