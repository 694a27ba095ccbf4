"""Summarise a `py-spy record --threads --subprocesses -f raw` profile: active samples per process and
thread, then per process the functions with the most samples inclusive (draftfeed's own and the
libraries' it calls) and the leaf frames with the most samples.

    python bench/pyspy_summary.py prof.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("draftfeed/", "site-packages/", "python3.12/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['fn']} ({path})"


def summarise(path: str, top: int) -> str:
    threads: Counter = Counter()
    inclusive: dict[str, Counter] = defaultdict(Counter)
    leaves: dict[str, Counter] = defaultdict(Counter)
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        procs = [i for i, f in enumerate(frames) if f.startswith("process ")]  # child frames follow parents'
        last = procs[-1] if procs else -1
        proc = "server (main process)" if len(procs) <= 1 else "client job process"
        rest = frames[last + 1 :]
        thread = rest[0] if rest and rest[0].startswith("thread") else "thread ?"
        body = [_short(f) for f in rest if not f.startswith("thread")]
        threads[(proc, re.sub(r"\(0x[0-9a-f]+\)", "", thread).strip())] += n
        for fn in set(body):
            inclusive[proc][fn] += n
        if body:
            leaves[proc][body[-1]] += n
    out = ["## active samples by process and thread", ""]
    for (proc, thread), n in threads.most_common():
        out.append(f"{n:8d}  {proc} | {thread}")
    for proc in inclusive:
        total = sum(n for (p, _t), n in threads.items() if p == proc)
        out += ["", f"## {proc}: {total} samples; inclusive", ""]
        out += [f"{n:8d} {100 * n / total:5.1f}%  {fn}" for fn, n in inclusive[proc].most_common(top)]
        out += ["", f"## {proc}: leaf frames", ""]
        out += [f"{n:8d} {100 * n / total:5.1f}%  {fn}" for fn, n in leaves[proc].most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    print(summarise(args.profile, args.top))
