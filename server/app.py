"""One server process: the target, the session table, the scheduler, gRPC (with health and
reflection) and the admin HTTP app, started and stopped together.

Lifecycle (`serve`): the first SIGTERM/SIGINT drains: health turns NOT_SERVING and /readyz false,
new requests and sessions get UNAVAILABLE (clients fail over), every request already queued is
answered, the data-plane sockets are closed after their replies, sessions are closed, and the
process exits 0 within `--grace-seconds`. A second signal
exits at once (status 1).

Under `torchrun --nproc-per-node K` (cfg.tensor_parallel > 1) every rank loads its shard of the
target (server/tensor_parallel.py); rank 0 runs this server and the other ranks follow its batches.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from draftfeed.client.channel import MAX_METADATA_BYTES
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.layers import validate_eagle3_layer_ids
from draftfeed.client.tokenizer import tokenizer_message
from draftfeed.client.wire import SERVICE_NAME, add_to_server, grpc_options
from draftfeed.target.capture import discover
from draftfeed.target.fingerprint import fingerprint

from .admission import Admission
from .auth import AccessControl, load_token_file
from .call_slots import CallSlots, reserve_for
from .config import ServeConfig
from .dataplane import DataPlaneServer, data_ssl_context
from .graphs import GraphedForward
from .leases import SessionLeases
from .listening import GRPC_EXCLUSIVE_PORT, port_taken
from .metrics import ServerMetrics
from .model_info import build_model_info
from .scheduler import BatchScheduler
from .service import TargetServicer, lenient_deserializer
from .sessions import SessionTable

__all__ = ["TargetServer", "serve", "server_credentials"]

log = logging.getLogger("draftfeed.server")


def server_credentials(cfg: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext); with a client CA, mutual TLS."""
    if not cfg.tls:
        return None
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _http_tls(uvicorn_config, cfg: ServeConfig) -> None:
    """The same certificate (and client CA) on the HTTP ports (admin, NeMo). uvicorn builds its SSL
    context from these attributes when the server starts."""
    if not cfg.tls:
        return
    uvicorn_config.ssl_certfile = cfg.tls_cert
    uvicorn_config.ssl_keyfile = cfg.tls_key
    if cfg.tls_client_ca:
        uvicorn_config.ssl_ca_certs = cfg.tls_client_ca
        uvicorn_config.ssl_cert_reqs = ssl.CERT_REQUIRED


def _default_layer_ids(cfg: ServeConfig, num_layers: int) -> dict[str, list[int]]:
    """The operator's default layer ids per algorithm (`--aux-layer-ids`), checked against the target."""
    if not cfg.aux_layer_ids:
        return {}
    try:
        return {"eagle3": validate_eagle3_layer_ids(cfg.aux_layer_ids, num_layers)}
    except InvalidArgument as err:
        raise InvalidArgument(f"--aux-layer-ids {','.join(map(str, cfg.aux_layer_ids))}: {err}") from None


def _tokenizer_of(cfg: ServeConfig):
    """The tokenizer saved with the target at `cfg.model` (the built-in default's when None), or None with a
    warning when that directory holds none: the server then answers GetTokenizer with FAILED_PRECONDITION."""
    from draftfeed.target.loading import load_tokenizer

    try:
        return load_tokenizer(cfg.model)
    except InvalidArgument as err:
        log.warning("serving no tokenizer (remote trainers need --target-model): %s", err)
        return None


class TargetServer:
    """Build with a config (and optionally an already loaded model), then `start()` / `stop()`.

    tp: a `TensorParallel` group when the model is sharded (rank 0 only): the scheduler's forward
    and weight gathers then go through it, and `stop()` releases the other ranks.
    tokenizer: the target's tokenizer, served by GetTokenizer. A server that loads the target from
    `cfg.model` itself (no `model` given, or `tp`) loads the tokenizer from there too.
    """

    def __init__(self, cfg: ServeConfig, model: torch.nn.Module | None = None, tp=None, tokenizer=None):
        self.cfg = cfg
        from_cfg = model is None or tp is not None  # the target came from cfg.model: so does its tokenizer
        if model is None:
            from draftfeed.target.loading import load_target

            model = load_target(cfg.model, dtype=cfg.dtype, device=cfg.resolved_device())
        if tokenizer is None and from_cfg:
            tokenizer = _tokenizer_of(cfg)
        self.model = model
        self.tp = tp
        self.layout = discover(model)
        self.metrics = ServerMetrics()
        device = next(model.parameters()).device
        self.sessions = SessionTable(
            self.layout.num_layers,
            self.layout.vocab_size,
            device,
            _default_layer_ids(cfg, self.layout.num_layers),
        )
        self.graphs = None  # a GraphedForward when the forward replays CUDA graphs
        if tp is not None:
            extra = {"forward": tp.forward}
        elif cfg.cuda_graphs and device.type == "cuda":
            self.graphs = GraphedForward()
            extra = {"forward": self.graphs}
        else:
            extra = {}
        self.scheduler = BatchScheduler(
            model,
            self.layout,
            max_forward_tokens=cfg.max_forward_tokens,
            max_queue=cfg.max_queue,
            max_queued_per_session=cfg.max_queued_per_session,
            metrics=self.metrics,
            **extra,
        )
        fp = tp.fingerprint if tp is not None else fingerprint(model)
        self.info = build_model_info(model, self.layout, cfg, fp)
        jobs = load_token_file(cfg.token_file) if cfg.token_file else None
        self.access = AccessControl(jobs, allow_remote=cfg.insecure_allow_remote)
        self.dataplane = None
        if cfg.data_port is not None:
            ctx = data_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls else None
            self.dataplane = DataPlaneServer(cfg.host, cfg.data_port, ctx, self.access)
        # the one admission path of both front-ends (gRPC here, the NeMo HTTP port)
        self.admission = Admission(self.scheduler, self.access, cfg.limits, self.layout.vocab_size)
        self.servicer = TargetServicer(
            model,
            self.info,
            self.sessions,
            self.admission,
            cfg.max_chunk_bytes,
            access=self.access,
            gather=tp.gather if tp is not None else None,
            dataplane=self.dataplane,
            tokenizer=tokenizer_message(tokenizer) if tokenizer is not None else None,
            slots=CallSlots(cfg.grpc_workers - reserve_for(cfg.grpc_workers), cfg.max_streams_per_job),
        )
        options = grpc_options() + [
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
            ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            GRPC_EXCLUSIVE_PORT,
        ]
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=cfg.grpc_workers), options=options)
        add_to_server(self.servicer, self.grpc, deserializer=lenient_deserializer)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{cfg.host}:{cfg.port}"
        creds = server_credentials(cfg)
        try:
            self.port = (
                self.grpc.add_secure_port(address, creds) if creds else self.grpc.add_insecure_port(address)
            )
        except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
            self.port = 0
        if self.port == 0:
            if self.dataplane is not None:
                self.dataplane.close()
            raise port_taken("--port", cfg.host, cfg.port, "address in use or not local")
        self.admin = None
        self.nemo_http = None
        self.leases = SessionLeases(self, cfg.session_ttl_s) if cfg.session_ttl_s > 0 else None
        self._stopped = threading.Event()
        self._stopping = threading.Lock()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "[::]") else self.cfg.host
        return f"{'grpcs' if self.cfg.tls else 'grpc'}://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return not self.servicer.draining and not self._stopped.is_set()

    @property
    def saturated(self) -> bool:
        """Every Generate/GenerateStream slot is taken: new data calls are refused (/readyz: 503)."""
        return self.servicer.slots.saturated

    def start(self) -> TargetServer:
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.leases is not None:
            self.leases.start()
        try:
            if self.cfg.admin_port is not None:
                self._start_admin()
            if self.cfg.nemo_http_port is not None:
                from .nemo_http import NemoHTTPServer

                nemo = NemoHTTPServer(
                    self, self.cfg.host, self.cfg.nemo_http_port, grace_s=self.cfg.grace_seconds
                )
                _http_tls(nemo.config, self.cfg)
                self.nemo_http = nemo.start()
        except BaseException:  # a port taken: give back what was started, then report it
            self.stop(grace=0)
            raise
        log.info(
            "serving %s (%d layers, hidden %d, vocab %d, %s) on %s%s; %s",
            self.info.architectures[0],
            self.info.num_hidden_layers,
            self.info.hidden_size,
            self.info.vocab_size,
            self.info.dtype,
            self.url,
            f" (tensor parallel x{self.tp.world_size})" if self.tp is not None else "",
            self.access.describe,
        )
        return self

    def _start_admin(self) -> None:
        from .admin import AdminServer

        admin = AdminServer(self, self.cfg.host, self.cfg.admin_port)
        _http_tls(admin.config, self.cfg)
        self.admin = admin.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop admitting work, finish what is in flight (all within `grace` seconds), then close.

        Steps, in order: refuse new work (health NOT_SERVING, /readyz false, UNAVAILABLE), answer the
        queued requests, let the reply streams finish, close the data-plane sockets and the sessions,
        release tensor-parallel followers, stop the admin port.
        """
        with self._stopping:
            if self._stopped.is_set():
                return
            grace = self.cfg.grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            self.servicer.drain()
            self.health.enter_graceful_shutdown()
            if self.leases is not None:
                self.leases.stop()
            self.scheduler.stop(drain=True, timeout=grace)
            if self.nemo_http is not None:
                self.nemo_http.stop()
            self.grpc.stop(max(0.0, deadline - time.monotonic())).wait()
            if self.dataplane is not None:
                self.dataplane.close()
            self.sessions.close_all()
            if self.tp is not None:
                self.tp.release()
            if self.admin is not None:
                self.admin.stop()
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def _banner(server: TargetServer) -> str:
    admin = ""
    if server.admin is not None:
        admin = f", admin on {server.admin.url}"
    tls = " (mutual TLS)" if server.cfg.tls_client_ca else (" (TLS)" if server.cfg.tls else "")
    nemo = f", NeMo HTTP on {server.nemo_http.url}" if server.nemo_http is not None else ""
    data = f", data plane on port {server.dataplane.port}" if server.dataplane is not None else ""
    return f"draftfeed: serving on {server.url}{tls}{admin}{nemo}{data}; {server.access.describe}"


def serve(cfg: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT: the first drains gracefully (exit 0), a second exits at once (1)."""
    tp = model = None
    if cfg.tensor_parallel > 1:
        from .tensor_parallel import TensorParallel

        tp, model = TensorParallel.load(cfg)
        if tp.rank != 0:
            return tp.follow(model)
    server = TargetServer(cfg, model=model, tp=tp).start()
    signals = {"n": 0}

    def on_signal(signum, _frame):
        signals["n"] += 1
        if signals["n"] > 1:
            print("draftfeed: second signal: exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        print(
            f"draftfeed: signal {signum}: draining (up to {cfg.grace_seconds:g} s; signal again to exit now)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=server.stop, name="draftfeed-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(_banner(server), flush=True)  # after the handlers: a signal sent once this line is out drains
    while not server.wait(0.5):  # wake up regularly so signal handlers run promptly
        pass
    print("draftfeed: drained and stopped", file=sys.stderr, flush=True)
    return 0
