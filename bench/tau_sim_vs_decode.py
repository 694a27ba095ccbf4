"""Diagnostic: simulated tau (the trainer's own code path) vs real decoding tau of an exported EAGLE-3 draft,
against the built-in default target: on the CPU in fp32 by default (one thread: it runs beside other work), or
on the GPU in the eval's dtype (`--device cuda --dtype bfloat16`, what `bench/gpu_recipe.sh` runs with
WALK_CHECK=1).

    python bench/tau_sim_vs_decode.py --draft RUN/export --sets train=train.jsonl,held=held.jsonl --k 3 \
        --seq-len 512 --per-conv 20 --max-new 96 --out simtau.json

Results: bench/results/tau_sim_vs_decode_cpu_2026-12-06.md.

For a set of conversations (regenerated JSONL):
 1. tau_sim exactly as the trainer logs it: packed rows of --seq-len, HFEagle3TargetModel.generate_batch ->
    Eagle3TargetBatch.to_trainer_inputs -> eagle3_batch_loss (trainer/losses.py) in no_grad; reported as the
    mean over batches (what metrics.jsonl averages) and pooled over all slots.
 2. per conversation (unpacked, one row): the token ids the trainer trains on vs the ids eval feeds the target
    (evaluate.prompt_token_ids of the first user turn + the target's greedy continuation), and a real decoding
    (measure_tau protocol, Eagle3ChainDrafter, K) whose every round (start L, accepted a) is compared with the
    TTT unroll's chain hits at the slot that round starts from (slot L-2: row (A_{L-2}, x_{L-1}) predicts x_L);
    the decoding walk over whole answers and over their first --max-new tokens.
 3. `draftfeed eval`'s own loop on the same prompts (StaticTarget + StaticEagle3Drafter: CUDA graphs and the
    compiled draft kernels on a GPU): `eval_loop_tau` against the eager decoding's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from draftfeed.target.backends import HFEagle3TargetModel
from draftfeed.target.loading import load_target, load_tokenizer
from draftfeed.trainer.compiling import compiling_as
from draftfeed.trainer.data import ChatDataset, TokenBatchIterator, read_chat_file, tokenize_chat
from draftfeed.trainer.evaluate import (
    Eagle3ChainDrafter,
    StaticEagle3Drafter,
    StaticTarget,
    TargetVerifier,
    TauResult,
    chain_rounds,
    decode_speculative,
    eos_token_ids,
    prompt_token_ids,
    speculative_capacity,
)
from draftfeed.trainer.export import load_draft
from draftfeed.trainer.losses import decode_walk, eagle3_batch_loss, eagle3_ttt_loss


def say(*a):
    print(*a, flush=True)


@torch.no_grad()
def sim_tau(draft, backend, convs, tok, k, seq_len, pack=True):
    """tau_sim over `convs` through the trainer's path (packed rows like training)."""
    ds = ChatDataset(convs, tok, seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    it = TokenBatchIterator(ds, 1, seq_len, pack=pack, seed=0, pad_token_id=pad, num_epochs=1)
    taus, weights = [], []
    hits = torch.zeros(k)
    valids = torch.zeros(k)
    accs = []
    walk_rounds = walk_tokens = 0
    dev = backend.device
    for batch in it:
        tb = backend.generate_batch(**batch.backend_kwargs())
        inputs = tb.to_trainer_inputs()
        out = eagle3_batch_loss(draft, inputs, k)  # the trainer's own function (algorithms/eagle3.py loss)
        taus.append(float(out.tau_sim))
        accs.append(out.step_accuracies.tolist())
        # pooled version of the same formula, from the same logits
        steps = list(
            draft.unroll(
                inputs["hidden_states"],
                inputs["input_ids"],
                inputs["attention_mask"],
                k,
                position_ids=inputs.get("position_ids"),
                seq_lens=inputs.get("seq_lens"),
            )
        )
        again = eagle3_ttt_loss(
            steps,
            inputs["target_probs"],
            inputs["position_mask"],
            inputs["loss_mask"],
            inputs.get("doc_remaining"),
        )
        assert abs(float(again.tau_sim) - taus[-1]) < 1e-4, (float(again.tau_sim), taus[-1])
        m0 = inputs["position_mask"].squeeze(-1).bool()
        lm0 = inputs["loss_mask"].bool()
        top = inputs["target_probs"].argmax(-1)
        dr = inputs.get("doc_remaining")
        S = m0.shape[1]
        hit = torch.ones_like(m0)
        valid = torch.ones_like(m0)
        run = torch.zeros(m0.shape, dtype=torch.long, device=dev)
        for j, lg in enumerate(steps):
            n = S - j
            m, lm = m0[:, j:], lm0[:, j:]
            if dr is not None:
                ind = dr[:, :n] > j
                m, lm = m & ind, lm & ind
            c = (lg[:, :n].argmax(-1) == top[:, j:]) & m
            hit[:, :n] &= c
            hit[:, n:] = False
            valid[:, :n] &= lm
            valid[:, n:] = False
            hits[j] += float(hit.sum())
            valids[j] += float(valid.sum())
            run += hit.long()
        r, t = decode_walk(run, lm0 & (dr > 0) if dr is not None else lm0)
        walk_rounds += r
        walk_tokens += t
        weights.append(int(lm0.sum()))
    mean = sum(taus) / max(1, len(taus))
    pooled = 1 + float((hits / valids.clamp_min(1)).sum())
    pooled_v0 = 1 + float(hits.sum() / valids[0].clamp_min(1))  # all terms over the step-0 slots
    acc = torch.tensor(accs).mean(0).tolist() if accs else []
    return dict(
        batches=len(taus),
        tau_sim_mean=mean,
        tau_sim_pooled=pooled,
        tau_sim_pooled_v0=pooled_v0,
        supervised=sum(weights),
        step_acc=[round(a, 3) for a in acc],
        tau_walk=walk_tokens / max(1, walk_rounds),
        walk_rounds=walk_rounds,
    )


@torch.no_grad()
def chain_runs(draft, backend, ids, mask, k):
    """Per slot t of one unpacked conversation: the TTT unroll's chain run length (0..k), and whether it was
    valid (step-0 loss mask)."""
    x = torch.tensor([ids], device=backend.device)
    am = torch.ones_like(x)
    lm = torch.tensor([mask], device=backend.device)
    tb = backend.generate_batch(input_ids=x, attention_mask=am, loss_mask=lm)
    inputs = tb.to_trainer_inputs()
    steps = list(draft.unroll(inputs["hidden_states"], inputs["input_ids"], inputs["attention_mask"], k))
    top = inputs["target_probs"].argmax(-1)[0]
    m0 = inputs["position_mask"].squeeze(-1).bool()[0]
    S = x.shape[1]
    run = torch.zeros(S, dtype=torch.long, device=x.device)
    alive = torch.ones(S, dtype=torch.bool, device=x.device)
    for j, lg in enumerate(steps):
        n = S - j
        c = torch.zeros(S, dtype=torch.bool, device=x.device)
        c[:n] = (lg[0, :n].argmax(-1) == top[j:]) & m0[j:]
        alive &= c
        run += alive.long()
    # draft argmax tokens of step 0 (target ids), for inspection
    d0 = draft.selected_token_ids()[steps[0][0].argmax(-1)]
    return run.cpu(), inputs["loss_mask"][0].bool().cpu(), d0.cpu()


def decode_rounds(target, drafter, prompt, k, max_new, eos):
    """measure_tau's loop (`evaluate.chain_rounds`) for one prompt: the committed ids and each round's
    (committed length at its start, accepted a, tokens committed, drafts, target preds)."""
    committed: list[int] = []
    rounds = [
        (r.start, r.accepted, len(r.got), r.drafts, r.pred)
        for r in chain_rounds(target, drafter, prompt, k, max_new, eos, committed)
    ]
    return committed, rounds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draft", required=True)
    ap.add_argument("--sets", required=True, help="name=regenerated.jsonl,...")
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--per-conv", type=int, default=20, help="conversations per set for the round-by-round check"
    )
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtype", default="float32", help="of the target and the draft (the eval's: bfloat16 on a GPU)"
    )
    ap.add_argument("--threads", type=int, default=1, help="CPU threads")
    ap.add_argument(
        "--train-kernels",
        action="store_true",
        help="run the unroll as training does on a GPU (fp32 weights, bf16 autocast, the compiled kernels); "
        "decoding stays as the eval runs it",
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    model = load_target(None, device=a.device, dtype=getattr(torch, a.dtype))
    tok = load_tokenizer(None)
    exp = load_draft(a.draft, model, device=a.device, dtype=model.dtype)
    draft = exp.draft.eval()
    unroll_draft, unroll_kernels = draft, contextlib.nullcontext
    if a.train_kernels:
        unroll_draft = load_draft(a.draft, model, device=a.device, dtype=torch.float32).draft.eval()

        @contextlib.contextmanager
        def unroll_kernels():
            with torch.autocast("cuda", dtype=torch.bfloat16), compiling_as(True):
                yield

    backend = HFEagle3TargetModel(model, aux_layer_ids=exp.layer_ids)
    backend.set_vocab_mapping(draft.selected_token_ids().cpu(), draft.t2d.cpu())
    eos = set(eos_token_ids(tok, model))
    say(
        f"draft {a.draft}: layers {exp.layer_ids}, Vd {draft.config.draft_vocab_size}, eos {sorted(eos)}, K={a.k}"
    )
    report = {}
    for spec in a.sets.split(","):
        name, path = spec.split("=")
        convs = read_chat_file(path)
        t0 = time.time()
        with unroll_kernels():
            sim = sim_tau(unroll_draft, backend, convs, tok, a.k, a.seq_len)
        say(
            f"[{name}] {len(convs)} convs; tau_sim (trainer path, packed {a.seq_len}): {sim} ({time.time() - t0:.0f} s)"
        )
        # round-by-round on the first per_conv conversations
        target = TargetVerifier(model, exp.layer_ids)
        drafter = Eagle3ChainDrafter(draft)
        tot_rounds = tot_comm = 0
        agree = n_cmp = 0
        sum_sim = sum_dec = 0
        prefix_ok = cont_match = cont_total = 0
        same_cont = 0
        sim_unpacked_hits = sim_unpacked_n = 0
        examples = []
        walk_r = walk_t = cut_r = cut_t = 0
        prompts = []
        for ci, conv in enumerate(convs[: a.per_conv]):
            chat = tokenize_chat(tok, conv, None)
            ids, mask = chat.input_ids, chat.loss_mask
            user = next(m for m in conv if m["role"] == "user")
            sys_ = [m for m in conv if m["role"] == "system"][:1]
            prompt = prompt_token_ids(tok, sys_ + [user])
            prompts.append(prompt)
            n = len(prompt)
            pre = ids[:n] == prompt
            prefix_ok += int(pre)
            first_sup = mask.index(1) if 1 in mask else len(ids)
            committed, rounds = decode_rounds(target, drafter, prompt, a.k, a.max_new, eos)
            gen = committed[n:]
            ref = ids[n:]
            m = 0
            while m < min(len(gen), len(ref)) and gen[m] == ref[m]:
                m += 1
            cont_match += m
            cont_total += len(ref)
            same_cont += int(m == len(ref) or (m == len(gen)))
            with unroll_kernels():
                run, lm, d0 = chain_runs(unroll_draft, backend, ids, mask, a.k)
            for L, acc, got, drafts, pred in rounds:
                slot = L - 2
                tot_rounds += 1
                tot_comm += got
                # compare only while decoding still follows the training sequence
                if L + acc < n + m + 1 and slot < len(run):
                    n_cmp += 1
                    sim_a = int(run[slot])
                    agree += int(sim_a == acc)
                    sum_sim += sim_a + 1
                    sum_dec += acc + 1
                    if sim_a != acc and len(examples) < 8:
                        examples.append(
                            dict(
                                conv=ci,
                                L=L,
                                decode_a=acc,
                                ttt_run=sim_a,
                                drafts=drafts,
                                target=pred[: len(drafts)],
                                train_next=ids[L : L + a.k],
                            )
                        )
            # unpacked tau_sim of this conversation from its slots (first-turn answer only): rounds-free version
            wr, wt = decode_walk(run[None], lm[None])
            walk_r += wr
            walk_t += wt
            # the same walk over the first --max-new tokens of each answer only (what the decoding covers)
            wr, wt = decode_walk(run[None], lm[None], a.max_new)
            cut_r += wr
            cut_t += wt
            sup = lm.nonzero().flatten()
            sim_unpacked_hits += int(run[sup].sum())
            sim_unpacked_n += len(sup)
            if ci < 3:
                say(
                    f"  conv {ci}: train ids {len(ids)}, prompt {n}, prefix equal {pre}, first supervised slot "
                    f"{first_sup}, decode matches train continuation for {m}/{len(ref)} tokens, "
                    f"{len(rounds)} rounds, decode tau {sum(r[2] for r in rounds) / max(1, len(rounds)):.3f}"
                )
        # `draftfeed eval`'s own loop on the same prompts (static cache, device-side drafter, CUDA graphs on a GPU)
        static = StaticTarget(
            model, exp.layer_ids, "eagle3", a.k, speculative_capacity(max(map(len, prompts)), a.max_new, a.k)
        )
        got = TauResult("static", k=a.k, accept_hist=[0] * (a.k + 2))
        with compiling_as(torch.device(a.device).type == "cuda"):  # as `draftfeed eval --compile auto`
            static_drafter = StaticEagle3Drafter(draft, static)
            for prompt in prompts:
                decode_speculative(static, static_drafter, prompt, a.max_new, eos, got)
        res = dict(
            sim=sim,
            eval_loop_tau=got.tau,
            eval_loop_rounds=got.rounds,
            per_conv=a.per_conv,
            prompt_prefix_equal=f"{prefix_ok}/{min(a.per_conv, len(convs))}",
            continuation_match=f"{cont_match}/{cont_total}",
            decode_tau_host=tot_comm / max(1, tot_rounds),
            rounds=tot_rounds,
            rounds_compared=n_cmp,
            rounds_equal_a=agree,
            mean_a_plus1_ttt=sum_sim / max(1, n_cmp),
            mean_a_plus1_decode=sum_dec / max(1, n_cmp),
            unpacked_slot_tau=1 + sim_unpacked_hits / max(1, sim_unpacked_n),
            unpacked_walk_tau=walk_t / max(1, walk_r),
            unpacked_walk_tau_first_max_new=cut_t / max(1, cut_r),
            mismatch_examples=examples,
        )
        report[name] = res
        say(f"[{name}] " + json.dumps({k: v for k, v in res.items() if k != "mismatch_examples"}))
        for e in examples[:4]:
            say("   mismatch:", json.dumps(e))
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
