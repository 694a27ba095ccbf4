"""The status page's data: a sampled history of each session's counters and the `/status.json` builder.

`StatusHistory` samples every session's cumulative counters (and the server's) once a second into
ring buffers, so rates over time (tokens/s now, over the last minute, over five minutes, and the
per-second series the page plots) are differences between samples. `status_json` builds the one
JSON document the page polls and the tests read. Every field in it is named here: a session's
attributes are never dumped wholesale, so a credential stored on a session can never leak.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources

import torch

__all__ = ["StatusHistory", "status_json", "status_page", "status_page_csp", "memory_in_use", "rate"]

NOW_S = 5.0  # "tokens/s now" is the rate over the last NOW_S seconds
WINDOWS_S = (60.0, 300.0)  # the "over the last minutes" rates
SERIES_S = 300.0  # how far back the plotted series go


@dataclass(frozen=True)
class Sample:
    """Cumulative counters at one instant (a session's, or the whole server's)."""

    t: float
    tokens: int = 0
    bytes_sent: int = 0
    requests: int = 0
    queue_wait_s: float = 0.0
    busy_s: float = 0.0
    forwards: int = 0
    forward_s: float = 0.0


def _session_sample(session, t: float) -> Sample:
    st = session.stats
    return Sample(t, st.tokens, st.bytes_sent, st.requests, st.queue_wait_s)


def _server_sample(metrics, t: float) -> Sample:
    m = metrics
    bytes_sent = sum(m.bytes_by_encoding.values())
    return Sample(t, m.tokens, bytes_sent, m.requests, m.queue_wait_s, m.busy_s, m.forwards, m.forward_s)


def rate(samples, last: Sample, window: float, field: str = "tokens") -> float:
    """`field` per second between `last` and the newest sample at least `window` seconds older
    (or the oldest sample, when the history is shorter than the window)."""
    base = None
    for s in samples:
        if s.t <= last.t - window:
            base = s
        else:
            if base is None:
                base = s
            break
    if base is None or last.t - base.t <= 1e-9:
        return 0.0
    return (getattr(last, field) - getattr(base, field)) / (last.t - base.t)


def ratio(samples, last: Sample, window: float, num: str, den: str) -> float:
    """Δnum / Δden over the window (e.g. bytes per token, queue wait per request); 0 when Δden is 0."""
    d_den = rate(samples, last, window, den)
    return rate(samples, last, window, num) / d_den if d_den else 0.0


def series(
    samples, last: Sample, span: float, field: str = "tokens", min_step: float = 0.5
) -> list[list[float]]:
    """[[seconds before `last`, field per second over the step], ...] for the last `span` seconds.

    The live step from the newest sample to `last` is left out while shorter than `min_step`
    seconds (a rate over a few milliseconds is noise)."""
    pts = [s for s in samples if s.t >= last.t - span - 1e-9 and s.t < last.t]
    if not pts or last.t - pts[-1].t >= min_step:
        pts.append(last)
    out = []
    for a, b in zip(pts, pts[1:], strict=False):
        dt = b.t - a.t
        if dt > 1e-6:
            out.append([round(b.t - last.t, 3), (getattr(b, field) - getattr(a, field)) / dt])
    return out


class StatusHistory:
    """Ring buffers of samples: one per live session, one for the server; sampled every `interval` s."""

    def __init__(self, server, interval: float = 1.0, keep_s: float = 600.0):
        self.server = server
        self.interval = interval
        self.maxlen = int(keep_s / interval) + 2
        self.sessions: dict[str, deque[Sample]] = {}
        self.overall: deque[Sample] = deque(maxlen=self.maxlen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        live = self.server.sessions.list()
        with self._lock:
            if not self.overall:
                self.overall.append(Sample(self.server.metrics.started))
            self.overall.append(_server_sample(self.server.metrics, now))
            for s in live:
                buf = self.sessions.get(s.id)
                if buf is None:  # a session starts from zero at its creation
                    buf = self.sessions[s.id] = deque([Sample(s.created)], maxlen=self.maxlen)
                buf.append(_session_sample(s, now))
            for sid in set(self.sessions) - {s.id for s in live}:
                del self.sessions[sid]

    def session_samples(self, session) -> list[Sample]:
        with self._lock:
            buf = self.sessions.get(session.id)
            return list(buf) if buf is not None else [Sample(session.created)]

    def overall_samples(self) -> list[Sample]:
        with self._lock:
            return list(self.overall) or [Sample(self.server.metrics.started)]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a status sampler must never take the server down
                time.sleep(self.interval)

    def start(self) -> StatusHistory:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="draftfeed-status-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.interval + 1)


def memory_in_use(device: torch.device) -> dict:
    """Device memory in use on a GPU (torch's allocator), else this process's resident set size."""
    if device.type == "cuda":
        return {
            "kind": "cuda_allocated",
            "device": str(device),
            "bytes": torch.cuda.memory_allocated(device),
            "peak_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
            "total_bytes": torch.cuda.get_device_properties(device).total_memory,
        }
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
    except OSError:  # not Linux: the peak is what the OS tells us
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError):
        total = 0
    return {"kind": "process_rss", "device": str(device), "bytes": rss, "total_bytes": total}


def _rates(samples, last: Sample) -> dict:
    return {
        "tokens_per_s_now": rate(samples, last, NOW_S),
        **{f"tokens_per_s_{int(w // 60)}m": rate(samples, last, w) for w in WINDOWS_S},
    }


def nemo_session_ids(server) -> set[str]:
    """The sessions of the NeMo HTTP port's clients (none when that port is off)."""
    nemo = getattr(server, "nemo_http", None)
    clients = getattr(getattr(nemo, "clients", None), "_clients", None) or {}
    return {c.session.id for c in list(clients.values())}


def transport(server, session, nemo_ids: set[str]) -> str:
    """How the session's replies travel: `data plane` (its TCP socket is bound), `gRPC frames`, or
    `NeMo HTTP` (a client of the NeMo port)."""
    if session.id in nemo_ids:
        return "NeMo HTTP"
    plane = getattr(server, "dataplane", None)
    return "data plane" if plane is not None and plane.connected(session.id) else "gRPC frames"


def _session_json(session, samples: list[Sample], now: float, how: str = "gRPC frames") -> dict:
    st = session.stats
    last = _session_sample(session, now)
    loss = getattr(st, "trainer_loss", None)
    return {
        "session": session.id[:8],
        "job_name": session.job_name,
        "algorithm": session.algorithm,
        "layer_ids": [int(i) for i in session.layer_ids],
        "encodings": {str(k): str(v) for k, v in session.encodings.items()},
        "transport": how,
        "trainer_step": int(getattr(st, "trainer_step", 0)),
        "trainer_loss": float(loss) if loss is not None and math.isfinite(loss) else None,
        "weight": float(session.weight),
        "requests": st.requests,
        "tokens": st.tokens,
        "bytes_sent": st.bytes_sent,
        "bytes_per_token": st.bytes_sent / st.tokens if st.tokens else 0.0,
        "bytes_per_token_1m": ratio(samples, last, 60.0, "bytes_sent", "tokens"),
        "queue_wait_ms": 1e3 * st.queue_wait_s / st.requests if st.requests else 0.0,
        "queue_wait_ms_1m": 1e3 * ratio(samples, last, 60.0, "queue_wait_s", "requests"),
        "in_flight": st.in_flight,
        "created": session.created,
        "last_seen": session.last_seen,
        "idle_s": max(0.0, now - session.last_seen),
        **_rates(samples, last),
        "series": series(samples, last, SERIES_S),
    }


def status_json(server, history: StatusHistory, now: float | None = None) -> dict:
    """The document behind the status page (and its tests). Only the fields named here go out."""
    now = time.time() if now is None else now
    m, info, cfg = server.metrics, server.info, server.cfg
    overall = history.overall_samples()
    last = _server_sample(m, now)
    forwards_1m = rate(overall, last, 60.0, "forwards")
    sessions = sorted(server.sessions.list(), key=lambda s: (s.job_name, s.created))
    nemo_ids = nemo_session_ids(server)
    return {
        "time": now,
        "interval_s": history.interval,
        "server": {
            "version": info.server_version,
            "started": m.started,
            "uptime_s": now - m.started,
            "ready": bool(server.ready),
            "draining": bool(server.servicer.draining),
        },
        "model": {
            "architectures": list(info.architectures),
            "fingerprint": info.fingerprint,
            "dtype": info.dtype,
            "num_hidden_layers": info.num_hidden_layers,
            "hidden_size": info.hidden_size,
            "vocab_size": info.vocab_size,
        },
        "limits": {
            "max_batch_size": cfg.limits.max_batch_size,
            "max_seq_len": cfg.limits.max_seq_len,
            "max_request_tokens": cfg.limits.max_request_tokens,
            "max_forward_tokens": cfg.max_forward_tokens,
            "max_queue": cfg.max_queue,
            "max_queued_per_session": cfg.max_queued_per_session,
            "max_chunk_bytes": cfg.max_chunk_bytes,
        },
        "load": {
            "busy_fraction": m.busy_fraction,
            "busy_fraction_1m": rate(overall, last, 60.0, "busy_s"),
            "batch_fill_1m": m.window(60.0)["batch_fill"],
            "forward_ms_mean": 1e3 * m.forward_s / m.forwards if m.forwards else 0.0,
            "forward_ms_1m": 1e3 * rate(overall, last, 60.0, "forward_s") / forwards_1m
            if forwards_1m
            else 0.0,
            "forwards": m.forwards,
            "queue_depth": m.queue_depth,
            "requests": m.requests,
            "requests_failed": m.requests_failed,
            "tokens": m.tokens,
            "oom_splits": m.oom_splits,
            **_rates(overall, last),
            "series": series(overall, last, SERIES_S),
            "busy_series": series(overall, last, SERIES_S, "busy_s"),
        },
        "memory": memory_in_use(server.scheduler.device),
        "sessions": [
            _session_json(s, history.session_samples(s), now, transport(server, s, nemo_ids))
            for s in sessions
        ],
    }


def status_page() -> str:
    """The page's HTML (one file, its CSS and JS inline, no external assets)."""
    return resources.files("draftfeed.server").joinpath("static", "status.html").read_text("utf-8")


def status_page_csp(html: str) -> str:
    """A Content-Security-Policy that lets only the page's own inline script and style run, and
    lets it fetch only from its own origin."""

    def hashes(tag):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() + "'"
            for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
