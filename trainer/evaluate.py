"""Real acceptance length tau of a draft against the target: speculative decoding, batch 1, greedy.

Protocol (ALGORITHMS.md sections 1 "Inference (chain)", 2-3 "Inference" and 4): the target prefills the
prompt x_0..x_{n-1} (features of its captured layers, bonus x_n = argmax). Each round the drafter proposes
up to K tokens d_1..d_l; the target runs [x_n, d_1..d_l] once on its KV cache; a = the longest prefix with
d_i = the target's argmax at the previous position; d_1..d_a and the target's next token are committed (a + 1
tokens; an eos among the accepted drafts ends the round and the prompt without the bonus). tau = committed
tokens / rounds, pooled over all prompts (sum(a+1) / rounds). Generation of a prompt stops at eos or after
`max_new_tokens`. The maximum tau is K + 1: EAGLE-3 chains K = `--num-draft-tokens`; a DFlash block of bs
slots proposes K = bs - 1 tokens at once, a DSpark block K = bs, or fewer with its confidence early stop
(l = the first slot whose confidence is below theta; l = 0 verifies the anchor alone).

The EAGLE-3 drafter keeps a KV cache of committed rows (row t = (fc(A_t), emb(x_{t+1})) at position t).
A proposal runs d_1 from the last committed row's output, then K-1 chain rows (previous raw output,
emb(d_{j-1})) at the next positions on a temporary extension of the cache, which is discarded; after
verification the rows of the newly committed tokens are appended with the target's aux states from the
verify pass. The block drafter (`BlockDrafter`, DFlash / DSpark) keeps the target features of the
committed tokens and proposes one block at the last committed token. Any object with `reset` / `extend` /
`propose` can be measured (`ChainDrafter`); `run_eval` reads which algorithm an export is from its config.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from draftfeed.client.layers import default_eagle3_layer_ids

from .models import dflash, dspark
from .models.eagle3 import Eagle3DraftModel
from .progress import progress_enabled

__all__ = [
    "ChainDrafter",
    "Eagle3ChainDrafter",
    "BlockDrafter",
    "make_drafter",
    "reinitialize",
    "TargetVerifier",
    "TauResult",
    "measure_tau",
    "prompt_token_ids",
    "load_prompt_sets",
    "tau_table",
    "run_eval",
]


class ChainDrafter(Protocol):
    def reset(self, prompt: Sequence[int]) -> None:
        """Start a new prompt (its token ids; the rows come with `extend`)."""

    def extend(self, aux: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Commit rows: aux [m,3H] are the target's aux states of the next m positions t, next_ids [m] the
        tokens x_{t+1} that follow them."""

    def propose(self, k: int) -> list[int]:
        """Up to k draft tokens (target ids) continuing the committed text."""


class Eagle3ChainDrafter:
    """Chain drafting with an `Eagle3DraftModel` and a KV cache of the committed rows."""

    def __init__(self, draft: Eagle3DraftModel):
        self.draft = draft.eval()
        self.reset(())

    def reset(self, prompt: Sequence[int] = ()) -> None:
        self.past_k = self.past_v = None
        self.last_h: torch.Tensor | None = None  # raw layer output of the last committed row [1,1,H]
        self.rows = 0

    @torch.no_grad()
    def extend(self, aux: torch.Tensor, next_ids: torch.Tensor) -> None:
        d = self.draft
        m = aux.shape[0]
        g = d.project_hidden_states(aux[None].to(d.fc.weight.device))
        pos = torch.arange(self.rows, self.rows + m, device=g.device)[None]
        h, k, v = d.decode(next_ids[None].to(g.device), g, pos, self.past_k, self.past_v)
        self.past_k = k if self.past_k is None else torch.cat((self.past_k, k), 2)
        self.past_v = v if self.past_v is None else torch.cat((self.past_v, v), 2)
        self.last_h = h[:, -1:]
        self.rows += m

    @torch.no_grad()
    def chain(self, k: int, forced: Sequence[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """(draft tokens, draft-vocab logits [Vd] per step); `forced` feeds given tokens instead of the
        draft's own (a test compares this with the training-time unroll)."""
        d = self.draft
        ids = d.selected_token_ids()
        h, pk, pv = self.last_h, self.past_k, self.past_v
        tokens, logits = [], []
        for j in range(k):
            lg = d.compute_logits(h)[0, -1]
            logits.append(lg)
            # the token stays on the device until the end: no host sync per step
            tok = ids[lg.argmax()] if forced is None else torch.tensor(int(forced[j]), device=h.device)
            tokens.append(tok)
            if j == k - 1:
                break
            pos = torch.tensor([[self.rows + j]], device=h.device)
            h, kk, vv = d.decode(tok.reshape(1, 1), d.next_input(h), pos, pk, pv)
            pk, pv = torch.cat((pk, kk), 2), torch.cat((pv, vv), 2)
        return torch.stack(tokens).tolist(), logits

    def propose(self, k: int) -> list[int]:
        return self.chain(k)[0]


class BlockDrafter:
    """One-shot block proposals of a DFlash or DSpark draft (no draft KV cache: the block attends to the
    context features of every committed token, recomputed each round)."""

    def __init__(self, draft, confidence_threshold: float = 0.0):
        self.draft = draft.eval()
        self.is_dspark = isinstance(draft, dspark.DSparkDraft)
        self.confidence_threshold = confidence_threshold
        bs = draft.config.block_size
        self.max_drafts = bs if self.is_dspark else bs - 1  # DSpark slot k predicts x_{s+k+1}
        self.reset(())

    def reset(self, prompt: Sequence[int] = ()) -> None:
        self.features: torch.Tensor | None = None  # [s, K*H]: target features of x_0..x_{s-1}
        self.anchor = 0  # x_s, the last committed token
        self.last_confidence: torch.Tensor | None = None

    def extend(self, aux: torch.Tensor, next_ids: torch.Tensor) -> None:
        self.features = aux if self.features is None else torch.cat((self.features, aux))
        self.anchor = int(next_ids[-1])

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        feats = self.features[None]
        anchor = torch.tensor([self.anchor], device=feats.device)
        if not self.is_dspark:
            return dflash.propose_block(self.draft, feats, anchor)[0, :k].tolist()
        prop = dspark.propose_block(self.draft, feats, anchor, confidence_threshold=self.confidence_threshold)
        self.last_confidence = None if prop.confidence is None else prop.confidence[0]
        return prop.tokens[0, : min(k, int(prop.lengths[0]))].tolist()


def make_drafter(algorithm: str, draft, confidence_threshold: float = 0.0):
    """The drafter that measures a draft of `algorithm` (eagle3, dflash, dspark)."""
    if algorithm == "eagle3":
        return Eagle3ChainDrafter(draft)
    return BlockDrafter(draft, confidence_threshold)


@torch.no_grad()
def reinitialize(draft, seed: int = 0) -> None:
    """The untrained baseline: fresh random trainable weights, same shapes (and vocab map); the frozen
    target copies (EAGLE-3's / DSpark's embedding, DSpark's lm_head) are kept."""
    torch.manual_seed(seed)
    if isinstance(draft, Eagle3DraftModel):
        draft.reset_parameters()
        return
    from .models.common import RMSNorm

    for name, child in draft.named_children():
        if name in ("embed_tokens", "lm_head"):
            continue
        child.apply(draft._init_weights)
        for m in child.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
    draft.norm.weight.fill_(1.0)


class TargetVerifier:
    """The in-process target on a KV cache: prefill, verify a block, crop back to the committed text.

    `aux_layer_ids` are the layers whose outputs a round returns, concatenated, captured by the server's
    own hooks (`server/capture.py`) so they are the rows the draft was trained on: id i = output of decoder
    layer i (EAGLE-3's aux layers, DFlash's target layers; N-1 too is the last layer's pre-norm output);
    with `algorithm` "dspark", -1 = input of the first layer and N-1 = the final-norm output (DESIGN.md)."""

    def __init__(self, model, aux_layer_ids: Sequence[int] | None = None, algorithm: str = "eagle3"):
        from draftfeed.server.capture import discover

        self.model = model.eval()
        self.layout = discover(model)
        n = self.num_layers = self.layout.num_layers
        self.aux_layer_ids = list(aux_layer_ids or default_eagle3_layer_ids(n))
        self._edges = n if algorithm == "dspark" else None  # DSpark's -1 / N-1 are not layer outputs
        ids = self.aux_layer_ids
        self._capture = dict(
            layer_ids=[i for i in ids if 0 <= i and (self._edges is None or i < n - 1)],
            want_first_input=self._edges is not None and -1 in ids,
            want_final=self._edges is not None and n - 1 in ids,
        )
        self.device = next(model.parameters()).device
        self.cache = None
        self.length = 0

    @torch.no_grad()
    def run(self, ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Run `ids` after the cached prefix: (aux [m,K*H] on the device, the greedy next tokens [m])."""
        from draftfeed.server.capture import capturing
        from draftfeed.server.features import concat_features

        x = torch.tensor([list(ids)], device=self.device)
        with capturing(self.layout, **self._capture) as cap:
            out = self.model(input_ids=x, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.length += len(ids)
        aux = concat_features(cap, self.aux_layer_ids, self._edges)[0]
        return aux, out.logits[0].argmax(-1).tolist()

    def reset(self) -> None:
        self.cache, self.length = None, 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (a negative `crop` removes that many in every transformers 5.x)."""
        if length < self.length:
            self.cache.crop(length - self.length)
            self.length = length


@dataclass
class TauResult:
    name: str
    algorithm: str = ""
    k: int = 0  # most drafts per round (max tau = k + 1)
    prompts: int = 0
    rounds: int = 0
    committed: int = 0  # tokens committed by verification rounds (the prefill's bonus token not included)
    drafted: int = 0  # draft tokens verified (DSpark's early stop verifies fewer than k)
    seconds: float = 0.0
    accept_hist: list[int] = field(default_factory=list)  # rounds by tokens committed (index = a + 1)

    @property
    def tau(self) -> float:
        return self.committed / max(1, self.rounds)

    def as_dict(self) -> dict:
        return {**asdict(self), "tau": self.tau}


def measure_tau(
    target: TargetVerifier,
    drafter: ChainDrafter,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    name: str = "",
    log=None,
    algorithm: str = "",
    progress: bool = False,
) -> TauResult:
    """Pooled tau of `drafter` over token-id `prompts` (greedy verification, at most K = `k` drafts per
    round; a drafter may propose fewer). `progress`: a bar of prompts (and the running tau) on stderr."""
    from tqdm import tqdm

    eos = set(eos_ids)
    res = TauResult(name=name, algorithm=algorithm, k=k, accept_hist=[0] * (k + 2))
    start = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=name or "eval", unit="prompt", file=sys.stderr, disable=not progress)
    if progress and log is not None:
        log = bar.write
    for n, prompt in enumerate(prompts):
        target.reset()
        drafter.reset(prompt)
        aux, pred = target.run(prompt)
        committed = list(prompt) + [pred[-1]]
        drafter.extend(aux, torch.tensor(committed[1:]))
        new = 1
        while new < max_new_tokens and committed[-1] not in eos:
            drafts = list(drafter.propose(k))[:k]
            p = len(committed) - 1
            aux, pred = target.run([committed[-1]] + drafts)
            a = 0
            while a < len(drafts) and drafts[a] == pred[a]:
                a += 1
            res.drafted += len(drafts)
            stop = next((i for i in range(a) if drafts[i] in eos), None)
            got = drafts[: stop + 1] if stop is not None else list(drafts[:a]) + [pred[a]]
            committed += got
            new += len(got)
            res.rounds += 1
            res.committed += len(got)
            res.accept_hist[len(got)] += 1
            if stop is not None:
                break
            target.crop(p + a + 1)
            drafter.extend(aux[: a + 1], torch.tensor(committed[p + 1 : p + a + 2]))
        res.prompts += 1
        bar.set_postfix_str(f"tau {res.tau:.3f}" if res.rounds else "", refresh=False)
        bar.update(1)
        if log is not None and (n + 1) % 10 == 0:
            log(f"{name}: {n + 1}/{len(prompts)} prompts, tau {res.tau:.3f}")
    bar.close()
    res.seconds = time.perf_counter() - start
    return res


def prompt_token_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """A chat prompt rendered with the template and the generation prompt, as token ids."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _file_prompts(path: str) -> list[list[dict[str, str]]]:
    """First-turn messages of a prompt file: MT-Bench questions (`turns`), HumanEval (`prompt`), or chats."""
    from pathlib import Path

    from .data import _iter_records, load_humaneval, load_mtbench

    records = list(_iter_records(Path(path).expanduser()))
    first = records[0] if records else None
    if isinstance(first, dict) and "turns" in first:
        return [p.first_turn_messages() for p in load_mtbench(path)]
    if isinstance(first, dict) and "prompt" in first and "task_id" in first:
        return [p.first_turn_messages() for p in load_humaneval(path)]
    out = []
    for r in records:  # ShareGPT or OpenAI records; no assistant turn needed
        turns = r.get("messages") or r.get("conversations") or []
        for t in turns:
            role = str(t.get("role", t.get("from", ""))).lower()
            if role in ("user", "human"):
                out.append([{"role": "user", "content": t.get("content", t.get("value", ""))}])
                break
    if not out:
        raise ValueError(f"{path}: no prompt found (expected MT-Bench questions, HumanEval, or chat records)")
    return out


def load_prompt_sets(names: Sequence[str], tokenizer, limit: int | None = None) -> dict[str, list[list[int]]]:
    """name -> prompts as token ids: "mtbench" (first turns), "humaneval" (the packaged files), or a file
    (MT-Bench question.jsonl, HumanEval jsonl(.gz), or chats: the first user turn)."""
    from .data import load_humaneval, load_mtbench

    out = {}
    for name in names:
        if name == "mtbench":
            msgs = [p.first_turn_messages() for p in load_mtbench()]
        elif name == "humaneval":
            msgs = [p.first_turn_messages() for p in load_humaneval()]
        else:
            msgs = _file_prompts(name)
        out[name] = [prompt_token_ids(tokenizer, m) for m in msgs[:limit]]
    return out


def eos_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return sorted(i for i in ids if i is not None)


def tau_table(results: Sequence[TauResult]) -> str:
    """A markdown table of results (one row each): the three algorithms side by side."""
    lines = [
        "| draft | algorithm | prompts | max drafts/round | tau | max tau | rounds | drafted | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.algorithm} | {r.prompts} | {r.k} | **{r.tau:.3f}** | {r.k + 1} | {r.rounds} "
            f"| {r.drafted} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def run_eval(cfg, model=None, tokenizer=None) -> dict[str, TauResult]:
    """`draftfeed eval`: tau of the exported draft `cfg.draft` (EAGLE-3, DFlash or DSpark, read from its
    config.json) on each prompt set (an `EvalConfig`)."""
    from draftfeed.server.loading import load_target, load_tokenizer

    from .export import load_draft
    from .loop import resolve_device

    device = resolve_device(cfg.device)
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "bfloat16": torch.bfloat16,
    }.get(cfg.dtype, torch.float32)
    if model is None:
        model = load_target(cfg.target_model, device=device, dtype=dtype)
    tokenizer = tokenizer or load_tokenizer(cfg.target_model)
    exported = load_draft(cfg.draft, model, device=device, dtype=model.dtype)
    if cfg.untrained:  # the baseline: same shapes and vocab map, fresh random weights
        reinitialize(exported.draft)
    target = TargetVerifier(model, exported.layer_ids, exported.algorithm)
    drafter = make_drafter(exported.algorithm, exported.draft, cfg.confidence_threshold)
    k = cfg.num_draft_tokens if exported.algorithm == "eagle3" else drafter.max_drafts
    eos = eos_token_ids(tokenizer, model)

    def say(m):
        print(m, file=sys.stderr, flush=True)

    results = {}
    for name, prompts in load_prompt_sets(cfg.prompts, tokenizer, cfg.limit).items():
        r = measure_tau(
            target,
            drafter,
            prompts,
            k,
            cfg.max_new_tokens,
            eos,
            name,
            log=say,
            algorithm=exported.algorithm,
            progress=progress_enabled(cfg.progress, sys.stderr),
        )
        results[name] = r
        print(
            f"{name}: {exported.algorithm} tau {r.tau:.3f} over {r.rounds} rounds, {r.prompts} prompts, "
            f"K={k} ({r.seconds:.0f} s)",
            flush=True,
        )
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({k: v.as_dict() for k, v in results.items()}, f, indent=2)
    return results
