"""SIGINT / SIGTERM in the trainer: stop at a safe point, checkpoint, close, say how to resume.

`StopSignals` turns both signals into `TrainingInterrupted` (a BaseException, like KeyboardInterrupt, so
that no `except Exception` swallows it). Inside `deferred()` (the optimizer step and a checkpoint write,
which must not be cut in half) a signal is only noted and raised when the block ends. Handlers are
installed only on the main thread (signal.signal refuses others: trainers run from threads, as demo-train
and the tests do, keep the default behaviour) and the previous handlers are restored on exit.
"""

from __future__ import annotations

import shlex
import signal
import threading
from contextlib import contextmanager

__all__ = ["TrainingInterrupted", "StopSignals", "exit_code", "resume_command"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(BaseException):
    """The run was stopped by `signum`; `checkpoint` is where its state was saved (None: nothing new),
    `export` where the draft of its last step was exported (None: not exported)."""

    def __init__(self, signum: int, checkpoint=None, step: int | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step
        self.export = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a process stopped by a signal: 128 + N (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def resume_command(argv: list[str]) -> str:
    """The `draftfeed ...` command line of `argv` (sys.argv[1:]) with `--resume auto`."""
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--resume" and i + 1 < len(args):
            args[i + 1] = "auto"
            break
        if a.startswith("--resume="):
            args[i] = "--resume=auto"
            break
    else:
        args += ["--resume", "auto"]
    return shlex.join(["draftfeed", *args])


class StopSignals:
    """Context manager: SIGINT / SIGTERM raise `TrainingInterrupted` (after `deferred()` blocks)."""

    def __init__(self):
        self._previous: dict[int, object] = {}
        self._depth = 0
        self.pending: int | None = None

    def _handle(self, signum, _frame) -> None:
        if self._depth:
            self.pending = self.pending or signum
            return
        raise TrainingInterrupted(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hold(self) -> None:
        """From now on (until exit) signals are only noted: a second Ctrl-C does not cut the final save."""
        self._depth += 1

    @contextmanager
    def deferred(self):
        """A block that a signal does not cut: it is raised when the block ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum)
