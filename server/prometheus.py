"""`/metrics`: the server's counters, per-job series and histograms in the Prometheus text format,
through prometheus_client (one registry per server, so several servers in one process stay apart).

Families: server totals (requests, tokens, bytes by encoding, forwards, queue, busy fraction, CUDA
graphs), per-job series labelled `job` and `algorithm` (never a session id: a job keeps its series across
its sessions, and they go away when its last session is closed or expires), the histograms of
`ServerMetrics` (request latency, queue wait, forward duration), the process (CPU, memory, open files)
and Python platform collectors, and `draftfeed_build_info`.

A job's counters are the sum over its live sessions plus the final values of its sessions that closed
since they were first scraped (a session opened and closed between two scrapes is counted in the server
totals only).
"""

from __future__ import annotations

import platform
import threading
import weakref
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

__all__ = ["ServerCollector", "server_registry", "prometheus_text", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_FIELDS = (
    ("requests", "Requests answered, by job."),
    ("tokens", "Tokens served, by job."),
    ("bytes_sent", "Reply payload bytes sent, by job."),
)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def build_info() -> dict[str, str]:
    return {
        "version": _version("draftfeed"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "grpcio": _version("grpcio"),
    }


class ServerCollector:
    """Reads `server` at each scrape (a prometheus_client custom collector)."""

    def __init__(self, server):
        self.server = server
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[tuple[str, str], object]] = {}  # session id -> ((job, algo), stats)
        self._retired: dict[tuple[str, str], list[float]] = {}  # final values of closed sessions
        self._info = build_info()

    def _job_totals(self, sessions) -> dict[tuple[str, str], list[float]]:
        labels = self.server.metrics.job_labels
        live = {s.id: ((labels.label(s.job_name), s.algorithm), s.stats) for s in sessions}
        with self._lock:
            for sid, (key, stats) in list(self._seen.items()):
                if sid not in live:  # closed or expired: keep its final values while its job lives
                    acc = self._retired.setdefault(key, [0.0] * len(JOB_FIELDS))
                    for i, (name, _) in enumerate(JOB_FIELDS):
                        acc[i] += getattr(stats, name)
                    del self._seen[sid]
            self._seen.update(live)
            live_keys = {key for key, _ in live.values()}
            for key in list(self._retired):
                if key not in live_keys:
                    del self._retired[key]
            totals = {key: list(v) for key, v in self._retired.items()}
        for key, stats in live.values():
            acc = totals.setdefault(key, [0.0] * len(JOB_FIELDS))
            for i, (name, _) in enumerate(JOB_FIELDS):
                acc[i] += getattr(stats, name)
        return totals

    def collect(self):
        server = self.server
        m = server.metrics
        info = InfoMetricFamily("draftfeed_build", "The draftfeed build and its main libraries.")
        info.add_metric([], self._info)
        yield info

        def counter(name, help_, value):
            c = CounterMetricFamily(f"draftfeed_{name}", help_)
            c.add_metric([], value)
            return c

        def gauge(name, help_, value):
            return GaugeMetricFamily(f"draftfeed_{name}", help_, value=value)

        yield counter("requests_total", "Generate requests answered.", m.requests)
        yield counter("requests_failed_total", "Generate requests that failed.", m.requests_failed)
        yield counter("tokens_total", "Tokens served.", m.tokens)
        sent = CounterMetricFamily(
            "draftfeed_bytes_sent_total", "Reply payload bytes by encoding.", labels=["encoding"]
        )
        for enc, n in sorted(m.bytes_by_encoding.items()):
            sent.add_metric([enc], n)
        yield sent
        yield gauge("queue_depth", "Requests waiting for the GPU.", m.queue_depth)
        yield counter("forwards_total", "Target forwards run.", m.forwards)
        yield counter("forward_seconds_total", "Time in target forwards.", m.forward_s)
        yield counter("encode_seconds_total", "Time in per-session post-processing.", m.encode_s)
        yield counter("queue_wait_seconds_total", "Time requests waited in the queue.", m.queue_wait_s)
        yield gauge("gpu_busy_fraction", "Fraction of uptime the worker ran batches.", m.busy_fraction)
        yield gauge(
            "batch_fill", "Mean tokens per forward over the budget (last minute).", m.window()["batch_fill"]
        )
        yield counter("oom_splits_total", "Batches split after out-of-memory.", m.oom_splits)
        yield gauge("uptime_seconds", "Seconds since the server started.", m.uptime_s)
        if server.graphs is not None:
            g = server.graphs
            yield counter(
                "cuda_graph_replays_total", "Target forwards run by replaying a CUDA graph.", g.replays
            )
            yield gauge("cuda_graphs", "Batch shapes captured as CUDA graphs.", g.captures)
            yield counter("cuda_graph_failures_total", "Batch shapes that could not be captured.", g.failed)

        sessions = server.sessions.list()
        yield gauge("sessions", "Open sessions.", len(sessions))
        totals = self._job_totals(sessions)
        m.forget_jobs({s.job_name for s in sessions})
        per_job = GaugeMetricFamily(
            "draftfeed_job_sessions", "Open sessions, by job.", labels=["job", "algorithm"]
        )
        in_flight = GaugeMetricFamily(
            "draftfeed_job_in_flight", "Requests queued or running, by job.", labels=["job", "algorithm"]
        )
        counts: dict[tuple[str, str], list[int]] = {}
        for s in sessions:
            key = (m.job_labels.label(s.job_name), s.algorithm)
            c = counts.setdefault(key, [0, 0])
            c[0] += 1
            c[1] += s.stats.in_flight
        for key, (n, flying) in sorted(counts.items()):
            per_job.add_metric(list(key), n)
            in_flight.add_metric(list(key), flying)
        yield per_job
        yield in_flight
        for i, (name, help_) in enumerate(JOB_FIELDS):
            fam = CounterMetricFamily(f"draftfeed_job_{name}_total", help_, labels=["job", "algorithm"])
            for key, values in sorted(totals.items()):
                fam.add_metric(list(key), values[i])
            yield fam
        yield from m.registry.collect()


_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def server_registry(server) -> CollectorRegistry:
    """The registry `/metrics` of `server` exposes (built once per server)."""
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(server)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(ServerCollector(server))
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
            _REGISTRIES[server] = registry
        return registry


def prometheus_text(server) -> str:
    return generate_latest(server_registry(server)).decode()
