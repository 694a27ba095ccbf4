"""How repetitive the target's answers are along their length: the share of answer tokens a 3-gram copy
(the token that followed the latest earlier occurrence of the preceding 3 tokens) predicts, per 64 tokens.

A speculative-decoding tau measured over whole answers counts the later, repetitive stretches that
`draftfeed eval --max-new-tokens N` never decodes when N is shorter (why validation walks the first N only).

    python bench/answer_repetition.py --data RUN/regenerated.heldout.jsonl [--out bench/results/x.md]
"""

from __future__ import annotations

import argparse
import datetime

from draftfeed.bench import emit
from draftfeed.target.loading import load_tokenizer
from draftfeed.trainer.data import read_chat_file, tokenize_chat

BIN = 64


def copy_hits(ids: list[int], positions: list[int], n: int = 3) -> list[bool]:
    """Per position p: does the token after the latest earlier occurrence of ids[p-n:p] equal ids[p]?"""
    out = []
    for p in positions:
        key, hit = ids[p - n : p], False
        for q in range(p - 1, n - 1, -1):
            if ids[q - n : q] == key:
                hit = ids[q] == ids[p]
                break
        out.append(hit if p >= n else False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="regenerated conversations (JSONL)")
    ap.add_argument("--model", default=None, help="the target whose tokenizer to use (default: the built-in)")
    ap.add_argument("--out", default=None, help="also write the table as markdown here")
    a = ap.parse_args(argv)
    tok = load_tokenizer(a.model)
    counts: dict[int, list[int]] = {}
    convs = read_chat_file(a.data)
    for conv in convs:
        chat = tokenize_chat(tok, conv, None)
        answer = [i for i, m in enumerate(chat.loss_mask) if m]
        for j, hit in enumerate(copy_hits(chat.input_ids, answer)):
            c = counts.setdefault(j // BIN, [0, 0])
            c[0] += 1
            c[1] += hit
    lines = [
        f"# Answer repetition along the answers ({datetime.date.today().isoformat()})",
        "",
        f"`python bench/answer_repetition.py --data {a.data}`: {len(convs)} conversations, every supervised token.",
        "",
        "| answer tokens | tokens | 3-gram copy hits |",
        "|---|---:|---:|",
    ]
    for b in sorted(counts):
        n, h = counts[b]
        lines.append(f"| {b * BIN}-{b * BIN + BIN - 1} | {n:,} | {h / n:.3f} |")
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
