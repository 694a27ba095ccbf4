"""The report of one bench/gpu_recipe.sh run: draft_quality.md under --out (tau and speedup per algorithm and
prompt set, training reached, tau along the training with a projection, remote vs in-process losses).

    python bench/draft_quality.py --work /tmp/recipe --out $OUT --regen-seconds 120 --train-seconds 250 \
        --algs "eagle3 eagle3-ttt4 dflash dspark"
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from pathlib import Path

from draftfeed.bench import read_jsonl


def set_name(name: str) -> str:
    return "MT-Bench" if "mtbench" in name else "held-out ShareGPT" if "heldout" in name else Path(name).name


def fit_log(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares tau = a + b ln(t) over (t, tau) points with t > 0."""
    pts = [(math.log(t), y) for t, y in points if t > 0]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return my - b * mx, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--regen-seconds", type=float, default=0)
    p.add_argument("--train-seconds", type=float, default=0)
    p.add_argument("--algs", default="eagle3")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    algs = args.algs.split()
    device = args.device
    if device is None:
        try:
            import torch

            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        except Exception:  # noqa: BLE001
            device = "?"
    regen = read_jsonl(work / "regenerated.jsonl")
    if not regen and (work / "regenerated.jsonl.gz").is_file():
        import gzip

        regen = [json.loads(x) for x in gzip.open(work / "regenerated.jsonl.gz", "rt") if x.strip()]
    turns = sum(sum(1 for m in c["messages"] if m["role"] == "assistant") for c in regen)
    held = read_jsonl(work / "heldout_prompts.jsonl")
    lines = [
        f"# Draft quality: the issue-19 recipe ({device}, {datetime.date.today().isoformat()})",
        "",
        "Target: the default target SmolLM2-135M-Instruct (bf16 on GPU), served by one `draftfeed serve` on the "
        "same GPU; every recipe's trainer reached it over gRPC at the same time (`bench/gpu_recipe.sh run`).",
        f"Data: {len(regen)} ShareGPT conversations ({turns} assistant turns, every user turn answered by the target "
        f"after its own earlier answers) regenerated in {args.regen_seconds:.0f} s; {len(held)} held-out "
        "conversations never trained on (their first turns are the held-out prompt set).",
        f"Training: `--time-limit {args.train_seconds:.0f}` per job, all jobs at once.",
        "",
        "## tau and speedup (greedy, identical-output check, both loops on the graphed static-cache target)",
        "",
        "| recipe | prompt set | prompts | drafts/round | tau | target alone tok/s | with draft tok/s | speedup "
        "| identical | per round (GPU timeline) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in algs:
        ev = out / a / "eval.json"
        if not ev.is_file():
            lines.append(f"| {a} | (no eval) | | | | | | | | |")
            continue
        for name, r in json.loads(ev.read_text()).items():
            split = ", ".join(f"{k} {v:.2f} ms" for k, v in r.get("round_ms", {}).items())
            lines.append(
                f"| {a} | {set_name(name)} | {r['prompts']} | {r['k']} | **{r['tau']:.3f}** | {r['base_tok_s']:.0f} "
                f"| {r['spec_tok_s']:.0f} | **{r['speedup']:.2f}x** | {r['identical']}/{r['prompts']} | {split} |"
            )
    lines += ["", "## Training reached", "", "| recipe | steps | schedule steps | last loss | last acc | simulated tau (training data) | tok/s | target wait |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a in algs:
        m = read_jsonl(out / a / "metrics.jsonl")
        cfg = (
            json.loads((work / a / "train_config.json").read_text())
            if (work / a / "train_config.json").is_file()
            else {}
        )
        if not m:
            lines.append(f"| {a} | - | | | | | | |")
            continue
        last = m[-1]
        tau = next((last[k] for k in ("tau_sim", "tau_train", "accept_len") if k in last), float("nan"))
        lines.append(
            f"| {a} | {last['step']} | {cfg.get('loop', {}).get('steps', '?')} | {last['loss']:.3f} "
            f"| {last.get('accuracy', float('nan')):.3f} | {tau:.2f} | {last.get('tokens_per_s', 0):,.0f} "
            f"| {100 * last.get('target_wait', 0):.0f}% |"
        )
    # tau along the training (EAGLE-3 checkpoints), time ~ step / last step x training seconds
    ck = sorted((out / "eagle3").glob("eval_step_*.json"))
    m = read_jsonl(out / "eagle3" / "metrics.jsonl")
    last_step = m[-1]["step"] if m else 0
    if ck and last_step:
        lines += ["", "## EAGLE-3: tau against training time", "",
                  "| checkpoint step | ~training s | tau MT-Bench | tau held-out ShareGPT |", "|---|---|---|---|"]  # fmt: skip
        series: dict[str, list[tuple[float, float]]] = {}
        rows = []
        for f in ck:
            step = int(re.search(r"step_(\d+)", f.name).group(1))
            t = step / last_step * args.train_seconds
            r = json.loads(f.read_text())
            taus = {set_name(k): v["tau"] for k, v in r.items()}
            rows.append((step, t, taus))
        final = out / "eagle3" / "eval.json"
        if final.is_file():
            rows.append(
                (
                    last_step,
                    args.train_seconds,
                    {set_name(k): v["tau"] for k, v in json.loads(final.read_text()).items()},
                )
            )
        for step, t, taus in rows:
            lines.append(
                f"| {step} | {t:.0f} | {taus.get('MT-Bench', float('nan')):.3f} | {taus.get('held-out ShareGPT', float('nan')):.3f} |"
            )
            for k, v in taus.items():
                series.setdefault(k, []).append((t, v))
        lines += ["", "Projection (least squares tau = a + b ln t over the points above; a log fit flattens, so this is "
                  "optimistic only if the curve bends down sooner):", ""]  # fmt: skip
        goal = {"MT-Bench": 2.5, "held-out ShareGPT": 3.0}
        for k, pts in series.items():
            fit = fit_log(pts)
            if fit is None:
                continue
            a0, b = fit
            at = {s: a0 + b * math.log(s) for s in (600, 1200, 3600)}
            need = math.exp((goal[k] - a0) / b) if b > 0 and k in goal else float("inf")
            lines.append(
                f"- {k}: tau ~ {a0:.2f} + {b:.3f} ln(t): {at[600]:.2f} at 10 min, {at[1200]:.2f} at 20 min, "
                f"{at[3600]:.2f} at 1 h of training; the target {goal.get(k, '?')} at ~{need / 60:.0f} min"
            )
    # the held-out validation along the training (OUT/<alg>/validation.jsonl, `--val-data` / `--data-holdout`):
    # the simulated tau on the target's own answers to held-out first turns, what decoding sees
    vals = {a: read_jsonl(out / a / "validation.jsonl") for a in algs}
    if any(vals.values()):
        lines += ["", "## Held-out validation along the training (the target's answers to held-out ShareGPT "
                  "first turns)", "",
                  "| recipe | step | ~training s | held-out tau (decoding walk) | held-out tau_sim | held-out loss | tokens |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for a in algs:
            ms = read_jsonl(out / a / "metrics.jsonl")
            end = ms[-1]["step"] if ms else 0
            pts = []
            for v in vals[a]:
                keys = ("val_tau_sim", "val_tau_train", "val_accept_len")
                sim = next((v[k] for k in keys if k in v), float("nan"))
                tau = v.get("val_tau_decode", sim)
                t = v["step"] / end * args.train_seconds if end else float("nan")
                pts.append((t, tau))
                lines.append(
                    f"| {a} | {v['step']} | {t:.0f} | {tau:.3f} | {sim:.3f} | {v['val_loss']:.3f} | {v['val_tokens']:,} |"
                )
            fit = fit_log([p for p in pts if p[0] > 0 and p[0] == p[0]])
            if a == "eagle3" and fit is not None and fit[1] > 0:
                a0, b = fit
                lines.append(
                    f"| {a} | projection | | tau ~ {a0:.2f} + {b:.3f} ln(t): {a0 + b * math.log(1200):.2f} at 20 min; "
                    f"3.0 at ~{math.exp((3.0 - a0) / b) / 60:.0f} min | | | |"
                )
    if m:
        lines += ["", "Simulated tau on the training data (EAGLE-3, from metrics.jsonl): " + ", ".join(
            f"step {x['step']}: {x.get('tau_sim', float('nan')):.2f}" for x in m[:: max(1, len(m) // 8)])]  # fmt: skip
    rem, loc = read_jsonl(out / "same" / "remote.jsonl"), read_jsonl(out / "same" / "local.jsonl")
    if rem and loc:
        n = min(len(rem), len(loc))
        diffs = [abs(rem[i]["loss"] - loc[i]["loss"]) for i in range(n)]
        lines += ["", "## Remote-trained vs in-process-trained (EAGLE-3 recipe, same seed and data, 20 steps)", "",
                  "| steps compared | identical losses | max abs loss difference | loss at the last step (remote / in-process) |",
                  "|---|---|---|---|",
                  f"| {n} | {sum(d == 0 for d in diffs)}/{n} | {max(diffs):.2e} | {rem[n - 1]['loss']:.5f} / {loc[n - 1]['loss']:.5f} |"]  # fmt: skip
    (out / "draft_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
