"""The training progress bar: one line on a terminal, redrawn after every optimizer step (tqdm draws
it; the loss, accuracy, token rate and eta are ours).

    eagle3 [#########...........] 450/1000  45%, loss 3.071  acc 0.512  15.4k tok/s  eta 1m12s

Loss and accuracy are the last step's (averaged over its micro-batches); tokens per second are over the
steps since the bar started (a resumed run counts from the resume). Text printed while the bar is shown
goes through `write`, which clears the bar's line first and redraws it after. Without a terminal (logs,
CI) the bar draws nothing and the periodic progress lines of the loop are the only output.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["ProgressBar", "progress_enabled", "format_duration"]

MODES = ("auto", "on", "off")


def progress_enabled(mode: str, stream: TextIO) -> bool:
    """`on`, `off`, or `auto`: on when `stream` is a terminal."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())
    return mode == "on"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


class ProgressBar:
    """The bar on `stream` (stderr by default), drawn by tqdm; inert when `enabled` is False (then
    `write` still prints its lines)."""

    def __init__(
        self,
        label: str,
        total: int,
        initial: int = 0,
        *,
        enabled: bool,
        stream: TextIO | None = None,
        width: int = 20,
    ):
        self.label, self.total = label, max(1, total)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start_step, self.step = initial, initial
        self.start = time.perf_counter()
        self.tokens = 0
        self.metrics: dict[str, float] = {}
        self._bar = tqdm(
            total=self.total,
            initial=min(initial, self.total),
            desc=label,
            file=self.stream,
            disable=not enabled,
            ascii=".#",
            mininterval=0,
            dynamic_ncols=False,
            bar_format="{desc} [{bar:" + str(width) + "}] {n_fmt}/{total_fmt} {percentage:3.0f}%{postfix}",
        )

    def _postfix(self) -> str:
        parts = []
        if "loss" in self.metrics:
            parts.append(f"loss {self.metrics['loss']:.4f}")
        if "accuracy" in self.metrics:
            parts.append(f"acc {self.metrics['accuracy']:.3f}")
        steps = self.step - self.start_step
        elapsed = time.perf_counter() - self.start
        if steps and elapsed > 0:
            done = min(self.step, self.total)
            parts.append(f"{_rate(self.tokens / elapsed)} tok/s")
            parts.append(f"eta {format_duration(elapsed / steps * (self.total - done))}")
        return "  ".join(parts)

    def line(self) -> str:
        """The bar's current text."""
        return self._bar.format_meter(**{**self._bar.format_dict, "postfix": self._postfix()})

    def update(self, step: int, tokens: int, metrics: dict[str, float]) -> None:
        """After optimizer step `step` (1-based), which trained on `tokens` tokens."""
        self.step, self.tokens, self.metrics = step, self.tokens + tokens, metrics
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(min(step, self.total) - self._bar.n)

    def write(self, text: str) -> None:
        """Print `text` as its own line(s) above the bar."""
        tqdm.write(text.rstrip("\n"), file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        self._bar.close()
