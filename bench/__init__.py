"""Benchmarks: each prints a table and writes it under bench/results/ with device, command and date."""

from __future__ import annotations


def emit(lines: list[str], out: str | None) -> str:
    """A report's markdown: printed, and written to `out` when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    return text
