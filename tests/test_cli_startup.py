"""The `draftfeed` command's light paths: `health` and `--version` import grpc, not torch or
transformers (a container HEALTHCHECK on a loaded box must answer fast); `regenerate --help` lists only
the flags regenerate reads."""

from __future__ import annotations

import subprocess
import sys

from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig

HEAVY = ("torch", "transformers", "numpy")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_health_imports_only_grpc(tiny_model):
    server = TargetServer(ServeConfig(port=0), model=tiny_model("llama")).start()
    try:
        out = _run(
            "import sys\n"
            "from draftfeed.server.cli import main\n"
            f"rc = main(['--log-level', 'WARNING', 'health', '--target', 'grpc://127.0.0.1:{server.port}'])\n"
            f"print('heavy', [m for m in {HEAVY!r} if m in sys.modules])\n"
            "sys.exit(rc)\n"
        )
    finally:
        server.stop(grace=0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["SERVING", "heavy []"], out.stdout + out.stderr


def test_version_without_torch():
    out = _run(
        "import sys\n"
        "from draftfeed.server.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as e:\n"
        f"    print('heavy', [m for m in {HEAVY!r} if m in sys.modules], e.code)\n"
    )
    first, second = out.stdout.splitlines()
    assert first.startswith("draftfeed ") and first.split()[1][0].isdigit() or first == "draftfeed unknown"
    assert second == "heavy [] 0", out.stdout + out.stderr


def test_algorithm_names_match_the_registry():
    from draftfeed.trainer.algorithms import ALGORITHMS
    from draftfeed.trainer.cli import ALGORITHM_NAMES

    assert tuple(sorted(ALGORITHMS)) == ALGORITHM_NAMES


def test_regenerate_help_lists_only_its_flags():
    from draftfeed.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["regenerate"]
    flags = {o for a in sub._actions for o in a.option_strings}
    used = {
        "--target-model",
        "--target-dtype",
        "--data",
        "--data-limit",
        "--regen-cache",
        "--device",
        "--out",
    }
    assert used <= flags
    unused = {"--target", "--layer-ids", "--job-name", "--seq-len", "--batch-size", "--pack", "--regenerate"}
    assert not flags & unused, flags & unused
    assert "--layer-ids" not in sub.format_help()


def test_ctrl_c_in_any_command_exits_130_without_a_traceback(monkeypatch, capsys):
    import draftfeed.client.channel as channel
    from draftfeed.server.cli import main

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(channel, "check_health", interrupted)
    assert main(["health", "--target", "grpc://127.0.0.1:1"]) == 130
    assert capsys.readouterr().err.strip() == "draftfeed: interrupted"
