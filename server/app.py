"""One server process: the target, the session table, the scheduler, gRPC (with health and
reflection) and the admin HTTP app, started and stopped together."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from draftfeed.client.wire import SERVICE_NAME, add_to_server, grpc_options

from .capture import discover
from .config import ServeConfig
from .metrics import ServerMetrics
from .model_info import build_model_info, fingerprint
from .scheduler import BatchScheduler
from .service import TargetServicer
from .sessions import SessionTable

__all__ = ["TargetServer", "serve"]

log = logging.getLogger("draftfeed.server")


class TargetServer:
    """Build with a config (and optionally an already loaded model), then `start()` / `stop()`."""

    def __init__(self, cfg: ServeConfig, model: torch.nn.Module | None = None):
        self.cfg = cfg
        if model is None:
            from .loading import load_target

            model = load_target(cfg.model, dtype=cfg.dtype, device=cfg.resolved_device())
        self.model = model
        self.layout = discover(model)
        self.metrics = ServerMetrics()
        device = next(model.parameters()).device
        self.sessions = SessionTable(self.layout.num_layers, self.layout.vocab_size, device)
        self.scheduler = BatchScheduler(
            model,
            self.layout,
            max_batch_tokens=cfg.max_batch_tokens,
            max_queue=cfg.max_queue,
            max_queued_per_session=cfg.max_queued_per_session,
            metrics=self.metrics,
        )
        self.info = build_model_info(model, self.layout, cfg, fingerprint(model))
        self.servicer = TargetServicer(
            model, self.info, self.sessions, self.scheduler, cfg.limits, cfg.max_chunk_bytes
        )
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=cfg.grpc_workers), options=grpc_options())
        add_to_server(self.servicer, self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port} (address in use or not local)")
        self.admin = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "::", "[::]") else self.cfg.host
        return f"grpc://{host}:{self.port}"

    @property
    def ready(self) -> bool:
        return not self.servicer.draining and not self._stopped.is_set()

    def start(self) -> TargetServer:
        self.grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.admin_port is not None:
            from .admin import AdminServer

            self.admin = AdminServer(self, self.cfg.host, self.cfg.admin_port).start()
        log.info(
            "serving %s (%d layers, hidden %d, vocab %d, %s) on %s",
            self.info.architectures[0],
            self.info.num_hidden_layers,
            self.info.hidden_size,
            self.info.vocab_size,
            self.info.dtype,
            self.url,
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop admitting work, finish what is in flight (up to `grace` seconds), then close."""
        if self._stopped.is_set():
            return
        grace = self.cfg.grace_seconds if grace is None else grace
        self.servicer.draining = True
        self.health.enter_graceful_shutdown()
        self.scheduler.stop(drain=True, timeout=grace)
        self.grpc.stop(grace).wait()
        self.sessions.close_all()
        if self.admin is not None:
            self.admin.stop()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(cfg: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT: the first drains gracefully, a second exits at once."""
    server = TargetServer(cfg).start()
    print(
        f"draftfeed: serving on {server.url}" + (f", admin on :{server.admin.port}" if server.admin else ""),
        flush=True,
    )
    signals = {"n": 0}

    def on_signal(signum, _frame):
        signals["n"] += 1
        if signals["n"] > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        log.info("signal %d: draining (grace %.0f s)", signum, cfg.grace_seconds)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait()
    return 0
