"""GPU smoke and speed check of trainer/fast_decode.py and the evaluator's graphed loops, on a model of the
default target's dimensions with random weights (speed does not depend on the values): graphs on == off,
the target-alone and speculative loops agree, and how fast the steps are (EAGLE-3's chain and random DFlash /
DSpark blocks). Writes $OUT/gpu_smoke.json.

    python bench/gpu_smoke.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def smollm_dims():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
    )  # fmt: skip


def block_draft(model, algorithm: str, block_size: int):
    """A DFlash or DSpark draft of the GPU recipes' shape (5 target layers, 5 draft layers), random weights."""
    from draftfeed.trainer.models.dflash import DFlashConfig, DFlashDraft
    from draftfeed.trainer.models.dspark import DSparkConfig, DSparkDraft

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if algorithm == "dflash":
        cfg = DFlashConfig.from_target_config(model.config, num_layers=5, block_size=block_size)
        return DFlashDraft(cfg, embed, head)
    cfg = DSparkConfig.from_target_config(model.config, num_layers=5, block_size=block_size)
    return DSparkDraft(cfg).copy_target_weights(embed, head)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--regen-batches", default="512x256,512x512,512x1024")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of 64 hidden (a CPU dry run)")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from draftfeed.trainer.evaluate import StaticTarget, measure_speedup, speculative_capacity
    from draftfeed.trainer.fast_decode import greedy_generate
    from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    dev = torch.device(args.device)
    torch.manual_seed(0)
    conf = smollm_dims()
    if args.tiny:
        conf.num_hidden_layers, conf.hidden_size, conf.intermediate_size = 8, 72, 128
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_config(conf, dtype=dtype).to(dev).eval()
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, 49000, (int(n),), generator=g).tolist()
        for n in torch.randint(20, 200, (8,), generator=g)
    ]
    a = greedy_generate(
        model, prompts[:2] if args.tiny else prompts, 8 if args.tiny else 64, [2], 0, graphs=True
    )
    b = greedy_generate(
        model, prompts[:2] if args.tiny else prompts, 8 if args.tiny else 64, [2], 0, graphs=False
    )
    out["greedy_graphs_equal_eager"] = a == b
    print("greedy graphs == eager:", a == b, flush=True)
    regen = []
    for spec in args.regen_batches.split(","):
        bsz, width = (int(x) for x in spec.split("x"))
        ps = [torch.randint(10, 49000, (width,), generator=g).tolist() for _ in range(bsz)]
        sync(dev)
        t = time.perf_counter()
        rows = greedy_generate(model, ps, 256 if not args.tiny else 8, [-1], 0)
        sync(dev)
        dt = time.perf_counter() - t
        toks = sum(len(r) for r in rows)
        regen.append({"batch": bsz, "prompt": width, "new": 256, "seconds": dt, "tok_s": toks / dt})
        print(f"regen B={bsz} prompt={width}: {dt:.2f} s, {toks / dt:,.0f} new tok/s", flush=True)
    out["regen"] = regen
    cfg = Eagle3DraftConfig.from_target_config(model.config, draft_vocab_size=8192)
    eagle = Eagle3DraftModel(cfg, embed_weight=model.get_input_embeddings().weight).to(dev, dtype)
    eagle.set_vocab_mapping(torch.arange(8192), torch.arange(49152) < 8192)
    lens, new = ((10, 20), 12) if args.tiny else ((40, 120, 300, 80, 60), 128)
    ps = [torch.randint(10, 49000, (n,), generator=g).tolist() for n in lens]
    from draftfeed.trainer import compiling

    def row(key, algorithm, draft, k, ids, graphs, compiled):
        """One measure_speedup pass; the JSON is rewritten after each row (a time cap keeps what ran)."""
        with compiling.compiling_as(compiled and dev.type == "cuda"):
            t = StaticTarget(model, ids, algorithm, k, speculative_capacity(max(lens), new, k), graphs)
            r = measure_speedup(model, draft, algorithm, ids, ps, k, new, [2], "random", graphs=graphs, target=t,
                                progress=False)  # fmt: skip
        out[key] = {**r.as_dict(), "graphed": r.graphs, "compiled": compiled and dev.type == "cuda"}
        print(f"{key}: graphed={r.graphs} identical {r.identical}/{r.prompts} tau {r.tau:.3f} "
              f"base {r.base_tok_s:.0f} tok/s spec {r.spec_tok_s:.0f} tok/s x{r.speedup:.2f} round {r.round_ms()}", flush=True)  # fmt: skip
        with open(f"{args.out}/gpu_smoke.json", "w") as f:
            json.dump(out, f, indent=2)

    # EAGLE-3's chain graphed with the draft's fused kernels compiled (draftfeed eval's CUDA default) and
    # eager, the random block drafts as eval runs them, then the whole loop without graphs (slowest: last)
    row("graphs", "eagle3", eagle, 7, None, True, True)
    row("graphs_uncompiled", "eagle3", eagle, 7, None, True, False)
    for algorithm, bs in (("dflash", 8), ("dspark", 7)):  # random block drafts: the graphed block step's cost
        draft = block_draft(model, algorithm, bs).to(dev, dtype)
        k = bs - 1 if algorithm == "dflash" else bs
        row(algorithm, algorithm, draft, k, draft.config.target_layer_ids, True, True)
    row("eager", "eagle3", eagle, 7, None, False, False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
