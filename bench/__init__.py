"""Benchmarks: each prints a table and writes it under bench/results/ with device, command and date."""

from __future__ import annotations

import json
from pathlib import Path


def emit(lines: list[str], out: str | None) -> str:
    """A report's markdown: printed, and written to `out` when one is given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    return text


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it is absent). Split on "\\n" alone: `str.splitlines` also
    splits on U+2028 and other separators that a JSON string written with ensure_ascii=False may hold."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
