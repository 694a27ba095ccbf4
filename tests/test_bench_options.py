"""The benchmarks' device placement options (bench/train_throughput.py `--server-device` / `--trainer-device`):
parsed without a GPU, a machine's GPU count passed in."""

from __future__ import annotations

import pytest

from draftfeed.bench.train_throughput import DIMS, placement, resolve_device


def test_device_specs_resolve_to_one_name():
    assert resolve_device("auto", 2) == "cuda:0"
    assert resolve_device(None, 0) == "cpu"
    assert resolve_device("cuda", 2) == "cuda:0"
    assert resolve_device("CUDA:1", 2) == "cuda:1"
    assert resolve_device("cpu", 2) == "cpu"


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        ("cuda:2", 2, r"has 2 GPU\(s\) \(cuda:0..cuda:1\)"),
        ("cuda:1", 0, r"has 0 GPU"),
        ("cuda:x", 2, r"expected cpu, cuda or cuda:N"),
        ("gpu1", 2, r"expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_device_specs_say_what_to_pick(spec, count, message):
    with pytest.raises(SystemExit, match=message):
        resolve_device(spec, count)


def test_placement_separate_or_shared():
    assert placement("cuda:0", "cuda:1", 2) == dict(server="cuda:0", trainer="cuda:1", shared=False)
    # no server device: the server shares the trainer's device (the one-GPU layout of issue 17)
    assert placement(None, "cuda:1", 2) == dict(server="cuda:1", trainer="cuda:1", shared=True)
    assert placement("cuda", "auto", 1) == dict(server="cuda:0", trainer="cuda:0", shared=True)
    assert placement("cpu", "cpu", 0)["shared"]


def test_eight_b_dims_are_llama_3_1_8b_and_split_in_two():
    from transformers import LlamaConfig

    from draftfeed.server.tensor_parallel import check_shardable

    d = DIMS["llama-3.1-8b"]
    assert (d["num_hidden_layers"], d["hidden_size"], d["intermediate_size"], d["vocab_size"]) == (
        32, 4096, 14336, 128256
    )  # fmt: skip
    check_shardable(LlamaConfig(**d), 2)  # the TP=2 run needs it
    check_shardable(LlamaConfig(**DIMS["tiny"]), 2)  # and so does its CPU dry run


def test_report_names_where_the_server_and_trainer_ran(tmp_path):
    import argparse
    import json

    from draftfeed.bench.train_throughput import report

    rows = [
        dict(algo="eagle3", B=16, S=2048, mode="co-located", encodings="-", tok_s=100, target_wait=0.2,
             steps=3, trainer_peak_gib=1.0, gpu_used_gib=2.0, bytes_per_token=None),
        dict(algo="eagle3", B=16, S=2048, mode="remote", encodings="exact", tok_s=150, target_wait=0.01,
             steps=4, trainer_peak_gib=1.0, gpu_used_gib=2.0, bytes_per_token=4633),
    ]  # fmt: skip
    with open(tmp_path / "single.jsonl", "w") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {**r, "server_device": "cuda:0", "trainer_device": "cuda:1", "target": "32 layers"}
                )
                + "\n"
            )
    report(argparse.Namespace(out=str(tmp_path), command="c", device="2x H200", title="two GPUs"))
    text = (tmp_path / "train_throughput.md").read_text()
    assert text.startswith("# two GPUs")
    assert "(32 layers)" in text and "on cuda:0, trainer(s) and the co-located target on cuda:1" in text
    assert "| eagle3 | 16 | remote | exact | 2 | 150 | 1.50 |" in text


def test_report_sums_each_shared_job_against_the_same_job_alone(tmp_path):
    """The concurrent-jobs table: each job's tok/s over its lone remote tok/s (same algorithm, B,
    encodings), summed into the aggregate's gain in units of one job alone."""
    import argparse
    import json

    from draftfeed.bench.train_throughput import report

    single = [
        dict(algo=a, B=4, S=64, mode="remote", encodings="exact", tok_s=t, target_wait=0.0, steps=3,
             trainer_peak_gib=1.0, gpu_used_gib=2.0, bytes_per_token=10)
        for a, t in (("eagle3", 200), ("dspark", 100))
    ]  # fmt: skip
    jobs = [
        dict(group="2jobs_b4", jobs=2, index=i, algo=a, B=4, S=64, encodings="exact", tok_s=t, target_wait=0.1,
             steps=3, trainer_peak_gib=1.0, bytes_per_token=10)
        for i, (a, t) in enumerate((("eagle3", 150), ("dspark", 60)))
    ]  # fmt: skip
    for name, rows in (("single", single), ("jobs", jobs)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(argparse.Namespace(out=str(tmp_path), command="c", device="H100", title="t"))
    text = (tmp_path / "train_throughput.md").read_text()
    assert "| 2 | 0 | eagle3 | 4 | 150 | 200 | 0.75 | 10% | 10 |" in text
    assert "| 2 | 1 | dspark | 4 | 60 | 100 | 0.60 | 10% | 10 |" in text
    assert "| 2 | all | aggregate | 4 | **210** | | **1.35x one job** | | |" in text


def test_report_of_repeated_pairs_compares_each_remote_run_with_its_own_co_located_run(tmp_path):
    """--repeats: co-located / remote pairs interleaved; each ratio uses the co-located run of its repeat and
    the summary gives the median and the spread, apart for each --prefetch depth."""
    import argparse
    import json

    from draftfeed.bench.train_throughput import report

    base = dict(algo="eagle3", B=16, S=2048, target_wait=0.1, steps=3, trainer_peak_gib=1.0, gpu_used_gib=2.0)
    rows = []
    for rep, (co, rem, deep) in enumerate(((100, 94, 97), (110, 106, 108), (90, 87, 88))):
        rows.append(
            {**base, "mode": "co-located", "encodings": "-", "tok_s": co, "bytes_per_token": None, "rep": rep}
        )
        remote = {**base, "mode": "remote", "encodings": "exact", "bytes_per_token": 1, "rep": rep}
        rows.append({**remote, "tok_s": rem, "prefetch": 2, "gpu_busy": 0.931})
        rows.append({**remote, "tok_s": deep, "prefetch": 4})
    (tmp_path / "single.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(argparse.Namespace(out=str(tmp_path), command="c", device="H200", title="t"))
    text = (tmp_path / "train_throughput.md").read_text()
    assert "| eagle3 | 16 | remote | exact | 2 | 106 | 0.96 | 10% | 93% |" in text  # against 110, not 100
    assert "| eagle3 | 16 | remote | exact | 4 | 108 | 0.98 | 10% |  |" in text
    assert "| eagle3 | 16 | exact | 2 | 3 | **0.964** | 0.940 | 0.967 |" in text
    assert "| eagle3 | 16 | exact | 4 | 3 | **0.978** | 0.970 | 0.982 |" in text


def test_the_coverage_ceiling_walks_each_answer_like_decoding():
    import torch

    from draftfeed.bench.draft_vocab_coverage import chain_ceiling

    assert chain_ceiling([torch.ones(9, dtype=torch.bool)], 7) == 4.5  # 1 + 7 drafts, then the last token
    assert chain_ceiling([torch.zeros(5, dtype=torch.bool)], 7) == 1.0  # nothing draftable: a token a round
    assert chain_ceiling([torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)], 7) == 2.5  # rounds of 2 and 3


def test_the_server_load_over_a_run_comes_from_its_admin_status(tiny_model):
    """`server_load` / `load_between` (a remote row's server busy share and forward time) read a real
    server's admin /status.json: three forwards of 2 x 12 tokens between the two snapshots."""
    from test_graphs import _unpadded

    from draftfeed.bench.train_throughput import load_between, server_load
    from draftfeed.client.remote import RemoteDFlashTargetModel
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig

    assert server_load(None) is None and load_between(None, None) == {}
    server = TargetServer(ServeConfig(port=0, admin_port=0), model=tiny_model("llama")).start()
    try:
        with RemoteDFlashTargetModel.from_urls([server.url]) as job:
            job.generate_batch(*_unpadded(seed=0))
            before = server_load(server.admin.url)
            for seed in (1, 2, 3):
                job.generate_batch(*_unpadded(seed=seed))
            after = server_load(server.admin.url)
    finally:
        server.stop(grace=1)
    load = load_between(before, after)
    assert load["server_forward_tokens"] == 24, load
    assert load["server_forward_ms"] > 0 and 0 < load["server_busy"] <= 1, load
    assert load_between(after, after) == {}  # no forward in between: nothing to say


def test_copy_hits_follow_the_latest_earlier_trigram():
    from draftfeed.bench.answer_repetition import copy_hits

    ids = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 5]
    # position 7: (1,2,3) last seen at 0..2, followed by 4: miss; position 11: last seen at 4..6, then 5: hit
    assert copy_hits(ids, [2, 7, 11]) == [False, False, True]


def test_jsonl_records_keep_line_separators_inside_their_strings(tmp_path):
    """A regenerated answer written with ensure_ascii=False may hold U+2028 (a line break to `str.splitlines`):
    the benches' reader splits records on newlines alone (this broke the recipe's report on 2026-12-06)."""
    import json

    from draftfeed.bench import read_jsonl

    rows = [{"messages": [{"role": "assistant", "content": "one\u2028two\x85three"}]}, {"n": 2}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_packed_random_rows_are_laid_out_as_training_packs_real_data():
    """`--packed`: documents end to end with the packing fields of real training (trainer.data.collate), so
    the bench takes the attention masks real data takes; full rows stay the default."""
    from draftfeed.bench.train_throughput import RandomBatches

    tb = next(RandomBatches(3, 256, 100, packed=True))
    assert tb.seq_lens.sum(1).tolist() == [256] * 3 and (tb.seq_lens > 0).sum(1).min() >= 2
    for row in range(3):
        at = 0
        for n in tb.seq_lens[row][tb.seq_lens[row] > 0].tolist():
            assert tb.position_ids[row, at : at + n].tolist() == list(range(n))
            assert tb.doc_remaining[row, at : at + n].tolist() == list(range(n - 1, -1, -1))
            at += n
    assert tb.loss_mask.sum() > 0 and bool((tb.loss_mask <= tb.attention_mask).all())
    full = next(RandomBatches(3, 256, 100))
    assert full.position_ids is None and bool(full.attention_mask.all())
