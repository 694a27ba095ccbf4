"""Pack the packaged ShareGPT file into a small JSONL.gz for a machine without the package (the GPU machine):
every usable conversation (trainer/data.py's rules), its system and user turns kept, its assistant turns
emptied (regeneration writes them again), cut before the first user turn longer than --max-chars (such a
prompt is over any recipe's --regen-max-prompt-tokens) and after --max-turns user turns.

    python bench/pack_sharegpt.py OUT.jsonl.gz [--max-chars 6000] [--max-turns 6]

Only for `--regenerate` runs: the emptied assistant turns are not training text.
"""

from __future__ import annotations

import argparse
import gzip
import json

from draftfeed.trainer.data import load_sharegpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--max-chars", type=int, default=6000)
    p.add_argument("--max-turns", type=int, default=6)
    args = p.parse_args(argv)
    convs = load_sharegpt()
    kept = turns = 0
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        for conv in convs:
            out, users = [m for m in conv if m["role"] == "system"][:1], 0
            for m in conv:
                if m["role"] != "user":
                    continue
                if len(m["content"]) > args.max_chars or users >= args.max_turns:
                    break
                out += [m, {"role": "assistant", "content": ""}]
                users += 1
            if users:
                f.write(json.dumps({"messages": out}, ensure_ascii=False) + "\n")
                kept, turns = kept + 1, turns + users
    print(f"{len(convs)} usable conversations, {kept} kept with {turns} user turns -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
