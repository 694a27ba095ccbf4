"""Real acceptance length tau of a draft against the target: speculative decoding, batch 1, greedy.

Protocol (docs/architecture.md sections 1 "Inference (chain)", 2-3 "Inference" and 4): the target prefills the
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
committed tokens and proposes one block at the last committed token (`measure_tau`); `measure_speedup`
runs the same blocks through `StaticBlockDrafter` (static_drafting.py: the context rows' keys / values
cached once per committed token, CUDA graphs). Any object with `reset` / `extend` / `propose` can be
measured (`ChainDrafter`); `run_eval` reads which algorithm an export is from its config.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from draftfeed.client.dtypes import float_dtype
from draftfeed.client.layers import default_eagle3_layer_ids

from .compiling import compiling_as, resolve_compile
from .models import dflash, dspark
from .models.eagle3 import Eagle3DraftModel
from .progress import progress_enabled
from .static_drafting import StaticBlockDrafter, StaticEagle3Drafter, block_max_drafts

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
    "StaticTarget",
    "StaticEagle3Drafter",
    "StaticBlockDrafter",
    "decode_target_alone",
    "decode_speculative",
    "measure_speedup",
    "speculative_capacity",
    "eval_dtype",
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
        self.max_drafts = block_max_drafts(draft)
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
    """The drafter that measures a draft of `algorithm` (eagle3, dflash, dspark): its `DraftAlgorithm.drafter`."""
    from .algorithms import ALGORITHMS

    return ALGORITHMS[algorithm].drafter(draft, confidence_threshold)


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
    own hooks (`target/capture.py`) so they are the rows the draft was trained on: id i = output of decoder
    layer i (EAGLE-3's aux layers, DFlash's target layers; N-1 too is the last layer's pre-norm output);
    with `algorithm` "dspark", -1 = input of the first layer and N-1 = the final-norm output (docs/architecture.md)."""

    def __init__(self, model, aux_layer_ids: Sequence[int] | None = None, algorithm: str = "eagle3"):
        from draftfeed.target.capture import discover

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
        from draftfeed.target.capture import capturing
        from draftfeed.target.features import concat_features

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
    # `measure_speedup` only: both loops on the same prompts
    tokens: int = 0  # generated tokens (the same for both when the outputs are identical)
    base_seconds: float = 0.0  # the target alone
    spec_seconds: float = 0.0  # speculative decoding
    identical: int = 0  # prompts whose two outputs are the same tokens
    matching_tokens: int = 0  # tokens before the first difference, summed over prompts
    graphs: bool = False  # both loops ran as CUDA graphs
    phase_seconds: dict[str, float] = field(default_factory=dict)  # speculative time by phase

    @property
    def tau(self) -> float:
        return self.committed / max(1, self.rounds)

    @property
    def base_tok_s(self) -> float:
        return self.tokens / self.base_seconds if self.base_seconds else 0.0

    @property
    def spec_tok_s(self) -> float:
        return self.tokens / self.spec_seconds if self.spec_seconds else 0.0

    @property
    def speedup(self) -> float:
        return self.base_seconds / self.spec_seconds if self.spec_seconds else 0.0

    def round_ms(self) -> dict[str, float]:
        """Milliseconds per verification round by phase (prefill per prompt is left out)."""
        rounds = max(1, self.rounds)
        return {k: 1e3 * v / rounds for k, v in self.phase_seconds.items() if k != "prefill"}

    def as_dict(self) -> dict:
        extra = {"base_tok_s": self.base_tok_s, "spec_tok_s": self.spec_tok_s, "speedup": self.speedup}
        return {**asdict(self), "tau": self.tau, **extra, "round_ms": self.round_ms()}


@dataclass
class Round:
    """One verification round of `chain_rounds`: `start` = tokens committed before it (prompt included),
    `accepted` drafts, the `drafts` proposed, the tokens it committed (`got`) and the target's predictions."""

    start: int
    accepted: int
    drafts: list[int]
    got: list[int]
    pred: list[int]


@torch.no_grad()
def chain_rounds(target: TargetVerifier, drafter: ChainDrafter, prompt: Sequence[int], k: int, max_new_tokens: int,
                 eos: set, committed: list[int] | None = None) -> Iterator[Round]:  # fmt: skip
    """Greedy speculative decoding of one prompt (the `measure_tau` protocol), a `Round` at a time: the
    target verifies the last committed token + up to K drafts, the longest matching prefix is accepted and
    the target's next token committed after it (an eos among them ends the prompt). `committed`, when
    given, receives the prompt and every committed token."""
    target.reset()
    drafter.reset(prompt)
    aux, pred = target.run(prompt)
    committed = [] if committed is None else committed
    committed += list(prompt) + [pred[-1]]
    drafter.extend(aux, torch.tensor(committed[1:]))
    new = 1
    while new < max_new_tokens and committed[-1] not in eos:
        drafts = list(drafter.propose(k))[:k]
        p = len(committed) - 1
        aux, pred = target.run([committed[-1]] + drafts)
        a = 0
        while a < len(drafts) and drafts[a] == pred[a]:
            a += 1
        stop = next((i for i in range(a) if drafts[i] in eos), None)
        got = drafts[: stop + 1] if stop is not None else list(drafts[:a]) + [pred[a]]
        yield Round(len(committed), a, drafts, got, pred)
        committed += got
        new += len(got)
        if stop is not None:
            break
        target.crop(p + a + 1)
        drafter.extend(aux[: a + 1], torch.tensor(committed[p + 1 : p + a + 2]))


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
        for r in chain_rounds(target, drafter, prompt, k, max_new_tokens, eos):
            res.drafted += len(r.drafts)
            res.rounds += 1
            res.committed += len(r.got)
            res.accept_hist[len(r.got)] += 1
        res.prompts += 1
        bar.set_postfix_str(f"tau {res.tau:.3f}" if res.rounds else "", refresh=False)
        bar.update(1)
        if log is not None and (n + 1) % 10 == 0:
            log(f"{name}: {n + 1}/{len(prompts)} prompts, tau {res.tau:.3f}")
    bar.close()
    res.seconds = time.perf_counter() - start
    return res


# ---------------------------------------------------------------- speedup: both loops on a static cache


class StaticTarget:
    """The in-process target on a `StaticKV` for one prompt at a time, with two fixed-shape steps captured as
    CUDA graphs: `verify` (the last committed token + K drafts: greedy predictions, aux states, the accepted
    count a and the next committed token, all on the device) and `decode` (one greedy token: the baseline).
    The same captures as `TargetVerifier` (the rows the draft was trained on)."""

    def __init__(self, model, aux_layer_ids, algorithm: str, k: int, max_len: int, graphs: bool = True):
        from draftfeed.target.capture import text_config

        from .fast_decode import Graphed, StaticKV

        self.spec = TargetVerifier(model, aux_layer_ids, algorithm)  # layout and captures
        self.model, self.device, self.k = model, self.spec.device, k
        dev = self.device
        self.kv = StaticKV.for_model(model, 1, max_len)
        self.max_len = max_len
        self.zero = torch.zeros(1, dtype=torch.long, device=dev)  # valid_from: no padding
        self.start = torch.zeros((), dtype=torch.long, device=dev)  # column of the next step's first token
        self.vids = torch.zeros(k + 1, dtype=torch.long, device=dev)  # last committed token, drafts
        self.ndrafts = torch.full((), k, dtype=torch.long, device=dev)
        self.vcols = torch.zeros(k + 1, dtype=torch.long, device=dev)
        self.vpred = torch.zeros(k + 1, dtype=torch.long, device=dev)
        width = text_config(model.config).hidden_size * len(self.spec.aux_layer_ids)
        self.vaux = torch.zeros(k + 1, width, dtype=next(model.parameters()).dtype, device=dev)
        self.accept = torch.zeros((), dtype=torch.long, device=dev)
        # [a, pred_0..pred_K, drafts verified]: one read per round
        self.result = torch.zeros(k + 3, dtype=torch.long, device=dev)
        self.dtok = torch.zeros(1, dtype=torch.long, device=dev)
        self.gen = torch.zeros(max_len + 1, dtype=torch.long, device=dev)  # baseline: token at column c
        self.arange = torch.arange(k + 1, device=dev)
        self.verify = Graphed(self._verify, dev, graphs, "verify step").capture()
        self.decode = Graphed(self._decode, dev, graphs, "decode step").capture()
        self.graphed = self.verify.graph is not None and self.decode.graph is not None

    def _run(self, ids: torch.Tensor, cols: torch.Tensor, aux: bool):
        from contextlib import nullcontext

        from draftfeed.target.capture import capturing
        from draftfeed.target.features import concat_features

        from .fast_decode import static_forward

        with capturing(self.spec.layout, **self.spec._capture) if aux else nullcontext() as cap:
            logits = static_forward(self.model, self.kv, ids[None], cols, self.zero)
        feats = concat_features(cap, self.spec.aux_layer_ids, self.spec._edges)[0] if aux else None
        return logits[0], feats

    @torch.no_grad()
    def prefill(self, prompt: Sequence[int], aux: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The prompt at columns 0..n-1 (eager): (aux [n,K*H] or None, greedy predictions [n]); the
        bonus token x_n becomes the next step's input."""
        n = len(prompt)
        if n + self.k + 2 > self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit the static cache of {self.max_len}")
        ids = torch.tensor(list(prompt), dtype=torch.long, device=self.device)
        logits, feats = self._run(ids, torch.arange(n, device=self.device), aux)
        pred = logits.argmax(-1)
        self.start.fill_(n)
        self.vids[:1].copy_(pred[-1:])
        self.dtok.copy_(pred[-1:])
        self.gen[n : n + 1].copy_(pred[-1:])
        return feats, pred

    def _verify(self) -> None:
        cols = self.start + self.arange
        self.vcols.copy_(cols)
        logits, feats = self._run(self.vids, cols, True)
        pred = logits.argmax(-1)
        self.vpred.copy_(pred)
        self.vaux.copy_(feats)
        match = (self.vids[1:] == pred[:-1]) & (self.arange[:-1] < self.ndrafts)
        a = match.long().cumprod(0).sum()
        self.accept.copy_(a)
        self.result[:1].copy_(a.view(1))
        self.result[1:-1].copy_(pred)
        self.result[-1:].copy_(self.ndrafts.view(1))
        self.start.add_(a + 1)
        self.vids[:1].copy_(pred.gather(0, a.view(1)))

    def _decode(self) -> None:
        cols = self.start.view(1)
        logits, _ = self._run(self.dtok, cols, False)
        nxt = logits.argmax(-1)
        self.gen.index_copy_(0, cols + 1, nxt)
        self.dtok.copy_(nxt)
        self.start.add_(1)


class _Clock:
    """Where a round's time goes: `mark(label)` charges the time since the previous mark to `label` (CUDA
    events on the GPU's timeline, read once per prompt; wall time on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.seconds: dict[str, float] = {}

    def mark(self, label: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((label, ev))
        else:
            self.marks.append((label, time.perf_counter()))

    def flush(self) -> None:
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (_, a), (label, b) in zip(self.marks, self.marks[1:], strict=False):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            self.seconds[label] = self.seconds.get(label, 0.0) + dt
        self.marks = []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cut(tokens: Sequence[int], n: int, eos: set) -> list[int]:
    """The first n tokens, ending at the first eos (kept)."""
    out = []
    for t in tokens[:n]:
        out.append(t)
        if t in eos:
            break
    return out


@torch.no_grad()
def decode_target_alone(target: StaticTarget, prompt: Sequence[int], max_new_tokens: int, eos: set,
                        check_every: int = 8) -> list[int]:  # fmt: skip
    """Greedy decoding with the target alone: one graphed step per token, the tokens stay on the device
    (the host looks at them every `check_every` steps for an eos)."""
    n = len(prompt)
    target.prefill(prompt, aux=False)
    done = 1
    while done < max_new_tokens:
        steps = min(check_every, max_new_tokens - done)
        for _ in range(steps):
            target.decode()
        done += steps
        if any(t in eos for t in target.gen[n + done - steps : n + done].tolist()):
            break
    return _cut(target.gen[n : n + done].tolist(), max_new_tokens, eos)


@torch.no_grad()
def decode_speculative(target: StaticTarget, drafter, prompt: Sequence[int], max_new_tokens: int, eos: set,
                       res: TauResult, clock: _Clock | None = None) -> list[int]:  # fmt: skip
    """Greedy speculative decoding (the `measure_tau` protocol) on `target`; rounds and accepted tokens
    go into `res`. A `device_side` drafter (`StaticEagle3Drafter`, `StaticBlockDrafter`) commits and proposes
    without the host, writing its drafts and their count into the verify input; any other `ChainDrafter`
    proposes / extends from the host, its drafts padded to the verify's K."""
    k = target.k
    mark = clock.mark if clock is not None else (lambda label: None)
    aux, pred = target.prefill(prompt)
    bonus = int(pred[-1])
    out = [bonus]
    next_ids = torch.cat((torch.tensor(list(prompt[1:]), dtype=torch.long, device=pred.device), pred[-1:]))
    if getattr(drafter, "device_side", False):
        drafter.prefill(aux, next_ids)
        mark("prefill")
        return _rounds_on_device(target, drafter, out, max_new_tokens, eos, res, mark)
    drafter.reset(prompt)
    drafter.extend(aux, next_ids)
    mark("prefill")
    while len(out) < max_new_tokens and out[-1] not in eos:
        drafts = list(drafter.propose(k))[:k]
        if drafts:
            target.vids[1 : 1 + len(drafts)].copy_(torch.tensor(drafts, dtype=torch.long), non_blocking=True)
        target.ndrafts.fill_(len(drafts))
        res.drafted += len(drafts)
        mark("draft")
        target.verify()
        mark("verify")
        r = target.result.tolist()
        mark("sync")
        if _take_round(r, out, eos, res):
            break
        drafter.extend(target.vaux[: r[0] + 1], target.vpred[: r[0] + 1])
        mark("draft")
    return _cut(out, max_new_tokens, eos)


def _take_round(r: list[int], out: list[int], eos: set, res: TauResult) -> bool:
    """Commit one round's result [a, pred_0..pred_K, drafts verified] to `out` and `res`; True when it ends
    at an eos (an accepted draft's or the bonus token)."""
    a, vpred = r[0], r[1:-1]
    stop = next((i for i in range(a) if vpred[i] in eos), None)
    got = vpred[: stop + 1] if stop is not None else vpred[: a + 1]
    out += got
    res.rounds += 1
    res.committed += len(got)
    res.accept_hist[len(got)] += 1
    return out[-1] in eos


def _rounds_on_device(target: StaticTarget, drafter, out: list[int], max_new_tokens: int, eos: set,
                      res: TauResult, mark) -> list[int]:  # fmt: skip
    """The rounds of a `device_side` drafter, pipelined: verify, commit and propose need nothing from the host,
    so round r + 1 is queued before the host reads round r's result (an asynchronous copy into pinned memory
    and an event), and the GPU never idles while the host reads and counts. The cost: when round r ends the
    prompt (an eos) the already queued round r + 1 is wasted work; it is timed with the prompt. A round is
    queued only when the rounds before it may leave tokens to make (each commits at least one), so the
    static cache needs room for one round beyond the last useful one (`measure_speedup` sizes it)."""
    if len(out) >= max_new_tokens or out[-1] in eos:  # the prefill's bonus token ended it
        return _cut(out, max_new_tokens, eos)
    cuda = target.device.type == "cuda"
    width = target.result.numel()
    host = torch.zeros(2, width, dtype=torch.long, pin_memory=cuda)
    ready = [torch.cuda.Event() if cuda else None for _ in range(2)]

    def queue_round(slot: int) -> None:
        target.verify()
        mark("verify")
        drafter.commit()
        drafter.propose()
        mark("draft")
        host[slot].copy_(target.result, non_blocking=cuda)
        if cuda:
            ready[slot].record()
        mark("sync")

    queue_round(0)
    slot, queued = 0, 1  # rounds queued and not yet read
    while queued:
        # round `slot` is queued; queue the next one unless this round surely finishes the prompt
        if len(out) + 1 < max_new_tokens:
            queue_round(1 - slot)
            queued += 1
        if cuda:
            ready[slot].synchronize()
        r = host[slot].tolist()
        queued -= 1
        res.drafted += r[-1]  # the count the verify used (DSpark's early stop may verify fewer than K)
        if _take_round(r, out, eos, res) or len(out) >= max_new_tokens:
            break
        slot = 1 - slot
    return _cut(out, max_new_tokens, eos)


def speculative_capacity(longest_prompt: int, max_new_tokens: int, k: int) -> int:
    """Columns of the static cache `measure_speedup` decodes in: the prompt, the new tokens, and the rows of
    one pipelined round queued past the last useful one (`_rounds_on_device`) with the verify's K + 1."""
    return longest_prompt + max_new_tokens + 3 * k + 8


def measure_speedup(
    model,
    exported_draft,
    algorithm: str,
    layer_ids,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    name: str = "",
    *,
    confidence_threshold: float = 0.0,
    graphs: bool = True,
    progress: bool | None = None,
    target: StaticTarget | None = None,
) -> TauResult:
    """Each prompt decoded twice in the same process and loop style: the target alone (`decode_target_alone`)
    and with the draft (`decode_speculative`), both greedy on the same graphed static-cache target. Checks
    that both give the same tokens, and times both (synchronized before and after each prompt): tau,
    tokens/s of each, the speedup, and the split of the speculative time by phase."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    eos = set(eos_ids)
    if target is None:
        longest = max((len(p) for p in prompts), default=1)
        target = StaticTarget(
            model, layer_ids, algorithm, k, speculative_capacity(longest, max_new_tokens, k), graphs
        )
    if algorithm == "eagle3":
        drafter = StaticEagle3Drafter(exported_draft, target, graphs)
    else:
        drafter = StaticBlockDrafter(exported_draft, target, confidence_threshold, graphs)
    graphed = target.graphed and drafter.graphed
    res = TauResult(name=name, algorithm=algorithm, k=k, accept_hist=[0] * (k + 2), graphs=graphed)
    if prompts:  # warm-up (allocator, kernels): one short prompt, both loops, not counted
        decode_target_alone(target, prompts[0], min(16, max_new_tokens), eos)
        decode_speculative(
            target,
            drafter,
            prompts[0],
            min(16, max_new_tokens),
            eos,
            TauResult("warm-up", k=k, accept_hist=[0] * (k + 2)),
        )
    enabled = progress_enabled("auto", sys.stderr) if progress is None else progress
    bar = tqdm(total=len(prompts), desc=name or "eval", unit="prompt", file=sys.stderr, disable=not enabled)
    clock = _Clock(device)
    start = time.perf_counter()
    for prompt in prompts:
        _sync(device)
        t0 = time.perf_counter()
        base = decode_target_alone(target, prompt, max_new_tokens, eos)
        _sync(device)
        t1 = time.perf_counter()
        clock.mark("start")
        spec = decode_speculative(target, drafter, prompt, max_new_tokens, eos, res, clock)
        _sync(device)
        t2 = time.perf_counter()
        clock.flush()
        res.prompts += 1
        res.tokens += len(base)
        res.base_seconds += t1 - t0
        res.spec_seconds += t2 - t1
        res.identical += int(spec == base)
        same = next(
            (i for i, (x, y) in enumerate(zip(spec, base, strict=False)) if x != y), min(len(spec), len(base))
        )
        res.matching_tokens += same
        bar.set_postfix_str(f"tau {res.tau:.3f} speedup {res.speedup:.2f}x", refresh=False)
        bar.update(1)
    bar.close()
    res.seconds = time.perf_counter() - start
    res.phase_seconds = {k: round(v, 4) for k, v in clock.seconds.items()}
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
    """A markdown table of results (one row each): tau and, when measured, both loops' speed."""
    lines = [
        "| draft | algorithm | prompts | max drafts/round | tau | max tau | rounds | drafted | seconds "
        "| target alone tok/s | speculative tok/s | speedup | identical outputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = (
            f"| {r.base_tok_s:.0f} | {r.spec_tok_s:.0f} | **{r.speedup:.2f}x** | {r.identical}/{r.prompts} |"
            if r.spec_seconds
            else "| - | - | - | - |"
        )
        lines.append(
            f"| {r.name} | {r.algorithm} | {r.prompts} | {r.k} | **{r.tau:.3f}** | {r.k + 1} | {r.rounds} "
            f"| {r.drafted} | {r.seconds:.0f} {speed}"
        )
    return "\n".join(lines)


def round_split(r: TauResult) -> str:
    """`verify 1.20 ms, draft 0.80 ms, sync 0.05 ms` per round (speculative loop)."""
    return ", ".join(f"{k} {v:.2f} ms" for k, v in r.round_ms().items())


def eval_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The target's dtype for `draftfeed eval --dtype`: auto = bf16 on GPU, fp32 on CPU; else the named dtype."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return float_dtype(spec)


def run_eval(cfg, model=None, tokenizer=None) -> dict[str, TauResult]:
    """`draftfeed eval`: tau of the exported draft `cfg.draft` (EAGLE-3, DFlash or DSpark, read from its
    config.json) on each prompt set (an `EvalConfig`). The draft's fused kernels are compiled per
    `cfg.compile` (on CUDA by default: a draft step is launch-bound, and each fused RMSNorm, RoPE and gated
    MLP is one kernel instead of several); the switch is restored afterwards."""
    from pathlib import Path

    from draftfeed.target.loading import load_target, load_tokenizer

    from .export import load_draft
    from .loop import resolve_device

    def say(m):
        print(m, file=sys.stderr, flush=True)

    device = resolve_device(cfg.device)
    dtype = eval_dtype(cfg.dtype, device)
    if model is None:
        model = load_target(cfg.target_model, device=device, dtype=dtype)
    tokenizer = tokenizer or load_tokenizer(cfg.target_model)
    exported = load_draft(cfg.draft, model, device=device, dtype=model.dtype)
    if cfg.checkpoint:  # the draft weights of a training checkpoint of the same run
        state = torch.load(
            Path(cfg.checkpoint).expanduser() / "trainer.pt", map_location=device, weights_only=False
        )
        exported.draft.load_state_dict(state["draft"], strict=False)
        say(f"eval: draft weights of {cfg.checkpoint} (step {state.get('step')})")
    if cfg.untrained:  # the baseline: same shapes and vocab map, fresh random weights
        reinitialize(exported.draft)
    k = cfg.num_draft_tokens if exported.algorithm == "eagle3" else block_max_drafts(exported.draft)
    eos = eos_token_ids(tokenizer, model)
    sets = load_prompt_sets(cfg.prompts, tokenizer, cfg.limit)
    longest = max((len(p) for ps in sets.values() for p in ps), default=1)
    static = StaticTarget(
        model,
        exported.layer_ids,
        exported.algorithm,
        k,
        speculative_capacity(longest, cfg.max_new_tokens, k),
        cfg.cuda_graphs,
    )
    compiled = resolve_compile(cfg.compile, device)
    say(
        f"eval: {exported.algorithm} draft, K={k}, CUDA graphs {'on' if static.graphed else 'off'}, "
        f"compiled draft kernels {'on' if compiled else 'off'}"
    )
    results = {}
    for name, prompts in sets.items():
        with compiling_as(compiled):  # the draft's fused kernels, as in training
            r = measure_speedup(
                model, exported.draft, exported.algorithm, exported.layer_ids, prompts, k, cfg.max_new_tokens,
                eos, name, confidence_threshold=cfg.confidence_threshold, graphs=cfg.cuda_graphs, target=static,
                progress=progress_enabled(cfg.progress, sys.stderr),
            )  # fmt: skip
        results[name] = r
        print(
            f"{name}: {exported.algorithm} tau {r.tau:.3f} over {r.rounds} rounds, {r.prompts} prompts, K={k}; "
            f"target alone {r.base_tok_s:.0f} tok/s, with the draft {r.spec_tok_s:.0f} tok/s: speedup "
            f"{r.speedup:.2f}x; identical outputs {r.identical}/{r.prompts}; per round: {round_split(r)}",
            flush=True,
        )
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({k: v.as_dict() for k, v in results.items()}, f, indent=2)
    return results
