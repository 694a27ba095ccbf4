"""Block drafting on the static draft KV cache (trainer/static_drafting.py): the device-side DFlash / DSpark
proposals equal the eager `BlockDrafter`'s token for token, round after round (DSpark with and without its
confidence early stop), speculative decoding with them commits the target's own greedy text, and
`measure_speedup` on a block draft counts what `measure_tau` does. On a GPU the captured graphs propose what
the same functions do eagerly."""

from __future__ import annotations

import copy

import pytest
import torch

from draftfeed.trainer.evaluate import (
    BlockDrafter,
    StaticTarget,
    TargetVerifier,
    TauResult,
    decode_speculative,
    decode_target_alone,
    measure_speedup,
    measure_tau,
)
from draftfeed.trainer.models.dflash import DFlashConfig, DFlashDraft
from draftfeed.trainer.models.dspark import DSparkConfig, DSparkDraft
from draftfeed.trainer.static_drafting import StaticBlockDrafter, block_max_drafts

BS = 4
IDS = [1, 3, 5]
CASES = [("dflash", 0.0), ("dspark", 0.0), ("dspark", 0.5)]
CASE_IDS = ["dflash", "dspark", "dspark-theta"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def half_target(tiny_model):
    """The tiny target with a zero final norm (its greedy token is always 0) and an lm_head that is 0 but
    for row 5 = w (random): a draft scoring hidden state h with it proposes 5 where w.h > 0 and 0 (the
    target's token, the first of the tied maxima) elsewhere, so about half the drafts are accepted, depending on
    the context the draft has seen."""
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    m = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32).eval()
    m.load_state_dict(src.state_dict())
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.lm_head.weight.zero_()
        m.lm_head.weight[5] = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return m.requires_grad_(False)


def block_draft(algorithm, target, seed=0):
    """A draft whose layers' weights are large enough (std 0.2, not the init's 0.02) that its proposals
    depend on the context features it attends to."""
    torch.manual_seed(seed)
    fields = dict(target_layer_ids=IDS, num_layers=2, block_size=BS)
    if algorithm == "dflash":
        cfg = DFlashConfig.from_target_config(target.config, **fields)
        draft = DFlashDraft(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    else:
        cfg = DSparkConfig.from_target_config(target.config, **fields, markov_rank=8)
        draft = DSparkDraft(cfg).copy_target_weights(
            target.get_input_embeddings(), target.get_output_embeddings()
        )
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.startswith(("fc.", "layers.")) and p.dim() == 2:
                p.normal_(0, 0.2)
        if algorithm == "dspark":
            draft.markov_head.markov_w2.weight.zero_()  # no Markov bias: the lm_head decides, as for DFlash
            draft.confidence_head.proj.weight.normal_()  # confidences spread around 0.5
    return draft


def prompts(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 150, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


class Checked:
    """The static drafter inside `decode_speculative`, and beside it the eager `BlockDrafter` fed the same
    commits from the host: after every proposal the drafts in the verify input (and their count) must be
    the eager drafter's."""

    device_side = True

    def __init__(self, static: StaticBlockDrafter, eager: BlockDrafter, target: StaticTarget):
        self.static, self.eager, self.t = static, eager, target
        self.rounds: list[list[int]] = []

    def prefill(self, aux, next_ids):
        self.eager.reset(())
        self.eager.extend(aux, next_ids)
        self.static.prefill(aux, next_ids)
        self.check()

    def commit(self):
        a = int(self.t.accept)
        self.eager.extend(self.t.vaux[: a + 1].clone(), self.t.vpred[: a + 1].clone())
        self.static.commit()

    def propose(self):
        self.static.propose()
        self.check()

    def check(self):
        got = self.t.vids[1 : 1 + int(self.t.ndrafts)].tolist()
        want = self.eager.propose(self.t.k)
        assert got == want, (len(self.rounds), got, want)
        self.rounds.append(got)


@pytest.mark.parametrize("algorithm, theta", CASES, ids=CASE_IDS)
def test_static_block_proposals_equal_the_eager_drafters(half_target, algorithm, theta):
    draft = block_draft(algorithm, half_target)
    k = block_max_drafts(draft)
    static = StaticTarget(half_target, IDS, algorithm, k, max_len=64)
    checked = Checked(StaticBlockDrafter(draft, static, theta), BlockDrafter(draft, theta), static)
    res = TauResult("t", k=k, accept_hist=[0] * (k + 2))
    # each prompt's proposals that a counted round verified: the rounds are pipelined, so after the last one
    # a proposal (and maybe a round queued before the host saw the prompt was done) is never counted
    verified = []
    for p in prompts():
        base = decode_target_alone(static, p, 24, eos=set())
        assert base == [0] * 24
        first, rounds = len(checked.rounds), res.rounds
        assert decode_speculative(static, checked, p, 24, set(), res) == base
        assert len(checked.rounds) - first - (res.rounds - rounds) in (1, 2)
        verified += checked.rounds[first : first + res.rounds - rounds]
    assert len(verified) == res.rounds >= 3 * 6
    assert res.accept_hist[1] > 0 and sum(res.accept_hist[2:]) > 0  # rejections and acceptances both
    assert res.drafted == sum(len(r) for r in verified)
    lengths = {len(r) for r in verified}
    assert lengths == {k} if theta == 0 else (min(lengths) < k and len(lengths) > 1)


@pytest.mark.parametrize("algorithm, theta", CASES, ids=CASE_IDS)
def test_measure_speedup_on_a_block_draft_counts_what_measure_tau_does(half_target, algorithm, theta):
    """The same rounds, accepted and drafted tokens as the eager reference loop, the target's own outputs,
    and the per-round split of the speculative time."""
    target = half_target
    draft = block_draft(algorithm, target)
    k = block_max_drafts(draft)
    ps = prompts()
    ref = measure_tau(TargetVerifier(target, IDS, algorithm), BlockDrafter(draft, theta), ps, k, 24)
    r = measure_speedup(target, draft, algorithm, IDS, ps, k, 24, confidence_threshold=theta, progress=False)
    assert (r.rounds, r.committed, r.drafted, r.accept_hist) == (
        ref.rounds, ref.committed, ref.drafted, ref.accept_hist,
    )  # fmt: skip
    assert r.accept_hist[1] > 0 and sum(r.accept_hist[2:]) > 0
    assert r.identical == r.prompts == 3 and r.tokens == 3 * 24
    ms = r.round_ms()
    assert set(ms) >= {"verify", "draft", "sync"} and all(v > 0 for v in ms.values())


class Twins:
    """A graphed and an eager static drafter, each with its own cache, on one target: every proposal of the
    graph must equal the eager one's (drafts, count, the whole block)."""

    device_side = True

    def __init__(self, graphed: StaticBlockDrafter, eager: StaticBlockDrafter, target: StaticTarget):
        self.graphed, self.eager, self.t = graphed, eager, target
        self.proposals = 0

    def prefill(self, aux, next_ids):
        self.eager._context(aux, torch.arange(aux.shape[0], device=aux.device))
        self.graphed._context(aux, torch.arange(aux.shape[0], device=aux.device))
        self.propose()

    def commit(self):
        self.eager.commit()
        self.graphed.commit()

    def propose(self):
        self.eager.propose()
        want = (self.t.vids.clone(), self.t.ndrafts.clone(), self.eager.tokens.clone())
        self.graphed.propose()
        got = (self.t.vids, self.t.ndrafts, self.graphed.tokens)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), (self.proposals, g, w)
        self.proposals += 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algorithm, theta", CASES, ids=CASE_IDS)
def test_graphed_block_drafter_equals_the_eager_one_on_cuda(tiny_model, algorithm, theta, dtype):
    target = copy.deepcopy(tiny_model("llama")).to("cuda", dtype)
    draft = block_draft(algorithm, target).to("cuda", dtype)
    k = block_max_drafts(draft)
    static = StaticTarget(target, IDS, algorithm, k, max_len=96)
    graphed = StaticBlockDrafter(draft, static, theta, graphs=True)
    assert graphed.graphed and static.graphed
    twins = Twins(graphed, StaticBlockDrafter(draft, static, theta, graphs=False), static)
    res = TauResult("t", k=k, accept_hist=[0] * (k + 2))
    for p in prompts():
        base = decode_target_alone(static, p, 32, eos=set())
        spec = decode_speculative(static, twins, p, 32, set(), res)
        assert spec == base or dtype == torch.bfloat16  # bf16: a near-tie may flip between verify and decode
    assert twins.proposals >= 3 * 8
    r = measure_speedup(target, draft, algorithm, IDS, prompts(), k, 32, confidence_threshold=theta)
    assert r.graphs and (r.identical == r.prompts or dtype == torch.bfloat16)
    assert set(r.round_ms()) >= {"verify", "draft", "sync"}
