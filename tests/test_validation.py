"""Validation while training (trainer/validation.py): held-out conversations measured through the same
backend every --val-every steps, without changing the training; `draftfeed regenerate` answers the held-out
first turns for --val-data; remote and in-process validations agree; bad validation input is a clear error."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from test_loop import make_cfg, target_dir, word_tokenizer, write_chats  # noqa: F401 - fixture
from test_regenerate import greedy_answer, sharp_target  # noqa: F401 - fixture

from draftfeed.client.errors import InvalidArgument
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.trainer import cli as trainer_cli
from draftfeed.trainer.config import ConfigError
from draftfeed.trainer.train import build_run, run_training

BLOCK = {"block_size": 4, "num_anchors": 6, "num_layers": 1, "chunk_rows": 16}


def records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_validation_leaves_training_exactly_as_it_was(tmp_path, target_dir):  # noqa: F811
    """DSpark draws its anchors from a generator: a validation that drew from it (or from the global RNG)
    would change every later step. Losses and gradient norms equal a run without validation."""
    data = write_chats(tmp_path / "chats.jsonl", 30)
    common = {"algorithm": "dspark", "block": BLOCK, "dspark": {"markov_rank": 8}}
    held = {"path": data, "holdout": 6}
    plain = run_training(
        make_cfg(tmp_path / "plain", target_dir, data, data=held, loop={"val_every": 0}, **common)
    )
    checked = run_training(
        make_cfg(tmp_path / "val", target_dir, data, data=held, loop={"val_every": 2}, **common)
    )
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in checked.history]
    assert [h["grad_norm"] for h in plain.history] == [h["grad_norm"] for h in checked.history]
    assert not (tmp_path / "plain/validation.jsonl").exists()
    rows = records(tmp_path / "val/validation.jsonl")
    assert [r["step"] for r in rows] == [2, 4]
    assert {"val_loss", "val_tau_train", "val_accuracy", "val_tokens", "val_seconds"} <= set(rows[0])
    assert rows[0]["val_tokens"] > 0 and rows[0]["val_loss"] != rows[1]["val_loss"]  # the draft moved
    # training metrics stay in metrics.jsonl only
    assert all("val_loss" not in r for r in records(tmp_path / "val/metrics.jsonl"))


def test_by_default_the_run_validates_at_its_checkpoints_and_at_the_end(tmp_path, target_dir):  # noqa: F811
    data = write_chats(tmp_path / "chats.jsonl", 30)
    run_training(
        make_cfg(tmp_path / "o", target_dir, data, data={"holdout": 6}, loop={"steps": 5, "save_every": 2})
    )
    assert [r["step"] for r in records(tmp_path / "o/validation.jsonl")] == [2, 4, 5]
    run_training(make_cfg(tmp_path / "none", target_dir, data, loop={"steps": 2}))  # nothing held out
    assert not (tmp_path / "none/validation.jsonl").exists()


def test_regenerate_answers_the_held_out_first_turns_and_a_remote_run_validates_on_them(
    tmp_path,
    sharp_target,  # noqa: F811
):
    """`draftfeed regenerate --data-holdout N` writes the held-out first turns with the target's own answers
    (what `draftfeed eval` decodes); training with --val-data on them gives the same validation in process
    and through a server."""
    target = tmp_path / "target"
    sharp_target.save_pretrained(target)
    tok = word_tokenizer()
    tok.save_pretrained(target)
    data = write_chats(tmp_path / "chats.jsonl", 20)
    out = tmp_path / "regen"
    parser = argparse.ArgumentParser()
    trainer_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["regenerate", "--target-model", str(target), "--data", data, "--data-holdout", "4",
         "--regen-max-new-tokens", "5", "--regen-max-turns", "1", "--device", "cpu", "--out", str(out)]
    )  # fmt: skip
    assert trainer_cli._run_regenerate(args) == 0
    heldout = out / "regenerated.heldout.jsonl"
    val = [r["messages"] for r in records(heldout)]
    prompts = [r["messages"] for r in records(out / "heldout_prompts.jsonl")]
    assert [v[:-1] for v in val] == prompts  # the held-out first user turns, in order
    for v in val:  # each answered by the target itself, greedy
        assert v[-1]["role"] == "assistant" and v[-1]["content"] == greedy_answer(
            sharp_target, tok, v[:-1], 5
        )
    trained = {r["messages"][0]["content"] for r in records(out / "regenerated.jsonl")}
    assert len(trained) == 16 and not trained & {p[0]["content"] for p in prompts}  # never trained on

    srv = TargetServer(ServeConfig(port=0, model=str(target))).start()
    try:
        runs = {}
        for name, remote in (("local", {}), ("remote", {"url": [srv.url]})):
            cfg = make_cfg(
                tmp_path / name, str(target), str(out / "regenerated.jsonl"),
                target={"model": str(target), **remote}, data={"val_path": str(heldout)},
                loop={"steps": 2, "val_every": 1},
            )  # fmt: skip
            run_training(cfg)
            runs[name] = records(tmp_path / name / "validation.jsonl")
    finally:
        srv.stop(grace=0)
    strip = [{k: v for k, v in r.items() if k != "val_seconds"} for r in runs["local"]]
    assert [r["step"] for r in strip] == [1, 2] and "val_tau_sim" in strip[0]
    assert strip == [{k: v for k, v in r.items() if k != "val_seconds"} for r in runs["remote"]]


def test_bad_validation_input_is_a_clear_error(tmp_path, target_dir, capsys):  # noqa: F811
    data = write_chats(tmp_path / "chats.jsonl", 12)
    with pytest.raises(ConfigError, match="--val-data .*no such file"):
        make_cfg(tmp_path / "o", target_dir, data, data={"val_path": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ConfigError, match="--val-every -1 must be >= 0"):
        make_cfg(tmp_path / "o", target_dir, data, loop={"val_every": -1})
    # one held-out conversation cannot fill a batch of 2 rows: asked for, an error said before any step, with
    # what to do; by default (only --data-holdout) the run trains without validation and says why
    with pytest.raises(InvalidArgument, match="fill no batch .* --val-every 0"):
        build_run(make_cfg(tmp_path / "one", target_dir, data, data={"holdout": 1}, loop={"val_every": 2}))
    run = build_run(make_cfg(tmp_path / "dflt", target_dir, data, data={"holdout": 1}))
    run.close()
    assert not run.trainer.val_batches and "validation off: the 1 validation conversations fill no batch" in (
        capsys.readouterr().err
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "fox"}]}) + "\n")
    with pytest.raises(InvalidArgument, match="--val-data .*no usable conversation"):
        build_run(make_cfg(tmp_path / "e", target_dir, data, data={"val_path": str(empty)}))


def test_decode_walk_replays_rounds_over_each_answer():
    from draftfeed.trainer.losses import decode_walk

    run = torch.tensor([[2, 0, 3, 1, 0, 5, 0], [7, 7, 7, 7, 7, 7, 7]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 1], [0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # row 0: span 0..4: commit 3 (2 drafts + bonus) at 0, then 2 at 3 (capped at the span's end); span 6: 1
    # row 1: span 1..3: 3 tokens in one round (the run is longer than what is left)
    assert decode_walk(run, valid) == (4, 9)
    # the first 3 tokens of each answer (`draftfeed eval --max-new-tokens 3`): the prompt's forward gives the
    # first, the walk the next 2 slots: row 0 commits 2 at 0 (capped), span 6 commits 1; row 1 commits 2
    assert decode_walk(run, valid, max_tokens=3) == (3, 5)
    assert decode_walk(run, valid, max_tokens=100) == decode_walk(run, valid)


@pytest.mark.parametrize(
    ("ttt", "new"), [(3, None), (7, 40)]
)  # new: --val-answer-tokens = eval's max_new_tokens
def test_the_validation_decoding_tau_is_what_decoding_the_held_out_prompts_gives(
    tmp_path,
    sharp_target,  # noqa: F811
    ttt,
    new,
):
    """val_tau_decode reads the TTT unroll the way greedy speculative decoding proceeds: it matches
    measure_tau on the same prompts (the answers are the target's greedy ones, K = the unroll's steps), where
    the slot-averaged tau_sim reads high (it also counts the slots a decoding round skips)."""
    from draftfeed.target.loading import load_target, load_tokenizer
    from draftfeed.trainer.evaluate import (
        Eagle3ChainDrafter,
        StaticEagle3Drafter,
        StaticTarget,
        TargetVerifier,
        TauResult,
        decode_speculative,
        measure_tau,
        prompt_token_ids,
        speculative_capacity,
    )
    from draftfeed.trainer.export import load_draft

    target = tmp_path / "target"
    sharp_target.save_pretrained(target)
    word_tokenizer().save_pretrained(target)
    data = write_chats(tmp_path / "chats.jsonl", 24, turns=(1, 1))
    answers = 120
    cfg = make_cfg(
        tmp_path / "o", str(target), data,
        data={"holdout": 8, "regenerate": True, "regen_max_new_tokens": answers, "seq_len": 160},
        eagle3={"ttt_steps": ttt},
        optim={"lr": 1e-2},
        loop={"steps": 60, "val_every": 60, "log_every": 60, **({"val_answer_tokens": new} if new else {})},
    )  # fmt: skip
    run_training(cfg)
    (rec,) = records(tmp_path / "o/validation.jsonl")
    model, tok = load_target(str(target)), load_tokenizer(str(target))
    exp = load_draft(tmp_path / "o/export", model, device="cpu", dtype=torch.float32)
    val = [r["messages"] for r in records(cfg.heldout_regen_path())]
    prompts = [prompt_token_ids(tok, v[:-1]) for v in val]
    k = cfg.eagle3.ttt_steps
    new = new or answers + 1  # the whole answers (the default 256 covers them)
    res = measure_tau(TargetVerifier(model, exp.layer_ids), Eagle3ChainDrafter(exp.draft), prompts, k, new)
    # decoded 3.16 / 6.36 here: rounds accept several drafts, so the agreement below compares real chains (an
    # untrained draft decodes at ~1.0, where walk and tau_sim would both agree trivially)
    assert res.tau > 2.5, res.tau
    # measured here (K = 3, whole answers / K = 7, their first 40 tokens): decode 3.16 / 6.36, val_tau_decode
    # 3.11 / 6.24, val_tau_sim 3.71 / 7.24 (K = 7 over the whole answers: decode 4.95, walk 4.79; the answers'
    # last slots differ: the text ends with the template's eos, decoding runs to max_new_tokens)
    assert abs(rec["val_tau_decode"] - res.tau) < 0.05 * res.tau, (rec, res.tau)
    assert abs(rec["val_tau_decode"] - res.tau) < abs(rec["val_tau_sim"] - res.tau), (rec, res.tau)
    # `draftfeed eval`'s own loop (static cache, device-side drafter; CUDA graphs off on the CPU) accepts the
    # same drafts round for round on this draft, which accepts several a round
    cap = speculative_capacity(max(map(len, prompts)), new, k)
    static = StaticTarget(model, exp.layer_ids, "eagle3", k, cap, graphs=False)
    drafter = StaticEagle3Drafter(exp.draft, static, graphs=False)
    got = TauResult("static", k=k, accept_hist=[0] * (k + 2))
    for p in prompts:
        decode_speculative(static, drafter, p, new, set(), got)
    assert (got.rounds, got.committed, got.accept_hist) == (res.rounds, res.committed, res.accept_hist)


def test_demo_jobs_validate_on_held_out_answers_made_once_before_them(tmp_path, sharp_target, capsys):  # noqa: F811
    """demo-train's jobs (threads of one process, one regenerated file) validate on the held-out answers that
    `train_concurrently` makes once before starting them, not on answers each job writes at the same time."""
    from draftfeed.trainer.demo import train_concurrently

    target = tmp_path / "target"
    sharp_target.save_pretrained(target)
    word_tokenizer().save_pretrained(target)
    data = write_chats(tmp_path / "chats.jsonl", 20)
    srv = TargetServer(ServeConfig(port=0, model=str(target))).start()
    regen = {
        "regenerate": True,
        "holdout": 4,
        "regen_max_new_tokens": 6,
        "regen_cache": str(tmp_path / "r.jsonl"),
    }
    try:
        cfgs = {
            a: make_cfg(
                tmp_path / a,
                str(target),
                data,
                algorithm=a,
                block=BLOCK,
                dspark={"markov_rank": 8},
                target={"url": [srv.url]},
                data=regen,
                loop={"steps": 2},
            )  # fmt: skip
            for a in ("eagle3", "dspark")
        }
        from draftfeed.target.loading import load_target

        train_concurrently(cfgs, load_target(str(target)), srv.info.fingerprint, threads_per_job=1)
    finally:
        srv.stop(grace=0)
    held = records(tmp_path / "r.heldout.jsonl")
    assert len(held) == 4 and all(len(r["messages"]) == 2 for r in held)
    assert (
        capsys.readouterr().err.count(f"regenerate: reusing {tmp_path / 'r.heldout.jsonl'}") == 2
    )  # both jobs
    for a in cfgs:
        assert [r["step"] for r in records(tmp_path / a / "validation.jsonl")] == [2]
