"""SIGINT / SIGTERM in the trainer (trainer/signals.py, the loop, the CLI): a real `draftfeed train`
process stopped mid-training writes a checkpoint, closes its session, prints how to resume and exits
130 / 143 without a traceback; `--resume auto` continues from that checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from test_loop import data_file, server, target_dir  # noqa: F401 - fixtures

from draftfeed.trainer.config import LoopConfig
from draftfeed.trainer.signals import StopSignals, TrainingInterrupted, exit_code, resume_command


def test_deferred_block_is_not_cut():
    """A signal inside `deferred()` is raised when the block ends, not in the middle of it."""
    done = []
    with pytest.raises(TrainingInterrupted) as info, StopSignals() as stop:
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("after the signal")
        done.append("never")
    assert done == ["after the signal"] and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the previous handler is back


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def run():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]


def test_exit_codes_and_resume_command():
    assert exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGTERM) == 143
    assert resume_command(["train", "eagle3", "--out", "o"]) == "draftfeed train eagle3 --out o --resume auto"
    assert resume_command(["train", "x", "--resume", "ckpt dir"]) == "draftfeed train x --resume auto"


def test_periodic_checkpoints_are_on_by_default():
    assert LoopConfig().save_every > 0


def _train(target, data, out, steps, *extra, export=False):
    cmd = [
        sys.executable, "-m", "draftfeed.server.cli", "train", "eagle3", "--target-model", target,
        "--data", data, "--out", str(out), "--steps", str(steps), "--seq-len", "48", "--batch-size", "2",
        "--device", "cpu", "--export" if export else "--no-export", "--log-every", "1", "--save-every", "0", "--progress", "off",
        "--draft-vocab-size", "64", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_continues(tmp_path, target_dir, data_file, server, sig):  # noqa: F811
    """SIGINT against an in-process target; SIGTERM against a server, whose session of the job is closed
    by the time the process exits, then resumed."""
    out = tmp_path / "run"
    job = f"signal-{sig}"
    remote = ["--target", server.url, "--job-name", job] if sig == signal.SIGTERM else []
    # SIGTERM (a deadline, a scheduler) exports the draft of the last step too
    proc = _train(target_dir, data_file, out, 100_000, *remote, export=sig == signal.SIGTERM)
    lines = []
    try:
        for line in proc.stderr:  # wait for the event: two optimizer steps logged
            lines.append(line)
            if re.search(r"eagle3 step 2/", line):
                break
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(sig)
        rest = proc.stderr.read()  # to the end: the process exits
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = "".join(lines) + rest
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    m = re.search(r"(SIGINT|SIGTERM) at step (\d+); checkpoint: (\S+);", err)
    assert m and m.group(1) == signal.Signals(sig).name, err[-2000:]
    step, ckpt = int(m.group(2)), m.group(3)
    assert step >= 2 and ckpt.endswith(f"step_{step:07d}") and os.path.isfile(os.path.join(ckpt, "complete"))
    assert "session closed. Resume with:" in err and "--resume auto" in err
    if sig != signal.SIGTERM:
        assert "exported" not in err and not (out / "export").exists()  # --no-export is kept
        return
    assert f"draft exported to {out / 'export'}" in err and (out / "export" / "model.safetensors").is_file()
    assert not [x for x in server.sessions.list() if x.job_name == job], "the job's session is still open"
    # resume from it: the run continues at the next step
    proc = _train(target_dir, data_file, out, step + 1, *remote, "--resume", "auto")
    _, err2 = proc.communicate(timeout=180)
    assert proc.returncode == 0, err2[-3000:]
    assert f"resumed from {ckpt} at step {step}/{step + 1}" in err2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step + 1
