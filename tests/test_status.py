"""The status page: its rate math, `/status.json` against a real server with two live jobs, and the
page itself in a real headless Chromium (skipped when chromium, chromedriver or selenium is missing)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests
import torch
from test_backends import B, S, inputs, mapping

from draftfeed.client.remote import RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.server.status import Sample, rate, ratio, series, status_page, status_page_csp
from draftfeed.target.checks import Limits

EAGLE_JOB = "eagle <b>job</b> & co"  # markup in a job name must show as text, never as HTML
DSPARK_JOB = "dspark-job"
SECRET = "s3cr3t-auth-token-must-not-leak"

SESSION_KEYS = {
    "session", "job_name", "algorithm", "layer_ids", "encodings", "weight", "requests", "tokens",
    "bytes_sent", "bytes_per_token", "bytes_per_token_1m", "queue_wait_ms", "queue_wait_ms_1m",
    "in_flight", "created", "last_seen", "idle_s", "tokens_per_s_now", "tokens_per_s_1m",
    "tokens_per_s_5m", "series", "transport", "trainer_step", "trainer_loss",
}  # fmt: skip


# -- rate math on synthetic samples -------------------------------------------------------------


def _samples(points):
    return [Sample(t, tokens=n, bytes_sent=10 * n, requests=r, queue_wait_s=0.5 * r) for t, n, r in points]


def test_rate_uses_the_newest_sample_before_the_window():
    samples = _samples([(0, 0, 0), (10, 100, 1), (20, 300, 2), (30, 300, 2)])
    last = Sample(40, tokens=700, bytes_sent=7000, requests=4, queue_wait_s=2.0)
    assert rate(samples, last, 5) == pytest.approx((700 - 300) / 10)  # base t=30
    assert rate(samples, last, 15) == pytest.approx((700 - 300) / 20)  # base t=20
    assert rate(samples, last, 60) == pytest.approx(700 / 40)  # shorter history: from the oldest
    assert rate([], last, 5) == 0.0
    assert rate([last], last, 5) == 0.0
    assert ratio(samples, last, 15, "bytes_sent", "tokens") == pytest.approx(10.0)
    assert ratio(samples, last, 15, "queue_wait_s", "requests") == pytest.approx(0.5)
    assert ratio(samples[-1:], Sample(31, tokens=300), 5, "bytes_sent", "tokens") == 0.0


def test_series_is_per_step_rates_ending_now():
    samples = _samples([(0, 0, 0), (1, 10, 1), (2, 30, 2), (3, 30, 2)])
    last = Sample(4, tokens=70)
    assert series(samples, last, 300) == [[-3, 10.0], [-2, 20.0], [-1, 0.0], [0, 40.0]]
    assert series(samples, last, 2) == [[-1, 0.0], [0, 40.0]]
    # a live step shorter than min_step is left out
    assert series(samples, Sample(3.1, tokens=99), 300) == [[-2.1, 10.0], [-1.1, 20.0], [-0.1, 0.0]]


# -- /status.json against a real server with two live jobs -------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model):
    cfg = ServeConfig(
        port=0,
        admin_port=0,
        max_queue=64,
        limits=Limits(max_batch_size=8, max_seq_len=64, max_request_tokens=256),
    )
    srv = TargetServer(cfg, model=tiny_model("llama")).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def jobs(server):
    eagle = RemoteEagle3TargetModel.from_urls(
        [server.url], job_name=EAGLE_JOB, encodings={"hidden": "bf16", "probs": "topk:8"}
    )
    eagle.set_vocab_mapping(*mapping(160))
    dspark = RemoteDSparkTargetModel.from_urls([server.url], job_name=DSPARK_JOB, target_layer_ids=[0, 3, 5])
    for s in server.sessions.list():  # what per-job auth may store on a session one day
        s.auth_token = SECRET
        s.token = SECRET
    yield eagle, dspark
    eagle.close()
    dspark.close()


def base(server) -> str:
    return f"http://127.0.0.1:{server.admin.port}"


def get_status(server) -> dict:
    r = requests.get(f"{base(server)}/status.json", timeout=10)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    return r.json()


def by_job(doc) -> dict[str, dict]:
    return {s["job_name"]: s for s in doc["sessions"]}


def test_status_json_with_two_live_jobs(server, jobs):
    eagle, dspark = jobs
    for i in range(3):
        eagle.generate_batch(*inputs(seed=i))
    for i in range(2):
        dspark.generate_batch(*inputs(seed=i))
    answered = time.time()  # wait for the sampler's first sample after the last reply (about 1 s)
    history = server.admin.history
    deadline = time.monotonic() + 300  # only bounds a hang
    while history.overall_samples()[-1].t <= answered:
        assert time.monotonic() < deadline, "the status sampler took no sample"
        time.sleep(0.05)
    raw = requests.get(f"{base(server)}/status.json", timeout=10).text
    doc = json.loads(raw)

    assert doc["model"]["fingerprint"] == server.info.fingerprint
    assert doc["model"]["architectures"] == ["LlamaForCausalLM"]
    assert (doc["model"]["num_hidden_layers"], doc["model"]["vocab_size"]) == (8, 160)
    assert doc["limits"] == {
        "max_batch_size": 8,
        "max_seq_len": 64,
        "max_request_tokens": 256,
        "max_forward_tokens": server.cfg.max_forward_tokens,
        "max_queue": 64,
        "max_queued_per_session": server.cfg.max_queued_per_session,
        "max_chunk_bytes": server.cfg.max_chunk_bytes,
    }
    assert doc["server"]["ready"] and not doc["server"]["draining"]
    assert 0 < doc["server"]["uptime_s"] < 600
    assert doc["memory"]["kind"] == "process_rss" and doc["memory"]["bytes"] > 10 << 20

    load = doc["load"]
    assert load["requests"] == 5 and load["tokens"] == 5 * B * S and load["requests_failed"] == 0
    assert load["forwards"] >= 3 and load["forward_ms_mean"] > 0 and load["forward_ms_1m"] > 0
    assert 0 < load["busy_fraction"] <= 1 and 0 < load["busy_fraction_1m"] <= 1
    assert 0 < load["batch_fill_1m"] <= 1
    assert load["tokens_per_s_1m"] > 0 and load["series"]

    jobs_ = by_job(doc)
    assert set(jobs_) == {EAGLE_JOB, DSPARK_JOB}
    listed = {
        s["job_name"]: s for s in requests.get(f"{base(server)}/sessions", timeout=10).json()["sessions"]
    }
    for name, n, algo in ((EAGLE_JOB, 3, "eagle3"), (DSPARK_JOB, 2, "dspark")):
        s = jobs_[name]
        assert set(s) == SESSION_KEYS  # a whitelist: nothing else about a session goes out
        assert s["algorithm"] == algo
        assert s["requests"] == n and s["tokens"] == n * B * S and s["in_flight"] == 0
        assert s["bytes_sent"] == listed[name]["bytes_sent"] > 0
        assert s["bytes_per_token"] == pytest.approx(s["bytes_sent"] / s["tokens"])
        assert s["bytes_per_token_1m"] == pytest.approx(s["bytes_per_token"])
        assert s["queue_wait_ms"] >= 0 and 0 <= s["idle_s"] < 60
        # younger than a minute: the 1-minute rate is every token since the session opened
        age = doc["time"] - s["created"]
        assert s["tokens_per_s_1m"] == pytest.approx(s["tokens"] / age, rel=1e-6)
        assert s["tokens_per_s_5m"] == pytest.approx(s["tokens_per_s_1m"])
        # the plotted per-second rates integrate back to the tokens served
        t_prev, served = s["created"] - doc["time"], 0.0
        for t, r in s["series"]:
            served += r * (t - t_prev)
            t_prev = t
        assert served == pytest.approx(s["tokens"], rel=1e-3)
    assert jobs_[EAGLE_JOB]["layer_ids"] == eagle.aux_layer_ids
    assert jobs_[DSPARK_JOB]["layer_ids"] == [0, 3, 5] == dspark.target_layer_ids
    opened = {sess.job_name: sess for sess in server.sessions.list()}
    assert jobs_[EAGLE_JOB]["encodings"] == opened[EAGLE_JOB].encodings
    assert jobs_[EAGLE_JOB]["encodings"]["hidden"] == "bf16"
    assert jobs_[EAGLE_JOB]["encodings"]["probs"] == "topk:8"
    assert set(jobs_[DSPARK_JOB]["encodings"].values()) == {"raw"}
    # bf16 hidden + top-k probs cost fewer bytes per token than raw float32 hidden and probs
    assert jobs_[EAGLE_JOB]["bytes_per_token"] < jobs_[DSPARK_JOB]["bytes_per_token"]

    assert SECRET not in raw
    for sess in server.sessions.list():  # only an 8-character prefix of a session id is shown
        assert sess.id not in raw and sess.id[:8] in raw


def test_rates_move_after_more_requests(server, jobs):
    eagle, _ = jobs
    before = by_job(get_status(server))[EAGLE_JOB]
    for i in range(4):
        eagle.generate_batch(*inputs(seed=10 + i))
    after = by_job(get_status(server))[EAGLE_JOB]
    assert after["tokens"] == before["tokens"] + 4 * B * S
    assert after["requests"] == before["requests"] + 4
    assert after["tokens_per_s_now"] > 0
    assert after["last_seen"] > before["last_seen"]


def test_transport_and_the_trainers_step_and_loss(server, jobs):
    """Each job's transport, and the step and loss its trainer reports with its requests."""
    eagle, _ = jobs
    assert by_job(get_status(server))[EAGLE_JOB]["transport"] == "data plane"
    eagle.report_progress(7, 1.25)
    eagle.generate_batch(*inputs(seed=20))
    row = by_job(get_status(server))[EAGLE_JOB]
    assert row["trainer_step"] == 7 and row["trainer_loss"] == 1.25
    eagle.report_progress(8, float("nan"))  # a non-finite loss is not reported
    eagle.generate_batch(*inputs(seed=21))
    row = by_job(get_status(server))[EAGLE_JOB]
    assert row["trainer_step"] == 8 and row["trainer_loss"] is None
    listed = requests.get(f"{base(server)}/sessions", timeout=10).json()["sessions"]
    assert {s["job_name"]: s["trainer_step"] for s in listed}[EAGLE_JOB] == 8
    with RemoteDSparkTargetModel.from_urls([server.url], job_name="frames", data_plane=False) as frames:
        frames.generate_batch(*inputs())
        row = by_job(get_status(server))["frames"]
        assert row["transport"] == "gRPC frames" and row["trainer_step"] == 0 and row["trainer_loss"] is None


def test_closed_sessions_leave_the_page(server):
    job = RemoteDSparkTargetModel.from_urls([server.url], job_name="short-lived")
    job.generate_batch(*inputs())
    assert "short-lived" in by_job(get_status(server))
    job.close()
    assert "short-lived" not in by_job(get_status(server))


def test_the_page_is_self_contained(server):
    page = status_page()
    for path in ("/", "/status"):
        r = requests.get(base(server) + path, timeout=10)
        assert r.status_code == 200 and r.text == page
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert csp == status_page_csp(page)
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    # no external assets: no links, no src attributes, no URLs except the SVG namespace name
    assert not re.search(r"<link|\bsrc=|@import|url\(", page)
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    assert "status.json" in page and "innerHTML" not in page


# -- the page in a real headless browser --------------------------------------------------------


def _chrome_or_skip(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1440,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def _wait(browser, predicate, what: str, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate(browser)
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"the status page did not show {what} within {timeout:.0f} s")


def _rows(browser) -> dict[str, dict]:
    """job name -> what the row shows, read from the DOM."""
    return browser.execute_script(
        """
        const out = {};
        for (const tr of document.querySelectorAll("#session-rows tr.session")) {
          const svg = tr.querySelector("svg.spark"), line = svg.querySelector("polyline.line");
          out[tr.children[0].textContent] = {
            algorithm: tr.children[1].textContent, layers: tr.children[2].textContent,
            encodings: tr.children[3].textContent, tokens: tr.children[8].textContent,
            bpt: tr.children[9].textContent, plotted: Number(svg.dataset.points || 0),
            transport: tr.children[13].textContent, trainer: tr.children[14].textContent,
            line: line ? line.getAttribute("points") : "", html: tr.children[0].innerHTML,
          };
        }
        return out;
        """
    )


def render_page(server, jobs, tmp_path, screenshot: Path):
    """Open the page, check rows and plots appear and then update; returns the browser's console log."""
    eagle, dspark = jobs
    browser = _chrome_or_skip(tmp_path)
    try:
        browser.get(f"{base(server)}/status")
        rows = _wait(
            browser, lambda b: (r := _rows(b)) and set(r) >= {EAGLE_JOB, DSPARK_JOB} and r, "both jobs"
        )
        assert rows[EAGLE_JOB]["algorithm"] == "eagle3" and rows[DSPARK_JOB]["algorithm"] == "dspark"
        assert rows[DSPARK_JOB]["layers"] == "0, 3, 5"
        assert rows[DSPARK_JOB]["transport"] == "data plane"
        assert (
            "hidden: bf16" in rows[EAGLE_JOB]["encodings"] and "probs: topk:8" in rows[EAGLE_JOB]["encodings"]
        )
        assert "&lt;b&gt;" in rows[EAGLE_JOB]["html"]  # the job name's markup is text
        fp = browser.find_element("id", "model-fingerprint").text
        assert fp == server.info.fingerprint
        status = get_status(server)
        for name in (EAGLE_JOB, DSPARK_JOB):
            tokens = by_job(status)[name]["tokens"]
            _wait(browser, lambda b, n=name, t=tokens: _rows(b)[n]["tokens"] == f"{t:,}", f"{name}'s tokens")
        first = _rows(browser)
        for i in range(3):  # more work on both jobs: the rows and their plots must follow
            eagle.generate_batch(*inputs(seed=20 + i))
            dspark.generate_batch(*inputs(seed=20 + i))
            time.sleep(0.4)
        want = {n: s["tokens"] for n, s in by_job(get_status(server)).items()}
        assert want[EAGLE_JOB] == by_job(status)[EAGLE_JOB]["tokens"] + 3 * B * S
        for name in (EAGLE_JOB, DSPARK_JOB):
            _wait(browser, lambda b, n=name: _rows(b)[n]["tokens"] == f"{want[n]:,}", f"{name}'s new total")
            _wait(
                browser,
                lambda b, n=name: (
                    _rows(b)[n]["plotted"] > first[n]["plotted"] and _rows(b)[n]["line"] != first[n]["line"]
                ),
                f"{name}'s plot moving",
            )
        rows = _rows(browser)
        for name in (EAGLE_JOB, DSPARK_JOB):
            ys = [float(p.split(",")[1]) for p in rows[name]["line"].split()]
            assert min(ys) < 38 - 1, f"{name}'s plot shows no tokens: {rows[name]['line']}"
            assert rows[name]["bpt"].endswith("B")
        assert browser.find_element("id", "state").text == "ready"
        _wait(
            browser,
            lambda b: float(b.execute_script("return document.body.dataset.updates") or 0) >= 3,
            "three page updates",
        )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        return browser.get_log("browser")
    finally:
        browser.quit()


def test_page_in_headless_chromium(server, jobs, tmp_path):
    log = render_page(server, jobs, tmp_path, tmp_path / "status-page.png")
    # a CSP violation (the page's own script or style blocked) or a JS error shows up here
    errors = [e for e in log if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    assert (tmp_path / "status-page.png").stat().st_size > 10_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_is_the_gpu_allocators_on_cuda(tiny_model):
    model = copy.deepcopy(tiny_model("llama")).to("cuda")
    srv = TargetServer(ServeConfig(port=0, admin_port=0), model=model).start()
    try:
        with RemoteDSparkTargetModel.from_urls([srv.url], job_name="gpu-job") as job:
            job.generate_batch(*inputs())
            doc = get_status(srv)
        mem = doc["memory"]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert mem["kind"] == "cuda_allocated" and mem["device"].startswith("cuda")
        assert mem["bytes"] >= weights and mem["peak_bytes"] >= mem["bytes"]
        assert mem["reserved_bytes"] >= mem["bytes"] and mem["total_bytes"] > 10 << 30
        assert by_job(doc)["gpu-job"]["tokens"] == B * S
    finally:
        srv.stop(grace=1)
