"""How much of the held-out answers an EAGLE-3 draft vocabulary can draft at all (CPU, no model run).

The draft predicts only the `--draft-vocab-size` tokens the training picks by count (`build_token_map`, the
trainer's own function over the same supervised tokens); a target token outside that set can never be
accepted. For the regenerated training conversations and the held-out answers (greedy answers of the target,
so their tokens are the target's argmax), this prints the share of held-out answer tokens inside the top-V
set and the longest accepted chain that coverage alone allows, for several V.

    python bench/draft_vocab_coverage.py --train regenerated.jsonl.gz --held regenerated.heldout.jsonl \
        --sizes 4096,8192,16384,32000 --out bench/results/draft_vocab_coverage_cpu_2026-12-06.md
"""

from __future__ import annotations

import argparse
import time

import torch

from draftfeed.bench import emit
from draftfeed.client.vocab import TokenCounter, build_token_map
from draftfeed.target.loading import load_tokenizer
from draftfeed.trainer.data import ChatDataset, read_chat_file
from draftfeed.trainer.train import COUNT_SAMPLE, special_ids


def supervised(dataset: ChatDataset, indices) -> list[torch.Tensor]:
    """The supervised (assistant) token ids of each conversation at `indices`."""
    out = []
    for i in indices:
        ids, mask = dataset[i]
        out.append(torch.from_numpy(ids)[torch.from_numpy(mask).bool()])
    return out


def chain_ceiling(inside: list[torch.Tensor], k: int) -> float:
    """Tokens per round if every draft inside the vocabulary were right and every one outside wrong: a
    decoding walk over each answer (accept the run of in-vocabulary tokens, at most K, plus the bonus)."""
    rounds = tokens = 0
    for ok in inside:
        ok = ok.tolist()
        t = 0
        while t < len(ok):
            run = 0
            while run < k and t + 1 + run < len(ok) and ok[t + 1 + run]:
                run += 1
            rounds += 1
            tokens += run + 1
            t += run + 1
    return tokens / max(1, rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="regenerated training conversations (JSONL, may be .gz)")
    p.add_argument("--held", required=True, help="held-out conversations answered by the target")
    p.add_argument("--sizes", default="2048,4096,8192,16384,32000")
    p.add_argument("--k", type=int, default=7)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    tok = load_tokenizer(None)
    t0 = time.perf_counter()
    train = ChatDataset(read_chat_file(a.train), tok, a.seq_len)
    held = ChatDataset(read_chat_file(a.held), tok, a.seq_len)
    counter = TokenCounter(len(tok))
    step = max(1, -(-len(train) // COUNT_SAMPLE))  # the conversations the trainer counts
    for ids in supervised(train, range(0, len(train), step)):
        counter.update(ids, torch.ones_like(ids))
    answers = supervised(held, range(len(held)))
    n = sum(len(x) for x in answers)
    rows = []
    for v in [int(x) for x in a.sizes.split(",")]:
        _, mask = build_token_map(counter.counts, v, special_ids(tok))
        inside = [mask[x] for x in answers]
        share = sum(int(x.sum()) for x in inside) / max(1, n)
        rows.append((v, share, chain_ceiling(inside, a.k)))
    lines = [
        "# Draft vocabulary coverage of held-out answers (CPU)",
        "",
        f"Training conversations: {a.train} ({len(train):,}; {min(len(train), COUNT_SAMPLE):,} counted, as the "
        f"trainer does); held-out answers: {a.held} ({len(held):,} conversations, {n:,} answer tokens); "
        f"tokenizer: the built-in default target's. {time.perf_counter() - t0:.0f} s.",
        "",
        f"| draft vocab | held-out answer tokens inside | tau ceiling from coverage alone (K = {a.k}) |",
        "|---:|---:|---:|",
        *[f"| {v:,} | {100 * share:.2f}% | {ceil:.2f} |" for v, share, ceil in rows],
    ]
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
