"""Acceptance-length evaluation (trainer/evaluate.py): tau = K+1 for a drafter that reproduces the target's
greedy tokens, 1 for one that is always wrong, and the EAGLE-3 drafter's KV cache equals the training forward."""

from __future__ import annotations

import pytest
import torch

from draftfeed.trainer.evaluate import Eagle3ChainDrafter, TargetVerifier, measure_tau
from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

K = 4


@pytest.fixture(scope="module")
def target(tiny_model):
    return tiny_model("llama")


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 150, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@torch.no_grad()
def greedy(model, ids, n):
    """The target's own greedy continuation, recomputed from scratch (no cache)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


class OracleDrafter:
    """Test drafter: proposes the target's greedy tokens (or, `wrong`, a token that is never them)."""

    def __init__(self, model, wrong=False):
        self.model, self.wrong = model, wrong

    def reset(self, prompt):
        self.ids = [prompt[0]]

    def extend(self, aux, next_ids):
        self.ids += next_ids.tolist()

    def propose(self, k):
        out = greedy(self.model, self.ids, k)
        return [(t + 1) % 160 for t in out] if self.wrong else out


def test_tau_is_k_plus_one_for_the_greedy_oracle_and_one_for_a_wrong_drafter(target):
    verifier = TargetVerifier(target)
    good = measure_tau(verifier, OracleDrafter(target), prompts(), K, max_new_tokens=14)
    assert good.tau == K + 1 and good.rounds == 3 * 3  # 1 prefill token + 3 rounds of 5 >= 14
    bad = measure_tau(verifier, OracleDrafter(target, wrong=True), prompts(), K, max_new_tokens=14)
    assert bad.tau == 1.0 and bad.rounds == 3 * 13


def test_committed_text_is_the_targets_greedy_text(target):
    """Verification on the cropped KV cache commits exactly what plain greedy decoding produces."""

    class Recorder(OracleDrafter):
        def reset(self, prompt):
            super().reset(prompt)
            self.prompt = list(prompt)

    for wrong in (False, True):
        rec = Recorder(target, wrong=wrong)
        p = prompts(1, seed=3)[0]
        measure_tau(TargetVerifier(target), rec, [p], K, max_new_tokens=11)
        text = rec.ids[len(p) :]  # committed after the prompt (minus the last round's bonus)
        assert text == greedy(target, p, len(text))


def test_eos_among_accepted_drafts_ends_the_round_without_bonus(target):
    p = prompts(1, seed=4)[0]
    cont = greedy(target, p, 8)
    eos = cont[2]  # the 3rd generated token: prefill gives cont[0], round 1 accepts cont[1], cont[2]=eos
    r = measure_tau(TargetVerifier(target), OracleDrafter(target), [p], K, max_new_tokens=50, eos_ids=[eos])
    assert cont.index(eos) == 2 and r.rounds == 1 and r.committed == 2


def constant_target(tiny_model):
    """The tiny target with a zero final norm: all logits are 0, so its greedy token is always id 0."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_config(tiny_model("llama").config, dtype=torch.float32).eval()
    m.load_state_dict(tiny_model("llama").state_dict())
    with torch.no_grad():
        m.model.norm.weight.zero_()
    return m.requires_grad_(False)


def eagle3_draft(target, vd=None, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = Eagle3DraftConfig.from_target_config(target.config, draft_vocab_size=vd)
    d = Eagle3DraftModel(cfg, embed_weight=target.get_input_embeddings().weight).to(dtype)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return d


def test_eagle3_drafter_tau_through_the_real_draft(tiny_model):
    target = constant_target(tiny_model)
    draft = eagle3_draft(target, dtype=torch.float32)
    with torch.no_grad():
        draft.lm_head.weight.zero_()  # argmax = draft index 0 = target id 0: always right
    r = measure_tau(TargetVerifier(target), Eagle3ChainDrafter(draft), prompts(), K, max_new_tokens=11)
    assert r.tau == K + 1
    ids = torch.arange(5, 5 + 32)  # a draft vocab without id 0: always wrong
    mask = torch.zeros(160, dtype=torch.bool)
    mask[ids] = True
    wrong = eagle3_draft(target, vd=32, dtype=torch.float32)
    wrong.set_vocab_mapping(ids, mask)
    r = measure_tau(TargetVerifier(target), Eagle3ChainDrafter(wrong), prompts(), K, max_new_tokens=11)
    assert r.tau == 1.0 and r.rounds == 3 * 10


@pytest.mark.parametrize("norm_output", [False, True])
def test_cached_chain_equals_the_training_unroll(target, norm_output):
    """Committed rows added in pieces to the KV cache, then a chain of K steps fed the true next tokens,
    give the logits of the TTT unroll at the last committed slot (same attention pattern, same positions)."""
    torch.manual_seed(1)
    draft = eagle3_draft(target, vd=48)
    if norm_output:
        draft.config.norm_output = True
    ids = torch.randperm(160)[:48]
    mask = torch.zeros(160, dtype=torch.bool)
    mask[ids] = True
    draft.set_vocab_mapping(ids, mask)
    s, n = 14, 9  # sequence length; committed rows 0..n-1
    x = torch.randint(0, 160, (1, s + 1))
    aux = torch.randn(1, s, 3 * 32, dtype=torch.float64)
    shifted = x[:, 1:]  # slot t holds x_{t+1}
    unrolled = draft(aux, shifted, torch.ones(1, s, dtype=torch.long), ttt_steps=K)
    drafter = Eagle3ChainDrafter(draft)
    drafter.reset(x[0].tolist())
    drafter.extend(aux[0, :4], shifted[0, :4])
    drafter.extend(aux[0, 4:n], shifted[0, 4:n])
    # step k at slot n-1 embeds x_{n+k}: the chain after d_1 is fed x_{n+1}, x_{n+2}, ...
    forced = [int(t) for t in x[0, n + 1 : n + 1 + K]]
    _, logits = drafter.chain(K, forced=forced)
    for k in range(K):
        torch.testing.assert_close(logits[k], unrolled[k][0, n - 1], rtol=1e-10, atol=1e-10)
    # and the committed rows' own logits equal step 0 at every slot
    h = drafter.last_h
    torch.testing.assert_close(draft.compute_logits(h)[0, -1], unrolled[0][0, n - 1])


def test_draftfeed_eval_on_an_exported_draft(tmp_path, tiny_dirs):
    """`draftfeed eval`: the exported draft against the target read from disk, prompts from an MT-Bench
    style question file and a chat file; the JSON report matches the printed results."""
    import json
    import shutil

    from test_loop import word_tokenizer

    from draftfeed.server.cli import main
    from draftfeed.target.loading import load_target
    from draftfeed.trainer.export import export_eagle3

    tdir = tmp_path / "target"
    shutil.copytree(tiny_dirs("llama"), tdir)
    word_tokenizer().save_pretrained(tdir)
    target = load_target(tdir)
    draft = eagle3_draft(target, dtype=torch.float32)
    export_eagle3(draft, tmp_path / "draft", target.config, [1, 3, 4], 8)
    (tmp_path / "q.jsonl").write_text(
        "".join(
            json.dumps({"question_id": i, "turns": [f"the quick fox {w}", "more"]}) + "\n"
            for i, w in enumerate(["dog", "hex"])
        )
    )
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "brown jugs"}]}) + "\n"
    )
    out = tmp_path / "tau.json"
    argv = ["eval", "--draft", str(tmp_path / "draft"), "--target-model", str(tdir), "--device", "cpu",
            "--prompts", f"{tmp_path / 'q.jsonl'},{tmp_path / 'c.jsonl'}", "--max-new-tokens", "9",
            "--num-draft-tokens", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    got = json.loads(out.read_text())
    q, c = got[str(tmp_path / "q.jsonl")], got[str(tmp_path / "c.jsonl")]
    assert q["prompts"] == 2 and c["prompts"] == 1
    # every round commits the bonus token plus 0..3 accepted drafts
    assert q["rounds"] >= 1 and q["rounds"] <= q["committed"] <= 4 * q["rounds"]
    assert q["tau"] == q["committed"] / q["rounds"]
    assert main(argv + ["--untrained", "--limit", "1"]) == 0
    assert json.loads(out.read_text())[str(tmp_path / "q.jsonl")]["prompts"] == 1


def test_eval_progress_bar(target, capsys):
    """`--progress on` (auto on a terminal): a bar of prompts with the running tau on stderr."""
    verifier = TargetVerifier(target)
    measure_tau(verifier, OracleDrafter(target), prompts(), K, max_new_tokens=14, name="set", progress=True)
    err = capsys.readouterr().err
    assert "set: 100%" in err and "3/3" in err and f"tau {K + 1:.3f}" in err, err
    measure_tau(verifier, OracleDrafter(target), prompts(), K, max_new_tokens=14, name="set")
    assert "set:" not in capsys.readouterr().err


# ---------------------------------------------------------------- speedup: both loops on the static cache


def test_static_loops_give_the_targets_greedy_tokens_and_the_same_tau_as_the_reference(target):
    """The target-alone loop and the speculative loop on the static cache both commit exactly the target's
    greedy text, and the device-side EAGLE-3 drafter accepts exactly what the reference chain drafter does
    (same rounds, same committed tokens)."""
    from draftfeed.trainer.evaluate import StaticTarget, decode_speculative, decode_target_alone

    draft = eagle3_draft(target, vd=None, dtype=torch.float32, seed=2)
    ps = prompts(3, seed=5)
    ref = measure_tau(TargetVerifier(target), Eagle3ChainDrafter(draft), ps, K, max_new_tokens=17)
    static = StaticTarget(target, None, "eagle3", K, max_len=64)
    from draftfeed.trainer.evaluate import StaticEagle3Drafter, TauResult

    drafter = StaticEagle3Drafter(draft, static)
    res = TauResult("t", k=K, accept_hist=[0] * (K + 2))
    for p in ps:
        base = decode_target_alone(static, p, 17, eos=set())
        assert base == greedy(target, p, 17)
        assert decode_speculative(static, drafter, p, 17, set(), res) == base
    assert (res.rounds, res.committed) == (ref.rounds, ref.committed)
    # a host-side drafter through the same verify graph: the oracle reaches K + 1
    oracle = TauResult("t", k=K, accept_hist=[0] * (K + 2))
    p = ps[0]
    assert decode_speculative(static, OracleDrafter(target), p, 16, set(), oracle) == greedy(target, p, 16)
    assert oracle.tau == K + 1


def test_eos_stops_both_static_loops_at_the_same_token(target):
    from draftfeed.trainer.evaluate import StaticTarget, TauResult, decode_speculative, decode_target_alone

    p = prompts(1, seed=4)[0]
    cont = greedy(target, p, 12)
    eos = {cont[5]}
    static = StaticTarget(target, None, "eagle3", K, max_len=64)
    base = decode_target_alone(static, p, 40, eos, check_every=4)
    assert base == cont[: cont.index(cont[5]) + 1]
    res = TauResult("t", k=K, accept_hist=[0] * (K + 2))
    assert decode_speculative(static, OracleDrafter(target), p, 40, eos, res) == base


def test_pipelined_device_rounds_stop_at_an_eos_where_the_reference_does(target):
    """The device-side rounds are pipelined (the next round is queued before the host reads this one):
    an eos mid-text still ends each prompt at the same token, with the rounds and tokens of the reference
    chain drafter; the round queued past the end is not counted."""
    from draftfeed.trainer.evaluate import (
        StaticEagle3Drafter,
        StaticTarget,
        TauResult,
        decode_speculative,
        decode_target_alone,
    )

    draft = eagle3_draft(target, vd=None, dtype=torch.float32, seed=2)
    ps = prompts(3, seed=5)
    eos = {greedy(target, p, 12)[6] for p in ps}  # a token each prompt's greedy text reaches
    ref = measure_tau(
        TargetVerifier(target), Eagle3ChainDrafter(draft), ps, K, max_new_tokens=30, eos_ids=eos
    )
    static = StaticTarget(target, None, "eagle3", K, max_len=80)
    drafter = StaticEagle3Drafter(draft, static)
    res = TauResult("t", k=K, accept_hist=[0] * (K + 2))
    for p in ps:
        base = decode_target_alone(static, p, 30, eos)
        assert base[-1] in eos and len(base) <= 7
        assert decode_speculative(static, drafter, p, 30, eos, res) == base
    assert (res.rounds, res.committed) == (ref.rounds, ref.committed)


def test_measure_speedup_reports_real_timings_and_identical_outputs(target):
    from draftfeed.trainer.evaluate import measure_speedup, round_split, tau_table

    draft = eagle3_draft(target, dtype=torch.float32, seed=3)
    r = measure_speedup(target, draft, "eagle3", None, prompts(3, seed=6), K, 12, name="set", progress=False)
    assert r.prompts == 3 and r.identical == 3 and r.tokens == 3 * 12
    assert r.base_seconds > 0 and r.spec_seconds > 0
    assert r.speedup == r.base_seconds / r.spec_seconds
    assert r.base_tok_s == r.tokens / r.base_seconds and r.spec_tok_s == r.tokens / r.spec_seconds
    ms = r.round_ms()
    assert set(ms) >= {"verify", "draft", "sync"} and all(v > 0 for v in ms.values())
    d = r.as_dict()
    assert {"speedup", "base_tok_s", "spec_tok_s", "identical", "round_ms"} <= set(d)
    assert f"**{r.speedup:.2f}x**" in tau_table([r]) and "verify" in round_split(r)


class _OracleDrafter:
    """A device-side drafter that proposes the target's own greedy continuation: every round accepts all K,
    so the pipelined loop writes as far past the text as it ever can."""

    device_side = True

    def __init__(self, target, sequence: list[int]):
        self.t, self.seq = target, sequence

    def prefill(self, aux, next_ids):
        self.propose()

    def commit(self):
        pass

    def propose(self):
        c = int(self.t.start)  # the column of the last committed token (the verify's input 0)
        k = self.t.k
        self.t.vids[1:].copy_(torch.tensor(self.seq[c + 1 : c + 1 + k]))
        self.t.ndrafts.fill_(k)


@pytest.mark.parametrize("k,new", [(7, 35), (10, 36)])
def test_the_static_cache_holds_the_pipelined_rounds_of_a_draft_that_is_always_right(target, k, new):
    """`speculative_capacity` (what eval and measure_speedup size the cache with) leaves room for the round
    queued past the last useful one when every round accepts all K; eval used to size it K + 8 past the end,
    which K = 10 overruns when the last read leaves max_new_tokens - 2 (36 = 1 + 3 x 11 + 2)."""
    from draftfeed.trainer.evaluate import (
        StaticTarget,
        TauResult,
        decode_speculative,
        decode_target_alone,
        speculative_capacity,
    )

    prompt = prompts(1)[0]
    wide = StaticTarget(target, [1, 3, 5], "eagle3", k, len(prompt) + new + 8 * k, graphs=False)
    seq = list(prompt) + decode_target_alone(wide, prompt, new + 4 * k, set())
    fits = StaticTarget(
        target, [1, 3, 5], "eagle3", k, speculative_capacity(len(prompt), new, k), graphs=False
    )
    res = TauResult("oracle", k=k, accept_hist=[0] * (k + 2))
    out = decode_speculative(fits, _OracleDrafter(fits, seq), prompt, new, set(), res)
    assert out == seq[len(prompt) : len(prompt) + new] and res.tau == k + 1  # every round took all K
    short = StaticTarget(target, [1, 3, 5], "eagle3", k, len(prompt) + new + k + 8, graphs=False)
    if k == 10:  # the old size: the queued round writes past the cache
        with pytest.raises((IndexError, RuntimeError)):
            decode_speculative(
                short,
                _OracleDrafter(short, seq),
                prompt,
                new,
                set(),
                TauResult("x", k=k, accept_hist=[0] * (k + 2)),
            )
