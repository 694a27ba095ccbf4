"""The training loop (trainer/loop.py) through trainer/train.py and the CLI: remote == in-process, the loss
goes down, resume is bit-identical, packing == padding, DDP on two CPU processes; config sources."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from test_repo import run_while_it_progresses

from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.trainer.algorithms import ALGORITHMS
from draftfeed.trainer.config import ConfigError, TrainConfig, add_flags, build_config, config_from_dict
from draftfeed.trainer.data import TokenBatchIterator
from draftfeed.trainer.loop import Trainer, lr_lambda
from draftfeed.trainer.train import run_training

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bright jugs".split()
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def word_tokenizer():
    """A word-level fast tokenizer whose ids (< 32) fit the tiny targets' vocab of 160."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    hf.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    hf.chat_template = TEMPLATE
    return hf


def write_chats(path, n: int, seed: int = 0, turns=(1, 2)) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            conv = []
            for _ in range(rng.randint(*turns)):
                conv.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))})
                conv.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))})
            f.write(json.dumps({"conversations": conv}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def target_dir(tiny_dirs, tmp_path_factory):
    """The tiny Llama checkpoint with the word tokenizer saved beside it (what --target-model points at)."""
    d = tmp_path_factory.mktemp("target")
    shutil.copytree(tiny_dirs("llama"), d, dirs_exist_ok=True)
    word_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 24)


@pytest.fixture(scope="module")
def server(target_dir):
    """A server of the tiny target and its tokenizer (GetTokenizer: a remote run checks its --target-model
    tokenizer against it)."""
    from draftfeed.target.loading import load_target, load_tokenizer

    model, tokenizer = load_target(target_dir), load_tokenizer(target_dir)
    srv = TargetServer(ServeConfig(port=0), model=model, tokenizer=tokenizer).start()
    yield srv
    srv.stop(grace=1)


def make_cfg(out, target_dir, data_file, **sections) -> TrainConfig:
    values = {
        "out": str(out),
        "target": {"model": target_dir},
        "data": {"path": data_file, "seq_len": 48, "batch_size": 2},
        "eagle3": {"draft_vocab_size": 24, "ttt_steps": 3},
        "optim": {"lr": 3e-3},
        "loop": {"steps": 4, "log_every": 2, "prefetch": 3, "device": "cpu"},
    }
    for name, over in sections.items():
        values[name] = {**values.get(name, {}), **over} if isinstance(over, dict) else over
    return config_from_dict(TrainConfig, values)


def losses(result):
    return [h["loss"] for h in result.history]


# ---------------------------------------------------------------- schedule and config


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    f = lr_lambda(100, 5, 0.1)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == pytest.approx(1.0) and f(100) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(5 + 95 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 47 / 95)))
    assert all(f(s) >= f(s + 1) for s in range(5, 120))


def test_a_time_budget_paces_the_schedule_whichever_ends_first():
    spent = [0.0]
    f, steps = lr_lambda(100, 5, 0.1, lambda: spent[0]), lr_lambda(100, 5, 0.1)
    assert [f(s) for s in (2, 50, 95)] == pytest.approx([steps(s) for s in (2, 50, 95)])  # no time spent
    spent[0] = 0.025  # half the warmup's share of the time at step 0
    assert f(0) == pytest.approx(0.5)
    spent[0] = 0.05 + 0.95 / 2  # half the cosine's share of the time at step 10: the cosine's middle
    assert f(10) == pytest.approx(0.1 + 0.9 * 0.5) and f(2) == pytest.approx(0.1 + 0.9 * 0.5)
    spent[0] = 1.3  # past the budget: the floor
    assert f(10) == pytest.approx(0.1)
    spent[0] = 0.1  # the steps ahead of the clock: the steps pace it
    assert f(95) == pytest.approx(steps(95))


def test_yaml_config_with_flags_overriding_it(tmp_path, target_dir, data_file):
    (tmp_path / "c.yaml").write_text(
        f"out: {tmp_path}/o\ntarget: {{model: {target_dir}}}\ndata: {{path: {data_file}, seq_len: 96}}\n"
        "optim: {lr: 0.5, betas: [0.8, 0.9]}\nloop: {steps: 7}\n"
    )
    p = argparse.ArgumentParser()
    p.add_argument("algorithm")
    add_flags(p, TrainConfig)
    args = p.parse_args(
        ["eagle3", "--lr", "0.01", "--pack", "--target", "grpc://h:1,grpc://h:2", "--layer-ids", "1,2,3"]
    )
    cfg = build_config(TrainConfig, args, str(tmp_path / "c.yaml"))
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == [0.8, 0.9] and cfg.loop.steps == 7
    assert cfg.data.seq_len == 96 and cfg.data.pack and cfg.target.layer_ids == [1, 2, 3]
    assert cfg.target.url == ["grpc://h:1", "grpc://h:2"] and cfg.target.model == target_dir
    with pytest.raises(ConfigError, match="--lr -1"):
        build_config(TrainConfig, p.parse_args(["eagle3", "--lr", "-1"]), str(tmp_path / "c.yaml"))
    (tmp_path / "bad.yaml").write_text("out: x\noptim: {learning_rate: 1}\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*valid keys in optim: .*lr"):
        build_config(TrainConfig, p.parse_args(["eagle3"]), str(tmp_path / "bad.yaml"))


# ---------------------------------------------------------------- training


def test_remote_and_in_process_training_give_identical_losses(tmp_path, target_dir, data_file, server):
    local = run_training(make_cfg(tmp_path / "local", target_dir, data_file))
    remote = run_training(make_cfg(tmp_path / "remote", target_dir, data_file, target={"url": [server.url]}))
    assert len(local.history) == 4 and losses(local) == losses(remote)
    assert [h["grad_norm"] for h in local.history] == [h["grad_norm"] for h in remote.history]
    a = torch.load(tmp_path / "local/checkpoints/step_0000004/trainer.pt", weights_only=False)["draft"]
    b = torch.load(tmp_path / "remote/checkpoints/step_0000004/trainer.pt", weights_only=False)["draft"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "remote/export/model.safetensors").is_file()
    lines = [json.loads(x) for x in (tmp_path / "remote/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and {
        "loss",
        "accuracy",
        "tau_sim",
        "tokens_per_s",
        "lr",
    } <= set(lines[0])


def test_a_draft_that_keeps_the_whole_vocabulary_trains_through_the_server(
    tmp_path, target_dir, data_file, server
):
    """A draft vocab as large as the target's still sends a (identity) mapping: a remote session
    answers nothing before it has one, so this run used to stop at its first batch."""
    full = {"eagle3": {"draft_vocab_size": 160}, "loop": {"steps": 2}}
    local = run_training(make_cfg(tmp_path / "local", target_dir, data_file, **full))
    remote = run_training(
        make_cfg(tmp_path / "remote", target_dir, data_file, target={"url": [server.url]}, **full)
    )
    assert len(remote.history) == 2 and losses(local) == losses(remote)


def test_loss_goes_down_on_a_tiny_overfit_set(tmp_path, target_dir):
    """Against a target with peaked next-token distributions (its lm_head scaled up, so the soft-CE floor,
    the target's entropy, is low), a few chats are learnt: loss and accuracy move far."""
    from transformers import AutoModelForCausalLM

    sharp = tmp_path / "sharp"
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(sharp)
    word_tokenizer().save_pretrained(sharp)
    data = write_chats(tmp_path / "tiny.jsonl", 2, seed=3, turns=(1, 1))
    cfg = make_cfg(
        tmp_path / "o", str(sharp), data,
        data={"batch_size": 2}, optim={"lr": 1e-2, "warmup_ratio": 0.0}, loop={"steps": 150, "log_every": 150},
        eagle3={"draft_vocab_size": 160},
    )  # fmt: skip
    hist = run_training(cfg).history
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], [h["loss"] for h in hist]
    assert hist[-1]["accuracy"] > 0.8 > hist[0]["accuracy"]


def test_epochs_size_the_schedule_and_the_time_limit_stops_early(tmp_path, target_dir, data_file):
    """Without --steps, one epoch of 24 chats in batches of 2 is 12 steps and the data then ends; a time
    limit stops at the first step past it and still checkpoints and exports."""
    full = run_training(make_cfg(tmp_path / "e", target_dir, data_file, loop={"steps": None, "epochs": 1}))
    assert [h["step"] for h in full.history] == list(range(1, 13))
    assert full.history[-1]["lr"] == pytest.approx(3e-3 * lr_lambda(12, 0, 0.1)(11))
    short = run_training(
        make_cfg(tmp_path / "t", target_dir, data_file, loop={"steps": 50, "time_limit": 1e-6})
    )
    assert len(short.history) == 1
    assert (tmp_path / "t/checkpoints/step_0000001/complete").is_file() and (tmp_path / "t/export").is_dir()
    # the time budget was spent at the first step, so the schedule ended there: the next lr is the floor,
    # and the checkpoint records the seconds trained (a resumed run paces its schedule from them)
    state = torch.load(tmp_path / "t/checkpoints/step_0000001/trainer.pt", weights_only=False)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.1 * 3e-3)
    assert state["train_seconds"] > 1e-6


def test_resume_continues_bit_identically(tmp_path, target_dir, data_file):
    straight = run_training(
        make_cfg(tmp_path / "a", target_dir, data_file, loop={"steps": 6, "save_every": 3})
    )
    ckpt = tmp_path / "a/checkpoints/step_0000003"
    assert (ckpt / "complete").is_file()
    resumed_dir = tmp_path / "b"
    shutil.copytree(ckpt, resumed_dir / "checkpoints/step_0000003")
    resumed = run_training(make_cfg(resumed_dir, target_dir, data_file, loop={"steps": 6, "resume": "auto"}))
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert losses(resumed) == losses(straight)[3:]
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history[3:]]
    a = torch.load(tmp_path / "a/checkpoints/step_0000006/trainer.pt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints/step_0000006/trainer.pt", weights_only=False)
    assert all(torch.equal(a["draft"][k], b["draft"][k]) for k in a["draft"])
    assert (
        torch.load(tmp_path / "a/checkpoints/step_0000006/rank_0.pt", weights_only=False)["data"]
        == (torch.load(resumed_dir / "checkpoints/step_0000006/rank_0.pt", weights_only=False)["data"])
    )


def test_resume_through_the_server_resends_the_vocab_mapping(tmp_path, target_dir, data_file, server):
    """A run checkpointed in process and resumed against the server: the new session gets the draft's vocab
    mapping again (its batches carry draft-vocab probabilities, not full logits), the data continues at the
    saved position, and the losses are the uninterrupted run's."""
    from draftfeed.trainer.train import build_run

    straight = run_training(
        make_cfg(tmp_path / "a", target_dir, data_file, loop={"steps": 6, "save_every": 3})
    )
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a/checkpoints/step_0000003", resumed_dir / "checkpoints/step_0000003")
    cfg = make_cfg(
        resumed_dir, target_dir, data_file, target={"url": [server.url]}, loop={"steps": 6, "resume": "auto"}
    )
    run = build_run(cfg)
    try:
        saved = torch.load(resumed_dir / "checkpoints/step_0000003/rank_0.pt", weights_only=False)["data"]
        assert run.trainer.step == 3 and run.trainer.batches.state_dict() == saved
        result = run.trainer.train()
        draft = run.trainer.draft
        batch = run.backend.generate_batch(**next(run.trainer.batches).backend_kwargs())
    finally:
        run.close()
    assert [h["step"] for h in result.history] == [4, 5, 6]
    assert losses(result) == losses(straight)[3:]
    assert batch.logits is None and batch.target_probs.shape[-1] == draft.config.draft_vocab_size == 24


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, target_dir, data_file):
    """With the full-mean loss (a sum over slots / B*S), two micro-batches of one chat accumulated into one
    optimizer step train exactly like batches of two chats: same losses, gradient norms and weights."""
    common = {"eagle3": {"normalization": "full_mean"}, "loop": {"steps": 3, "log_every": 3}}
    big = run_training(make_cfg(tmp_path / "big", target_dir, data_file, data={"batch_size": 2}, **common))
    acc = run_training(
        make_cfg(
            tmp_path / "acc", target_dir, data_file, data={"batch_size": 1}, optim={"grad_accum": 2}, **common
        )
    )
    for key in ("loss", "grad_norm", "lr"):
        assert [h[key] for h in acc.history] == pytest.approx([h[key] for h in big.history], rel=1e-5), key
    assert acc.tokens == big.tokens
    a = torch.load(tmp_path / "big/checkpoints/step_0000003/trainer.pt", weights_only=False)["draft"]
    b = torch.load(tmp_path / "acc/checkpoints/step_0000003/trainer.pt", weights_only=False)["draft"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    # and accumulation is not a no-op: one micro-batch per step trains differently
    single = run_training(make_cfg(tmp_path / "one", target_dir, data_file, data={"batch_size": 1}, **common))
    assert [h["loss"] for h in single.history] != pytest.approx(losses(big), rel=1e-3)


def test_progress_bar_shows_loss_accuracy_and_throughput(tmp_path, target_dir, data_file, capsys):
    from draftfeed.trainer.progress import ProgressBar, format_duration, progress_enabled

    run_training(make_cfg(tmp_path / "o", target_dir, data_file, loop={"steps": 2, "progress": "on"}))
    err = capsys.readouterr().err
    frames = [f.rstrip("\n") for f in err.split("\r") if f.startswith("eagle3 [")]  # drawn by tqdm
    assert any(f.startswith("eagle3 [##########..........] 1/2  50%, loss ") for f in frames), frames
    last = frames[-1]
    assert last.startswith("eagle3 [####################] 2/2 100%, loss ") and " acc " in last
    assert " tok/s  eta 0s" in last
    # the periodic progress line is printed above the bar (its line cleared first), not into it
    assert "\reagle3 step 2/2  loss" in err and "100%, loss" not in err.split("eagle3 step 2/2")[0][-30:]
    run_training(make_cfg(tmp_path / "p", target_dir, data_file, loop={"steps": 2, "progress": "auto"}))
    assert "eagle3 [" not in capsys.readouterr().err  # not a terminal: progress lines only
    stream = io.StringIO()
    bar = ProgressBar("x", 4, 1, enabled=True, stream=stream)
    bar.update(2, 1000, {"loss": 1.5, "accuracy": 0.25})
    assert bar.line().startswith("x [##########..........] 2/4  50%, loss 1.5000  acc 0.250  ")
    assert progress_enabled("auto", stream) is False and progress_enabled("on", stream) is True
    assert (format_duration(59.6), format_duration(61), format_duration(3725)) == ("1m00s", "1m01s", "1h02m")
    with pytest.raises(ConfigError, match="--progress 'maybe'"):
        make_cfg(tmp_path / "q", target_dir, data_file, loop={"progress": "maybe"})


def test_the_loop_reports_its_step_and_loss_to_the_server(
    tmp_path, target_dir, data_file, server, monkeypatch
):
    """After each optimizer step the remote backend is told the step and its loss (the status page's)."""
    from draftfeed.client.remote import RemoteTargetModel

    seen = []
    original = RemoteTargetModel.report_progress

    def spy(self, step, loss=None):
        seen.append((step, loss))
        original(self, step, loss)

    monkeypatch.setattr(RemoteTargetModel, "report_progress", spy)
    result = run_training(
        make_cfg(tmp_path / "o", target_dir, data_file, target={"url": [server.url]}, loop={"steps": 2})
    )
    assert seen == [(h["step"], h["loss"]) for h in result.history] and len(seen) == 2


def test_cpu_run_warns_with_its_eta(tmp_path, target_dir, data_file, capsys, monkeypatch):
    """On a CPU, a run whose first step says it will be long gets a warning with the eta and what to shrink."""
    import draftfeed.trainer.loop as loop

    run_training(make_cfg(tmp_path / "fast", target_dir, data_file, loop={"steps": 2, "device": "cpu"}))
    assert "warning: training on the CPU" not in capsys.readouterr().err  # a short run: no warning
    monkeypatch.setattr(loop, "CPU_ETA_WARN_S", 0.0)
    run_training(make_cfg(tmp_path / "slow", target_dir, data_file, loop={"steps": 3, "device": "cpu"}))
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "warning: training on the CPU" in ln)
    assert (
        "2 steps left need about" in line
        and "(eta)" in line
        and "--seq-len" in line
        and "--device cuda" in line
    )


def test_packing_gives_the_same_loss_as_padding(tmp_path, tiny_model):
    """Three documents packed in one row or padded one per row: the same first-step loss and gradients."""
    target = tiny_model("llama")
    rng = np.random.default_rng(0)
    lens = [11, 7, 14]
    docs = [(rng.integers(3, 150, n).astype(np.int64), (rng.random(n) > 0.3).astype(np.int8)) for n in lens]
    out = {}
    for pack in (False, True):
        cfg = config_from_dict(
            TrainConfig,
            {"out": str(tmp_path / str(pack)), "eagle3": {"draft_vocab_size": 64, "ttt_steps": 3},
             "loop": {"device": "cpu", "steps": 1}},
        )  # fmt: skip
        alg = ALGORITHMS["eagle3"](cfg)
        backend = alg.open_backend(target, torch.device("cpu"))
        counts = torch.zeros(160, dtype=torch.long)
        for ids, _ in docs:
            counts += torch.bincount(torch.from_numpy(ids), minlength=160)
        torch.manual_seed(0)
        draft = alg.build_draft(backend, target.config, counts, [1, 2])
        batches = TokenBatchIterator(docs, 1 if pack else 3, 32, pack=pack, seed=0)
        trainer = Trainer(cfg, alg, draft, backend, batches, 1, device=torch.device("cpu"))
        batch = next(batches)
        assert batch.input_ids.shape == ((1, 32) if pack else (3, 32))
        alg.prepare_backend(backend, draft)
        target_batch = backend.generate_batch(**batch.backend_kwargs())
        trainer._micro_step(target_batch, sync=True)
        out[pack] = (trainer.draft.lm_head.weight.grad.clone(), trainer.draft.fc.weight.grad.clone())
        loss, _ = trainer.module(target_batch)
        out[pack] += (loss.detach(),)
    torch.testing.assert_close(out[True][2], out[False][2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)


def test_ddp_on_two_cpu_processes_runs_two_steps(tmp_path, target_dir, data_file, server):
    (tmp_path / "c.yaml").write_text("eagle3: {draft_vocab_size: 24, ttt_steps: 2}\nloop: {log_every: 1}\n")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "draftfeed.server.cli", "train", "eagle3", "--config", str(tmp_path / "c.yaml"),
        "--target", server.url, "--target-model", target_dir, "--data", data_file, "--out", str(tmp_path / "o"),
        "--steps", "2", "--seq-len", "48", "--batch-size", "2", "--device", "cpu", "--no-export",
        "--data-holdout", "8", "--val-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = run_while_it_progresses(cmd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "o/checkpoints/step_0000002"
    assert (ckpt / "complete").is_file()
    r0 = torch.load(ckpt / "rank_0.pt", weights_only=False)["data"]
    r1 = torch.load(ckpt / "rank_1.pt", weights_only=False)["data"]
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2) and r0["cursor"] == r1["cursor"] == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # both ranks validated their shards of the 8 held-out conversations, rank 0 wrote the mean
    val = [json.loads(x) for x in (tmp_path / "o/validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [1, 2] and all(
        v["val_tokens"] > 0 and "val_tau_decode" in v for v in val
    )
    cfg = json.loads((tmp_path / "o/train_config.json").read_text())
    assert cfg["dist"]["world_size"] == 2 and cfg["eagle3"]["ttt_steps"] == 2
