"""`/metrics` through prometheus_client (server/prometheus.py, server/metrics.py): the text parses as
Prometheus exposition; request latency, queue wait and forward duration are histograms; series are
labelled by job (bounded), never by session, and a job's series go away with its last session; process
and build-info metrics are there."""

from __future__ import annotations

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from draftfeed.client.remote import RemoteDFlashTargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.server.metrics import JOB_LABEL_CHARS, OTHER_JOBS, JobLabels, ServerMetrics
from draftfeed.target.checks import Limits


@pytest.fixture(scope="module")
def server(tiny_model):
    cfg = ServeConfig(
        port=0, admin_port=0, limits=Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=256)
    )
    srv = TargetServer(cfg, model=tiny_model("llama")).start()
    yield srv
    srv.stop(grace=1)


def _inputs(b=2, s=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 160, (b, s), generator=g)
    return ids, torch.ones(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long)


def _scrape(server) -> dict:
    text = requests.get(f"http://127.0.0.1:{server.admin.port}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}  # raises on malformed exposition


def _samples(families, family, name=None, **labels):
    return [
        s
        for s in families[family].samples
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_histograms_job_series_and_their_removal(server):
    with RemoteDFlashTargetModel.from_urls([server.url], job_name="prom-job") as remote:
        for _ in range(3):
            remote.generate_batch(*_inputs())
        during = _scrape(server)
        assert during["draftfeed_request_latency_seconds"].type == "histogram"
        count = _samples(
            during,
            "draftfeed_request_latency_seconds",
            "draftfeed_request_latency_seconds_count",
            job="prom-job",
        )
        assert [s.value for s in count] == [3.0]
        wait = _samples(
            during,
            "draftfeed_request_queue_wait_seconds",
            "draftfeed_request_queue_wait_seconds_count",
            job="prom-job",
        )
        assert [s.value for s in wait] == [3.0]
        forwards = _samples(
            during, "draftfeed_forward_duration_seconds", "draftfeed_forward_duration_seconds_count"
        )
        assert forwards[0].value >= 3
        tokens = _samples(during, "draftfeed_job_tokens", job="prom-job", algorithm="dflash")
        assert [s.value for s in tokens] == [72.0]
        assert [s.value for s in _samples(during, "draftfeed_job_sessions", job="prom-job")] == [1.0]
        sid = server.sessions.list()[0].id
        assert all("session" not in s.labels for f in during.values() for s in f.samples)
        assert sid[:8] not in requests.get(f"http://127.0.0.1:{server.admin.port}/metrics", timeout=10).text
        # the process and build-info collectors
        assert during["process_resident_memory_bytes"].samples[0].value > 0
        info = during["draftfeed_build_info"].samples[0].labels
        assert {"version", "python", "torch", "transformers", "grpcio"} <= set(info)
        assert _samples(during, "draftfeed_requests")[0].value >= 3  # the existing totals keep their names
    after = _scrape(server)
    for family in (
        "draftfeed_request_latency_seconds",
        "draftfeed_request_queue_wait_seconds",
        "draftfeed_job_tokens",
        "draftfeed_job_sessions",
    ):
        assert not _samples(after, family, job="prom-job"), family


def test_a_job_keeps_its_counters_across_sessions(server):
    """A job's counter never goes down while the job lives: a closed session's tokens stay in it."""
    first = RemoteDFlashTargetModel.from_urls([server.url], job_name="two-sessions")
    second = RemoteDFlashTargetModel.from_urls([server.url], job_name="two-sessions")
    try:
        first.generate_batch(*_inputs())
        second.generate_batch(*_inputs())
        assert [s.value for s in _samples(_scrape(server), "draftfeed_job_tokens", job="two-sessions")] == [
            48.0
        ]
        first.close()
        assert [s.value for s in _samples(_scrape(server), "draftfeed_job_tokens", job="two-sessions")] == [
            48.0
        ]
    finally:
        first.close()
        second.close()
    assert not _samples(_scrape(server), "draftfeed_job_tokens", job="two-sessions")


def test_job_labels_are_bounded():
    labels = JobLabels(limit=3)
    assert [labels.label(f"j{i}") for i in range(5)] == ["j0", "j1", "j2", OTHER_JOBS, OTHER_JOBS]
    assert labels.label("j1") == "j1"
    assert labels.retain({"j2"}) == ["j0", "j1"]
    assert labels.label("j3") == "j3"
    assert len(labels.label("x" * 10_000)) == JOB_LABEL_CHARS


def test_forgotten_jobs_drop_their_histogram_series():
    m = ServerMetrics()
    for job in ("a", "b"):
        m.record_request(job, 0.01, 0.02, 0.0)
    m.forget_jobs({"b"})
    jobs = {s.labels.get("job") for f in m.registry.collect() for s in f.samples if "job" in s.labels}
    assert jobs == {"b"}
