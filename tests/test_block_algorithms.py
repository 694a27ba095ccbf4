"""DFlash and DSpark through the shared loop (trainer/algorithms/): one server feeding EAGLE-3, DFlash and
DSpark sessions at once equals in-process training, the loss goes down, resume is identical, the block
evaluator's tau bounds (and DSpark's early stop), export -> load, and `draftfeed train` / `eval` on them."""

from __future__ import annotations

import json
import math
import shutil
import threading

import pytest
import torch
from test_loop import word_tokenizer, write_chats
from test_repo import run_while_it_progresses

from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.trainer.config import TrainConfig, config_from_dict
from draftfeed.trainer.evaluate import BlockDrafter, TargetVerifier, measure_tau, reinitialize
from draftfeed.trainer.export import draft_algorithm, load_draft
from draftfeed.trainer.models.dflash import DFlashConfig, DFlashDraft
from draftfeed.trainer.models.dspark import DSparkConfig, DSparkDraft
from draftfeed.trainer.train import build_run, run_training

BLOCK = ("dflash", "dspark")
BS = 4


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_dir(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("target")
    shutil.copytree(tiny_dirs("llama"), d, dirs_exist_ok=True)
    word_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("data") / "chats.jsonl", 16)


@pytest.fixture(scope="module")
def server(target_dir):
    from draftfeed.target.loading import load_target

    srv = TargetServer(ServeConfig(port=0), model=load_target(target_dir)).start()
    yield srv
    srv.stop(grace=1)


def make_cfg(out, algorithm, target_dir, data_file, **sections) -> TrainConfig:
    values = {
        "out": str(out),
        "algorithm": algorithm,
        "target": {"model": target_dir},
        "data": {"path": data_file, "seq_len": 48, "batch_size": 2},
        "eagle3": {"draft_vocab_size": 24, "ttt_steps": 2},
        "block": {"block_size": BS, "num_anchors": 6, "num_layers": 1, "chunk_rows": 16},
        "dspark": {"markov_rank": 8},
        "optim": {"lr": 3e-3},
        "loop": {"steps": 3, "log_every": 3, "prefetch": 2, "device": "cpu", "export": False},
    }
    for name, over in sections.items():
        values[name] = {**values.get(name, {}), **over} if isinstance(over, dict) else over
    return config_from_dict(TrainConfig, values)


def losses(result):
    return [h["loss"] for h in result.history]


# ---------------------------------------------------------------- training


def test_one_server_serves_eagle3_dflash_dspark_at_once_like_in_process(
    tmp_path, target_dir, data_file, server
):
    """Three jobs open their sessions on one server, then train concurrently (threads); each one's losses,
    gradient norms and weights equal the same job against its in-process target."""
    algs = ("eagle3", "dflash", "dspark")
    local = {a: run_training(make_cfg(tmp_path / f"l-{a}", a, target_dir, data_file)) for a in algs}
    runs = {
        a: build_run(
            make_cfg(
                tmp_path / f"r-{a}", a, target_dir, data_file, target={"url": [server.url], "job_name": a}
            )
        )
        for a in algs
    }
    try:
        sessions = {s.algorithm for s in server.sessions.list()}
        assert sessions == set(algs), sessions
        results, errors = {}, []

        def train(a):
            try:
                results[a] = runs[a].trainer.train()
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append((a, err))

        threads = [threading.Thread(target=train, args=(a,)) for a in algs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)  # bounds a hang only
            assert not t.is_alive(), "a training thread hangs"
        assert not errors, errors
    finally:
        for run in runs.values():
            run.close()
    for a in algs:
        assert len(results[a].history) == 3
        assert losses(results[a]) == losses(local[a]), a
        assert [h["grad_norm"] for h in results[a].history] == [h["grad_norm"] for h in local[a].history]
        x = torch.load(tmp_path / f"l-{a}/checkpoints/step_0000003/trainer.pt", weights_only=False)["draft"]
        y = torch.load(tmp_path / f"r-{a}/checkpoints/step_0000003/trainer.pt", weights_only=False)["draft"]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), a
    assert not server.sessions.list()  # closing the jobs released their sessions
    keys = json.loads((tmp_path / "r-dspark/metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "ce", "tv", "conf", "tau_train", "accuracy", "conf_error"} <= set(keys)
    keys = json.loads((tmp_path / "r-dflash/metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "ce", "accept_len", "accuracy"} <= set(keys)


@pytest.fixture(scope="module")
def sharp_target(target_dir, tmp_path_factory):
    """The tiny target with its lm_head scaled up: peaked next-token distributions, like a trained model."""
    from transformers import AutoModelForCausalLM

    sharp = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(sharp)
    word_tokenizer().save_pretrained(sharp)
    return str(sharp)


@pytest.mark.parametrize("algorithm", BLOCK)
def test_loss_goes_down_on_a_tiny_overfit_set(tmp_path, sharp_target, algorithm):
    data = write_chats(tmp_path / "tiny.jsonl", 2, seed=3, turns=(1, 1))
    # DSpark's L1 to the target's distribution is learnt more slowly than DFlash's CE on the two chats: at 80
    # steps it had halved only just (1.51 / 3.03 with layers [1..5]; 1.68 / 3.05 with the default ids)
    steps = 80 if algorithm == "dflash" else 160
    cfg = make_cfg(
        tmp_path / "o", algorithm, sharp_target, data,
        block={"num_anchors": 32, "num_layers": 2}, optim={"lr": 1e-2, "warmup_ratio": 0.0},
        loop={"steps": steps, "log_every": steps},
    )  # fmt: skip
    hist = run_training(cfg).history
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"], [round(h["loss"], 3) for h in hist]
    if algorithm == "dflash":  # CE on the data's tokens: the two chats are learnt
        assert hist[-1]["accuracy"] > hist[0]["accuracy"] + 0.4
        assert hist[-1]["accept_len"] > hist[0]["accept_len"] + 0.5
    else:  # mostly L1 to the target's distribution (the data's random words are not the target's)
        assert hist[-1]["tv"] < 0.5 * hist[0]["tv"] and hist[-1]["tau_train"] > hist[0]["tau_train"] + 0.5


def test_a_step_cut_by_a_signal_is_trained_again_identically(tmp_path, target_dir, data_file, monkeypatch):
    """SIGINT between the micro-batches of step 3 (2 accumulated): the checkpoint is step 2's state (data
    position, RNG, anchor generator), so the resumed run's losses equal the straight run's."""
    import os
    import signal

    from draftfeed.trainer.loop import Trainer
    from draftfeed.trainer.signals import TrainingInterrupted

    common = {"optim": {"grad_accum": 2}}
    straight = run_training(
        make_cfg(tmp_path / "a", "dspark", target_dir, data_file, loop={"steps": 4}, **common)
    )
    calls = []
    micro_step = Trainer._micro_step

    def cut(self, target, sync):
        out = micro_step(self, target, sync)
        calls.append(1)
        if len(calls) == 5:  # the first micro-batch of step 3: its anchors are drawn, the step is not done
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_micro_step", cut)
    with pytest.raises(TrainingInterrupted) as stop:
        run_training(make_cfg(tmp_path / "b", "dspark", target_dir, data_file, loop={"steps": 4}, **common))
    assert stop.value.step == 2 and stop.value.checkpoint.name == "step_0000002"
    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    resumed = run_training(
        make_cfg(
            tmp_path / "b", "dspark", target_dir, data_file, loop={"steps": 4, "resume": "auto"}, **common
        )
    )
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert losses(resumed) == losses(straight)[2:]


@pytest.mark.parametrize("algorithm", BLOCK)
def test_resume_continues_identically(tmp_path, target_dir, data_file, algorithm):
    """Anchors are redrawn every step from a generator that checkpoints per rank: a resumed run draws the
    same blocks and gets the same losses as the straight one."""
    straight = run_training(
        make_cfg(tmp_path / "a", algorithm, target_dir, data_file, loop={"steps": 4, "save_every": 2})
    )
    ckpt = tmp_path / "a/checkpoints/step_0000002"
    state = torch.load(ckpt / "rank_0.pt", weights_only=False)
    assert "anchor_generator" in state["algorithm"]
    shutil.copytree(ckpt, tmp_path / "b/checkpoints/step_0000002")
    resumed = run_training(
        make_cfg(tmp_path / "b", algorithm, target_dir, data_file, loop={"steps": 4, "resume": "auto"})
    )
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert losses(resumed) == losses(straight)[2:]
    a = torch.load(tmp_path / "a/checkpoints/step_0000004/trainer.pt", weights_only=False)["draft"]
    b = torch.load(tmp_path / "b/checkpoints/step_0000004/trainer.pt", weights_only=False)["draft"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = run_training(make_cfg(tmp_path / "c", algorithm, target_dir, data_file, loop={"steps": 4}))
    assert losses(fresh) == losses(straight)  # a fixed seed gives the same anchors on a fresh run


@pytest.mark.parametrize("algorithm", BLOCK)
def test_default_layer_ids_are_designs_in_process_remote_and_server_side(
    tmp_path, target_dir, server, tiny_model, algorithm
):
    """Without --layer-ids the trainer captures docs/architecture.md's default of its algorithm (client/algorithms/) for
    --num-target-layers K, in process and through a server, and a session opened without ids gets the same
    from the server. N = 8: DFlash round(1 + i(N-4)/(K-1)), DSpark the same ids (kept inside 0..N-2)."""
    from draftfeed.client import remote
    from draftfeed.trainer.algorithms import ALGORITHMS

    want = {
        ("dflash", 5): [1, 2, 3, 4, 5], ("dflash", 3): [1, 3, 5], ("dflash", 1): [4],
        ("dspark", 5): [1, 2, 3, 4, 5], ("dspark", 3): [1, 3, 5], ("dspark", 1): [4],
    }  # fmt: skip
    for k in (5, 3, 1):
        ids = want[algorithm, k]
        cfg = make_cfg(tmp_path, algorithm, target_dir, None, block={"num_target_layers": k})
        local = ALGORITHMS[algorithm](cfg).open_backend(tiny_model("llama"), torch.device("cpu"))
        assert local.target_layer_ids == ids, (k, local.target_layer_ids)
        draft = ALGORITHMS[algorithm](cfg).build_draft(local, tiny_model("llama").config, None, [])
        assert draft.config.target_layer_ids == ids and draft.fc.in_features == len(ids) * 32
        cfg = make_cfg(tmp_path, algorithm, target_dir, None, target={"url": [server.url]}, block={"num_target_layers": k})  # fmt: skip
        backend = ALGORITHMS[algorithm](cfg).open_backend(None, torch.device("cpu"))
        try:
            assert backend.target_layer_ids == ids
            (session,) = server.sessions.list()
            assert session.algorithm == algorithm and session.layer_ids == ids
        finally:
            backend.close()
    cls = getattr(
        remote, {"dflash": "RemoteDFlashTargetModel", "dspark": "RemoteDSparkTargetModel"}[algorithm]
    )
    plain = cls.from_urls(server.url)  # no ids: the server's default (K = 5)
    try:
        assert plain.target_layer_ids == want[algorithm, 5]
    finally:
        plain.close()


def test_dspark_takes_the_targets_final_logit_softcapping_in_process_and_remote(
    tmp_path, target_dir, data_file
):
    """A target whose config has `final_logit_softcapping` (Gemma-style): the DSpark draft gets it from the
    in-process backend and from the server alike (same losses), its teacher and draft logits use it (the
    losses differ from the uncapped target's), and the export / loader keep it."""
    from draftfeed.target.loading import load_target
    from draftfeed.trainer.export import load_draft

    capped = tmp_path / "capped"
    shutil.copytree(target_dir, capped)
    raw = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**raw, "final_logit_softcapping": 0.5}))
    model = load_target(str(capped))
    assert model.config.final_logit_softcapping == 0.5
    srv = TargetServer(ServeConfig(port=0), model=model).start()
    try:
        loop = {"steps": 2, "log_every": 1, "export": True}
        local = run_training(make_cfg(tmp_path / "l", "dspark", str(capped), data_file, loop=loop))
        remote = run_training(
            make_cfg(tmp_path / "r", "dspark", str(capped), data_file, loop=loop, target={"url": [srv.url]})
        )
    finally:
        srv.stop(grace=1)
    plain = run_training(make_cfg(tmp_path / "p", "dspark", target_dir, data_file, loop=loop))
    assert losses(remote) == losses(local) and losses(plain) != losses(local)
    for run in ("l", "r"):
        assert (
            json.loads((tmp_path / run / "export/config.json").read_text())["final_logit_softcapping"] == 0.5
        )
    loaded = load_draft(tmp_path / "l/export", model)
    assert loaded.draft.config.final_logit_softcapping == 0.5
    h = torch.randn(3, loaded.draft.config.hidden_size) * 100
    assert loaded.draft.base_logits(h).abs().max() <= 0.5


# ---------------------------------------------------------------- evaluation


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 150, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def constant_target(tiny_model):
    """The tiny target with a zero final norm: its logits are all 0, so its greedy token is always id 0,
    whatever its lm_head; that lm_head gets rows 5 = +1, 6 = -1 (all else 0), so a draft scoring a nonzero
    hidden state with it never picks 0, and one scoring a zero hidden state always does."""
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    m = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32).eval()
    m.load_state_dict(src.state_dict())
    with torch.no_grad():
        m.model.norm.weight.zero_()
        m.lm_head.weight.zero_()
        m.lm_head.weight[5] = 1.0
        m.lm_head.weight[6] = -1.0
    return m.requires_grad_(False)


def block_draft(algorithm, target, right: bool, **kw):
    torch.manual_seed(0)
    fields = dict(target_layer_ids=[1, 3, 5], num_layers=1, block_size=BS)
    if algorithm == "dflash":
        cfg = DFlashConfig.from_target_config(target.config, **fields)
        draft = DFlashDraft(cfg, target.get_input_embeddings(), target.get_output_embeddings())
    else:
        cfg = DSparkConfig.from_target_config(target.config, **fields, markov_rank=8, **kw)
        draft = DSparkDraft(cfg).copy_target_weights(
            target.get_input_embeddings(), target.get_output_embeddings()
        )
        with torch.no_grad():
            draft.markov_head.markov_w2.weight.zero_()  # the Markov bias is 0: the lm_head decides
    if right:
        with torch.no_grad():
            draft.norm.weight.zero_()  # hidden 0 -> all logits 0 -> argmax 0 = the target's token
    return draft


@pytest.mark.parametrize("algorithm", BLOCK)
def test_block_tau_is_max_for_the_targets_tokens_and_one_for_wrong_ones(constant_target, algorithm):
    k = BS - 1 if algorithm == "dflash" else BS  # DFlash drafts bs-1 tokens per block, DSpark bs
    verifier = TargetVerifier(constant_target, [1, 3, 5])
    right = BlockDrafter(block_draft(algorithm, constant_target, right=True))
    assert right.max_drafts == k
    good = measure_tau(verifier, right, prompts(), k, max_new_tokens=1 + 3 * (k + 1))
    assert good.tau == k + 1 and good.rounds == 3 * 3 and good.drafted == 3 * 3 * k
    wrong = BlockDrafter(block_draft(algorithm, constant_target, right=False))
    bad = measure_tau(verifier, wrong, prompts(), k, max_new_tokens=9)
    assert bad.tau == 1.0 and bad.rounds == 3 * 8


@pytest.mark.parametrize(
    "algorithm, ids",
    [("eagle3", [1, 4, 7]), ("dflash", [0, 3, 7]), ("dspark", [-1, 2, 7]), ("dspark", [1, 2, 4, 6, 7])],
)
def test_eval_features_equal_the_training_features(tiny_model, algorithm, ids):
    """The evaluator's per-round target features (prefill, then verify rounds on the KV cache) are the rows
    the backend trains on for the same text: layer N-1 is its pre-norm output for EAGLE-3 and DFlash, the
    final-norm state for DSpark, whose -1 is the embedding output."""
    from draftfeed.target import backends

    model = tiny_model("llama")
    text = torch.randint(3, 150, (1, 20))
    if algorithm == "eagle3":
        full = backends.HFEagle3TargetModel(model, aux_layer_ids=ids)
    elif algorithm == "dflash":
        full = backends.HFDFlashTargetModel(model, target_layer_ids=ids)
    else:
        full = backends.HFDSparkTargetModel(model, target_layer_ids=ids)
    batch = full.generate_batch(text, torch.ones_like(text), torch.ones_like(text))
    want = {"eagle3": "aux_hidden_states", "dflash": "hidden_states", "dspark": "target_hidden_states"}
    want = getattr(batch, want[algorithm])
    verifier = TargetVerifier(model, ids, algorithm)
    rows = [verifier.run(text[0, :9].tolist())[0]]
    for a, b in ((9, 13), (13, 14), (14, 20)):
        rows.append(verifier.run(text[0, a:b].tolist())[0])
    assert torch.allclose(torch.cat(rows), want[0], atol=1e-5)


def test_dspark_confidence_early_stop_truncates_the_block(constant_target):
    """theta = 0: all bs drafts verified; otherwise each round verifies the drafts before the first one whose
    confidence is below theta (and commits them plus the bonus, as they are the target's tokens); a theta
    above every confidence verifies the anchor alone (tau 1)."""
    draft = block_draft("dspark", constant_target, right=False)
    with torch.no_grad():  # the draft's own lm_head copy zeroed: its drafts are 0, its hidden states vary
        draft.lm_head.weight.zero_()
        draft.confidence_head.proj.weight.normal_()

    class Recorder(BlockDrafter):
        def propose(self, k):
            out = super().propose(k)
            self.log.append((self.last_confidence.clone(), len(out)))
            return out

    verifier = TargetVerifier(constant_target, [1, 3, 5])
    full = Recorder(draft)
    full.log = []
    r0 = measure_tau(verifier, full, prompts(), BS, max_new_tokens=13)
    assert r0.tau == BS + 1 and all(n == BS for _, n in full.log)
    theta = float(torch.cat([c for c, _ in full.log]).median())
    cut = Recorder(draft, confidence_threshold=theta)
    cut.log = []
    r = measure_tau(verifier, cut, prompts(), BS, max_new_tokens=13)
    lengths = []
    for conf, n in cut.log:
        below = (conf < theta).tolist()
        lengths.append(below.index(True) if True in below else BS)
        assert n == lengths[-1]
    assert min(lengths) < BS  # the threshold bites
    assert r.drafted == sum(lengths) and r.committed == sum(lengths) + r.rounds  # all drafts accepted
    off = measure_tau(
        verifier, BlockDrafter(draft, confidence_threshold=1.0), prompts(), BS, max_new_tokens=6
    )
    assert off.tau == 1.0 and off.drafted == 0 and off.rounds == 3 * 5


def test_untrained_baseline_keeps_the_frozen_target_copies(constant_target):
    draft = block_draft("dspark", constant_target, right=True)
    embed, head = draft.embed_tokens.weight.clone(), draft.lm_head.weight.clone()
    reinitialize(draft)
    assert torch.equal(draft.embed_tokens.weight, embed) and torch.equal(draft.lm_head.weight, head)
    assert torch.equal(draft.norm.weight, torch.ones_like(draft.norm.weight))
    assert draft.markov_head.markov_w2.weight.abs().sum() > 0


# ---------------------------------------------------------------- export and the CLI


@pytest.mark.parametrize("algorithm", BLOCK)
def test_cli_train_export_load_and_eval(tmp_path, target_dir, data_file, algorithm):
    """`draftfeed train ALGO` exports the layout of docs/architecture.md; `load_draft` detects the algorithm and
    reads back the trained weights; `draftfeed eval` measures it (and its untrained baseline)."""
    from safetensors.torch import load_file

    from draftfeed.server.cli import main
    from draftfeed.target.loading import load_target

    out = tmp_path / "run"
    argv = ["train", algorithm, "--target-model", target_dir, "--data", data_file, "--out", str(out),
            "--steps", "2", "--seq-len", "48", "--batch-size", "2", "--device", "cpu", "--block-size", str(BS),
            "--num-anchors", "4", "--draft-layers", "1", "--markov-rank", "8", "--layer-ids", "1,3,5"]  # fmt: skip
    assert main(argv) == 0
    export = out / "export"
    raw = json.loads((export / "config.json").read_text())
    keys = set(load_file(str(export / "model.safetensors")))
    assert raw["num_hidden_layers"] == 1 and raw["num_target_layers"] == 8 and raw["block_size"] == BS
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_norm.weight"} <= keys
    if algorithm == "dflash":
        assert raw["architectures"] == ["DFlashDraftModel"] and raw["model_type"] == "qwen3"
        assert raw["dflash_config"]["target_layer_ids"] == [1, 3, 5] and "lm_head.weight" not in keys
    else:
        assert raw["architectures"] == ["Qwen3DSparkModel"] and raw["target_layer_ids"] == [1, 3, 5]
        assert raw["markov_rank"] == 8 and raw["enable_confidence_head"] is True
        assert {"embed_tokens.weight", "lm_head.weight", "markov_head.markov_w1.weight"} <= keys
        assert {"confidence_head.proj.weight", "confidence_head.proj.bias"} <= keys
    assert draft_algorithm(export) == algorithm
    target = load_target(target_dir)
    loaded = load_draft(export, target)
    assert loaded.algorithm == algorithm and loaded.layer_ids == [1, 3, 5]
    trained = torch.load(out / "checkpoints/step_0000002/trainer.pt", weights_only=False)["draft"]
    state = loaded.draft.state_dict()
    assert trained and all(torch.equal(state[k], v) for k, v in trained.items())
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["the quick fox", "x"]}) + "\n")
    tau = tmp_path / "tau.json"
    ev = ["eval", "--draft", str(export), "--target-model", target_dir, "--device", "cpu",
          "--prompts", str(tmp_path / "q.jsonl"), "--max-new-tokens", "8", "--out", str(tau)]  # fmt: skip
    assert main(ev + ["--confidence-threshold", "0.5"]) == 0
    got = json.loads(tau.read_text())[str(tmp_path / "q.jsonl")]
    k = BS - 1 if algorithm == "dflash" else BS
    assert got["algorithm"] == algorithm and got["k"] == k and 1 <= got["tau"] <= k + 1
    assert got["committed"] == sum(i * n for i, n in enumerate(got["accept_hist"]))
    assert main(ev + ["--untrained"]) == 0


def test_springforge_style_dspark_config_is_detected(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["DFlashDraftModel"], "dflash_config": {"projector_type": "dspark"}})
    )
    assert draft_algorithm(tmp_path) == "dspark"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="no single known draft"):
        draft_algorithm(tmp_path)


def test_demo_pieces_train_two_jobs_concurrently_and_measure_both(tmp_path, target_dir, data_file, server):
    """What demo-train does (an EAGLE-3 and a DSpark job at once against one server, then tau of each export
    and of its untrained copy), on the tiny target."""
    from draftfeed.target.loading import load_target, load_tokenizer
    from draftfeed.trainer.demo import measure_exports, train_concurrently

    cfgs = {
        a: make_cfg(
            tmp_path / a, a, target_dir, data_file, target={"url": [server.url]}, loop={"export": True}
        )
        for a in ("eagle3", "dspark")
    }
    results = train_concurrently(cfgs, None, server.info.fingerprint, threads_per_job=1)
    assert {a: r.steps for a, r in results.items()} == {"eagle3": 3, "dspark": 3}
    target = load_target(target_dir)
    seen = []
    rows = measure_exports(
        target, load_tokenizer(target_dir), {a: tmp_path / a / "export" for a in cfgs}, prompts(2),
        num_draft_tokens=3, max_new_tokens=6, on_row=lambda so_far: seen.append([r.name for r in so_far]),
    )  # fmt: skip
    assert seen == [[r.name for r in rows[: i + 1]] for i in range(4)]  # partial results as they come
    assert [(r.name, r.algorithm, r.k) for r in rows] == [
        ("eagle3", "eagle3", 3), ("eagle3 untrained", "eagle3", 3),
        ("dspark", "dspark", BS), ("dspark untrained", "dspark", BS),
    ]  # fmt: skip
    assert all(r.prompts == 2 and 1 <= r.tau <= r.k + 1 for r in rows)


@pytest.mark.parametrize("algorithm", BLOCK)
def test_a_batch_without_anchors_is_a_zero_step(tmp_path, tiny_model, algorithm):
    from draftfeed.trainer.algorithms import ALGORITHMS, DistContext

    cfg = make_cfg(tmp_path, algorithm, None, None)
    alg = ALGORITHMS[algorithm](cfg)
    target = tiny_model("llama")
    backend = alg.open_backend(target, torch.device("cpu"))
    draft = alg.build_draft(backend, target.config, None, [])
    ids = torch.randint(3, 150, (2, 12))
    batch = backend.generate_batch(ids, torch.ones_like(ids), torch.zeros_like(ids))  # nothing supervised
    out = alg.loss(draft, batch, DistContext())
    out.loss.backward()
    assert out.loss.item() == 0.0 and set(out.metrics) == set(alg.metric_keys)
    assert all(float(v) == 0.0 for v in out.metrics.values())
    assert all(p.grad is not None and not p.grad.any() for p in draft.parameters() if p.requires_grad)


@pytest.mark.parametrize("algorithm", BLOCK)
def test_a_block_algorithm_names_its_own_size_flags(tmp_path, algorithm):
    """The slow-on-CPU warning names what shrinks a block step; EAGLE-3 has none of its own."""
    from draftfeed.trainer.algorithms import ALGORITHMS

    cfg = make_cfg(tmp_path, algorithm, None, None)
    flags = ALGORITHMS[algorithm](cfg).size_flags()
    assert (
        f"--num-anchors {cfg.block.num_anchors}" in flags
        and f"--draft-layers {cfg.block.num_layers}" in flags
    )
    assert ALGORITHMS["eagle3"](cfg).size_flags() == ""


def test_dspark_ddp_on_two_cpu_processes(tmp_path, target_dir, data_file, server):
    """`draftfeed train dspark` under torchrun: global loss denominators, per-rank anchor generators."""
    import os
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "draftfeed.server.cli", "train", "dspark", "--target", server.url, "--target-model", target_dir,
        "--data", data_file, "--out", str(tmp_path / "o"), "--steps", "2", "--seq-len", "48", "--batch-size", "2",
        "--device", "cpu", "--no-export", "--block-size", "4", "--num-anchors", "4", "--draft-layers", "1",
        "--markov-rank", "8", "--log-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = run_while_it_progresses(cmd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "o/checkpoints/step_0000002"
    g0 = torch.load(ckpt / "rank_0.pt", weights_only=False)["algorithm"]["anchor_generator"]
    g1 = torch.load(ckpt / "rank_1.pt", weights_only=False)["algorithm"]["anchor_generator"]
    assert not torch.equal(g0, g1)  # each rank draws its own anchors
    steps = [json.loads(x)["step"] for x in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# ---------------------------------------------------------------- other target families


@pytest.fixture(scope="module")
def gpt2_dir(tiny_dirs, tmp_path_factory):
    """A tiny GPT-2 target (config names n_layer / n_embd / n_head / n_positions, n_inner None, gelu_new)."""
    d = tmp_path_factory.mktemp("gpt2")
    shutil.copytree(tiny_dirs("gpt2"), d, dirs_exist_ok=True)
    word_tokenizer().save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("algorithm", ("eagle3", *BLOCK))
def test_a_gpt2_target_trains_and_exports_every_draft(tmp_path, gpt2_dir, monkeypatch, algorithm):
    """HF `attribute_map` aliases reach the drafts: a GPT-2 target's dimensions come through under the usual
    names (its config has no `num_hidden_layers` key), the loss is finite and goes down, and the export loads
    back. DSpark takes its class name from the registry: GPT-2 has no entry, so the test adds one (the
    one-line append the error asks for) and the export's `architectures` is exactly that entry."""
    from draftfeed.target.loading import load_target
    from draftfeed.trainer.algorithms.dspark import DSPARK_DRAFTS

    monkeypatch.setitem(DSPARK_DRAFTS, "GPT2LMHeadModel", "GPT2DSparkModelForTest")
    data = write_chats(tmp_path / "two.jsonl", 2, seed=3, turns=(1, 1))  # the same batch every step
    loop = {"steps": 8, "log_every": 1, "export": True}
    optim = {"lr": 1e-2, "warmup_ratio": 0.0}
    result = run_training(make_cfg(tmp_path, algorithm, gpt2_dir, data, loop=loop, optim=optim))
    assert len(losses(result)) == 8 and all(map(math.isfinite, losses(result)))
    assert losses(result)[-1] < losses(result)[0], losses(result)
    raw = json.loads((tmp_path / "export/config.json").read_text())
    assert not {"n_layer", "n_embd", "n_head", "n_inner", "n_positions", "activation_function"} & set(raw)
    assert raw["hidden_size"] == 32 and raw["intermediate_size"] == 128 and raw["hidden_act"] == "gelu_new"
    if algorithm != "eagle3":
        assert raw["num_target_layers"] == 8 and raw["num_attention_heads"] == 4
        name = {"dflash": "DFlashDraftModel", "dspark": "GPT2DSparkModelForTest"}[algorithm]
        assert raw["architectures"] == [name]
        loaded = load_draft(tmp_path / "export", load_target(gpt2_dir))
        assert loaded.algorithm == algorithm and loaded.draft.config.num_target_layers == 8


def test_dspark_on_an_unregistered_family_fails_before_training(tmp_path, gpt2_dir, data_file):
    """No DSpark draft class is registered for GPT-2: the run stops while building the draft (no step, no
    checkpoint), naming the target's architecture, the registered families and the fix."""
    from draftfeed.client.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as err:
        run_training(make_cfg(tmp_path, "dspark", gpt2_dir, data_file))
    msg = str(err.value)
    assert "['GPT2LMHeadModel']" in msg and "Qwen3ForCausalLM" in msg and "LlamaForCausalLM" in msg
    assert "DSPARK_DRAFTS" in msg and "DFlash" in msg
    assert not (tmp_path / "checkpoints").exists()


def test_dspark_export_names_the_registrys_draft_class(tiny_model, monkeypatch, tmp_path):
    """The class written to `architectures` is the registry's answer for the target's `config.architectures`
    (or, for a config built in memory that names none, the class transformers builds for its model_type),
    not a constant; a config without one cannot export."""
    from draftfeed.trainer.algorithms.dspark import DSPARK_DRAFTS
    from draftfeed.trainer.models.dspark import export_dspark, load_dspark

    target = tiny_model("qwen3")
    fields = dict(target_layer_ids=[1, 3], num_layers=1, block_size=BS, markov_rank=8)
    assert DSparkConfig.from_target_config(target.config, **fields).to_export_dict()["architectures"] == [
        "Qwen3DSparkModel"
    ]
    monkeypatch.setitem(DSPARK_DRAFTS, "Qwen3ForCausalLM", "Qwen3DSparkModelV2")
    unsaved = type(target.config).from_dict({**target.config.to_dict(), "architectures": None})
    assert unsaved.architectures is None
    for config in (target.config, unsaved, target.config.to_dict()):
        assert DSparkConfig.from_target_config(config, **fields).architecture == "Qwen3DSparkModelV2"
    draft = DSparkDraft(DSparkConfig.from_target_config(target.config, **fields))
    export_dspark(draft, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen3DSparkModelV2"]
    assert load_dspark(tmp_path).config.architecture == "Qwen3DSparkModelV2"  # kept through a reload
    bare = DSparkConfig(**{**vars(draft.config), "architecture": None})
    with pytest.raises(ValueError, match="from_target_config"):
        bare.to_export_dict()
