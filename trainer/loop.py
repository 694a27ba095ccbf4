"""The training loop: one for every draft algorithm (`algorithms/`) and every target backend.

Per optimizer step: `grad_accum` micro-batches, each a target batch that was requested `prefetch`
batches ahead with `generate_batch_async` (a remote target computes the next batches while the draft
trains on this one; an in-process target runs them when they are asked for), scored by the algorithm
under bf16 autocast on GPU (its fused kernels compiled per `loop.compile`, `compiling.py`); then gradient
clipping, AdamW, and the learning-rate schedule (linear warmup, cosine to `min_lr_ratio * lr`, paced by
`--time-limit` when one is set: whichever ends first, steps or time). Under
torchrun the scoring module is wrapped in DDP (gloo on CPU, nccl on GPU); each rank has its own backend and its own shard of the data. Rank 0 shows a progress bar on a
terminal (`progress.py`: loss, accuracy, tokens per second, eta) and writes a progress line and a
metrics.jsonl record (TensorBoard scalars too when it is installed) every `log_every` steps.

Checkpoints (`OUT/checkpoints/step_NNNNNNN/`): `trainer.pt` (rank 0: the draft's trainable weights and
buffers, optimizer, scheduler, step, algorithm state) and `rank_R.pt` per rank (the data iterator's
position after the last batch trained on, the RNG states, and the rank's own algorithm state, e.g. the
block drafts' anchor generator). Resuming loads them, re-sends the
algorithm's session state (EAGLE-3: the vocab mapping) and re-requests the batches that were in flight,
so the run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from draftfeed.client.errors import Unavailable

from .algorithms import DistContext, DraftAlgorithm
from .compiling import resolve_compile, set_compile
from .config import DistConfig, TrainConfig, config_to_dict
from .progress import ProgressBar, format_duration, progress_enabled
from .signals import StopSignals, TrainingInterrupted

__all__ = [
    "lr_lambda",
    "resolve_device",
    "init_distributed",
    "TrainStep",
    "TrainResult",
    "Trainer",
    "latest_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
_COMPLETE = "complete"
CPU_ETA_WARN_S = 600.0  # on a CPU, warn after the first step when the run would take longer than this


def lr_lambda(
    total_steps: int, warmup_steps: int, min_lr_ratio: float, time_progress: Callable[[], float] | None = None
):
    """Multiplier of the peak lr before optimizer step `s` (0-based): (s+1)/warmup during warmup, then a
    cosine from 1 to `min_lr_ratio` over the remaining steps. With `time_progress` (the fraction of a time
    budget spent, see `Trainer`) warmup and cosine run at the pace of whichever ends first, steps or time
    (the warmup takes the same share of either), so a run cut by `--time-limit` still ends annealed."""

    w = warmup_steps / max(1, total_steps)  # the warmup's share of the run

    def factor(step: int) -> float:
        spent = 0.0 if time_progress is None else min(1.0, time_progress())
        if step < warmup_steps and spent < w:
            return max((step + 1) / warmup_steps, spent / w)
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        if time_progress is not None:
            progress = max(progress, (spent - w) / max(1e-9, 1 - w))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _read_metrics(entries: list[dict]) -> dict:
    """Turn the metric tensors of `entries` (0-d, on the device) into floats in place, with one copy to
    the host for all of them, and empty the list: the loop reads its metrics only when it logs, so the host
    queues the next steps while the device still runs this one. Returns the last entry ({} if none)."""
    slots = [(e, k) for e in entries for k, v in e.items() if isinstance(v, torch.Tensor)]
    if slots:
        dev = slots[0][0][slots[0][1]].device
        values = torch.stack([e[k].float().reshape(()).to(dev) for e, k in slots]).tolist()
        for (e, k), v in zip(slots, values, strict=True):
            e[k] = v
    last = entries[-1] if entries else {}
    entries.clear()
    return last


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(dist_cfg: DistConfig, device: torch.device) -> DistContext:
    """Join the process group torchrun set up (MASTER_ADDR / MASTER_PORT); nothing for one process."""
    if dist_cfg.world_size > 1 and not tdist.is_initialized():
        backend = dist_cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend, rank=dist_cfg.rank, world_size=dist_cfg.world_size)
    return DistContext(rank=dist_cfg.rank, world_size=dist_cfg.world_size)


class TrainStep(nn.Module):
    """The module DDP wraps: the draft plus its algorithm's loss. forward(batch) -> (loss, metrics)."""

    def __init__(self, algorithm: DraftAlgorithm, draft: nn.Module, dist: DistContext):
        super().__init__()
        self.draft = draft
        self.algorithm = algorithm
        self.dist = dist

    def forward(self, batch):
        out = self.algorithm.loss(self.draft, batch, self.dist)
        return out.loss, out.metrics


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step of this run


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under OUT/checkpoints, or None."""
    root = Path(out_dir) / CHECKPOINT_DIR
    done = sorted(p for p in root.glob("step_*") if (p / _COMPLETE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(t):
    """A tensor that autograd may save: inference-mode outputs of an in-process target are cloned."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


class Trainer:
    """Owns the optimisation of one draft. `batches` is a `TokenBatchIterator` (or any iterator of
    `TokenBatch` with `state_dict` / `load_state_dict`); `total_steps` sizes the schedule."""

    def __init__(
        self,
        cfg: TrainConfig,
        algorithm: DraftAlgorithm,
        draft: nn.Module,
        backend,
        batches,
        total_steps: int,
        *,
        device: torch.device,
        dist: DistContext | None = None,
        val_batches: list | None = None,
    ):
        self.cfg, self.algorithm, self.backend, self.batches = cfg, algorithm, backend, batches
        self.val_batches = val_batches or []  # held-out batches (validation.py), measured every val period
        self.validated_at: int | None = None
        self.total_steps = total_steps
        self.device = device
        self.dist = dist or DistContext()
        self.draft = draft.to(device)
        self.draft.train()
        self.module: nn.Module = TrainStep(algorithm, self.draft, self.dist)
        if self.dist.world_size > 1:
            self.module = DistributedDataParallel(self.module, device_ids=None)
        self.params = [p for p in self.draft.parameters() if p.requires_grad]
        self.frozen = {n for n, p in self.draft.named_parameters() if not p.requires_grad}
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
        )
        warmup = int(o.warmup_ratio * total_steps)
        # a time limit paces the schedule: seconds trained in earlier runs (a resumed checkpoint) plus this
        # run's, over those plus this run's limit; measured on rank 0's clock at each optimizer step
        self.prior_seconds = 0.0  # training seconds of the runs this one resumes
        self.elapsed = 0.0  # seconds of this run, updated before each scheduler step
        paced = None
        if cfg.loop.time_limit is not None:
            limit = cfg.loop.time_limit

            def paced() -> float:
                return (self.prior_seconds + self.elapsed) / (self.prior_seconds + limit)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup, o.min_lr_ratio, paced)
        )
        self.step = 0
        self.data_state = batches.state_dict()
        self.out_dir = cfg.out_dir
        self.autocast = cfg.loop.bf16 and device.type == "cuda"
        set_compile(resolve_compile(cfg.loop.compile, device))
        self._metrics_file = None
        self._tb = None
        self._bar: ProgressBar | None = None

    # -- checkpoints ------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            tdist.barrier()

    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step_NNNNNNN (all ranks call this) and prune old ones."""
        root = self.out_dir / CHECKPOINT_DIR
        path = root / f"step_{self.step:07d}"
        if self.dist.rank == 0:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self._barrier()
        if self.dist.rank == 0:
            draft_state = {k: v for k, v in self.draft.state_dict().items() if k not in self.frozen}
            torch.save(
                {
                    "step": self.step,
                    "total_steps": self.total_steps,
                    "draft": draft_state,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "train_seconds": self.prior_seconds + self.elapsed,
                    "algorithm": self.algorithm.state_dict(),
                    "config": config_to_dict(self.cfg),
                },
                path / "trainer.pt",
            )
        torch.save(
            {"data": self.data_state, "rng": _rng_state(), "algorithm": self.algorithm.state_dict()},
            path / f"rank_{self.dist.rank}.pt",
        )
        self._barrier()
        if self.dist.rank == 0:
            (path / _COMPLETE).write_text(f"{self.step}\n")
            done = sorted(p for p in root.glob("step_*") if (p / _COMPLETE).is_file())
            for old in done[: -self.cfg.loop.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state `save_checkpoint` wrote (same world size and data settings)."""
        path = Path(path)
        if not (path / _COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_COMPLETE!r} marker)")
        mine = path / f"rank_{self.dist.rank}.pt"
        if not mine.is_file():
            raise FileNotFoundError(
                f"{mine} is missing: the checkpoint was written by fewer ranks than this run has "
                f"(resume with the same number of processes)"
            )
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        missing, unexpected = self.draft.load_state_dict(state["draft"], strict=False)
        if set(missing) - self.frozen or unexpected:
            raise ValueError(f"{path}: draft weights do not fit (missing {missing}, unexpected {unexpected})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.prior_seconds = float(state.get("train_seconds", 0.0))
        rank_state = torch.load(mine, map_location="cpu", weights_only=False)
        self.algorithm.load_state_dict(rank_state.get("algorithm", state["algorithm"]))
        self.batches.load_state_dict(rank_state["data"])
        self.data_state = rank_state["data"]
        _set_rng_state(rank_state["rng"])

    # -- logging ----------------------------------------------------------------------------

    def _open_logs(self) -> None:
        if self.dist.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if self.cfg.loop.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                return
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _validate(self) -> float:
        """Measure the draft on the held-out batches (validation.py); rank 0 appends the record to
        OUT/validation.jsonl. Returns the seconds it took (the loop's throughput clock leaves them out)."""
        from .validation import measure

        record = measure(
            self.algorithm, self.draft, self.backend, self.val_batches, device=self.device, dist=self.dist,
            autocast=self.autocast, prefetch=self.cfg.loop.prefetch, answer_tokens=self.cfg.loop.val_answer_tokens,
        )  # fmt: skip
        self.validated_at = self.step
        if self.dist.rank == 0:
            record = {"step": self.step, **record}
            with open(self.out_dir / "validation.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in record.items():
                    if k != "step":
                        self._tb.add_scalar(f"val/{k.removeprefix('val_')}", v, self.step)
            shown = "  ".join(
                f"{k.removeprefix('val_')} {v:.3f}"
                for k, v in record.items()
                if k not in ("step", "val_tokens", "val_seconds")
            )
            self._say(
                f"{self.algorithm.name} step {self.step} validation ({record['val_tokens']:,} held-out tokens, "
                f"{record['val_seconds']:.1f} s): {shown}"
            )
        return record["val_seconds"]

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _log(self, window: list[dict], seconds: float, tokens: int, wait: float) -> None:
        """Average `window` (this rank's steps since the last log) over ranks; rank 0 writes it."""
        keys = sorted(k for k in window[0] if k != "step")
        local = torch.tensor(
            [[sum(w[k] for w in window) / len(window) for k in keys] + [tokens]], dtype=torch.float64
        )
        if self.dist.world_size > 1:
            local = local.to(self.device if self.device.type == "cuda" else "cpu")
            tdist.all_reduce(local)
            local = local.cpu()
            local[0, : len(keys)] /= self.dist.world_size
        if self.dist.rank != 0:
            return
        values = dict(zip(keys, local[0, : len(keys)].tolist(), strict=True))
        record = {"step": self.step, **values, "tokens_per_s": float(local[0, -1]) / max(seconds, 1e-9)}
        record["target_wait"] = wait / max(seconds, 1e-9)
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(f"train/{k}", v, self.step)
        tau = next((k for k in ("tau_sim", "tau_train", "accept_len") if k in record), None)
        self._say(
            f"{self.algorithm.name} step {self.step}/{self.total_steps}  loss {record['loss']:.4f}  "
            f"acc {record.get('accuracy', 0):.3f}"
            + (f"  {tau} {record[tau]:.2f}" if tau else "")
            + f"  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  target wait {100 * record['target_wait']:.0f}%"
        )

    # -- training ---------------------------------------------------------------------------

    def _micro_step(self, target, sync: bool) -> dict[str, float]:
        """Forward + backward of one target batch (gradients all-reduced only when `sync`)."""
        target = type(target)(**{k: _plain(v) for k, v in target.to(self.device).tensors().items()})
        no_sync = self.dist.world_size > 1 and not sync
        with self.module.no_sync() if no_sync else nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext():
                loss, metrics = self.module(target)
            (loss / self.cfg.optim.grad_accum).backward()  # outside autocast, as torch recommends
        return {k: m.detach().float().reshape(()) for k, m in metrics.items()}  # read at the next log

    def _clock(self, start: float) -> None:
        """`elapsed` = this run's seconds, rank 0's on every rank (the paced lr and the stop agree)."""
        elapsed = time.perf_counter() - start
        if self.dist.world_size > 1:
            t = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
            tdist.broadcast(t, 0)
            elapsed = float(t.item())
        self.elapsed = elapsed

    def _say(self, msg: str) -> None:
        """A line on rank 0's stderr (above the progress bar when one is shown)."""
        if self.dist.rank != 0:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _target_batch(self, future):
        """The target's answer for one batch. A remote backend's future always completes (its retry
        budget rides out a server restart); `max_wait_s` bounds the wait in case it does not."""
        bound = getattr(self.backend, "max_wait_s", None)
        try:
            return future.result(timeout=bound)
        except TimeoutError:
            raise Unavailable(
                f"the target gave no answer for a batch in {bound:.0f} s (the client's timeout and retry "
                f"budget); training stopped at step {self.step}"
            ) from None

    def _warn_if_slow_on_cpu(self, first_step_s: float) -> None:
        """The defaults are sized for a GPU: on a CPU say how long the run will take, and what to shrink."""
        eta = first_step_s * (self.total_steps - self.step)
        if self.device.type != "cpu" or eta < CPU_ETA_WARN_S:
            return
        d = self.cfg.data
        shrink = (
            f"--seq-len {d.seq_len}, --batch-size {d.batch_size}, --grad-accum {self.cfg.optim.grad_accum}"
        )
        if extra := self.algorithm.size_flags():
            shrink += f", {extra}"
        self._say(
            f"warning: training on the CPU: step {self.step} took {first_step_s:.0f} s, so the "
            f"{self.total_steps - self.step} steps left need about {format_duration(eta)} (eta). The defaults "
            f"are sized for a GPU: use --device cuda, or shrink {shrink}, or pass fewer --steps"
        )

    def _optimizer_step(self) -> dict[str, float]:
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip).detach()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def train(self) -> TrainResult:
        """Run until `total_steps` optimizer steps (or the data ends); save a final checkpoint."""
        cfg = self.cfg
        self.algorithm.prepare_backend(self.backend, self.draft)
        self._open_logs()
        if self.dist.rank == 0:
            self._bar = ProgressBar(
                self.algorithm.name,
                self.total_steps,
                self.step,
                enabled=progress_enabled(cfg.loop.progress, sys.stderr),
            )
        pending: deque = deque()
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < cfg.loop.prefetch:
                try:
                    tb = next(self.batches)
                except StopIteration:
                    exhausted = True
                    return
                with torch.no_grad():
                    future = self.backend.generate_batch_async(**tb.backend_kwargs())
                pending.append((tb, future))

        result = TrainResult(steps=0, seconds=0.0, tokens=0)
        unread: list[dict] = []  # entries whose metrics are still tensors on the device
        shown: dict = {}  # the latest entry read: the progress bar and the status page show it
        read_at = 0.0
        start = window_start = time.perf_counter()
        window, window_tokens, window_wait = [], 0, 0.0
        accum = cfg.optim.grad_accum
        stop = StopSignals()
        # what a checkpoint of the last finished optimizer step holds beyond the weights: the data position,
        # the RNG states and the algorithm's (anchor draws of a step cut by a signal are drawn again)
        committed = (self.data_state, _rng_state(), self.algorithm.state_dict())
        saved = self.step if latest_checkpoint(self.out_dir) else None  # a step whose checkpoint exists
        try:
            stop.__enter__()
            while self.step < self.total_steps:
                sums: dict[str, float] = {}
                done = step_tokens = 0
                while done < accum:
                    t0 = time.perf_counter()
                    fill()
                    if not pending:
                        break
                    tb, future = pending.popleft()
                    target = self._target_batch(future)
                    fill()  # keep the target busy while this batch trains
                    window_wait += time.perf_counter() - t0  # in-process: the target's forwards themselves
                    metrics = self._micro_step(target, sync=done == accum - 1)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v / accum
                    tokens = int(tb.attention_mask.sum())
                    step_tokens += tokens
                    window_tokens += tokens
                    result.tokens += tokens
                    self.data_state = tb.data_state
                    done += 1
                if done < accum:  # the data ended inside an optimizer step: drop the partial step
                    self.optimizer.zero_grad(set_to_none=True)
                    break
                with stop.deferred():  # a signal here is raised after the step (and its checkpoint)
                    if cfg.loop.time_limit is not None:
                        self._clock(start)
                    entry = {"step": self.step + 1, **sums, **self._optimizer_step()}
                    self.step += 1
                    committed = (self.data_state, _rng_state(), self.algorithm.state_dict())
                    result.steps += 1
                    result.history.append(entry)
                    unread.append(entry)
                    if (
                        cfg.loop.save_every
                        and self.step % cfg.loop.save_every == 0
                        and self.step < self.total_steps
                    ):
                        self.save_checkpoint()
                        saved = self.step
                if result.steps == 1:
                    self._warn_if_slow_on_cpu(time.perf_counter() - start)
                window.append(entry)
                log_now = self.step % cfg.loop.log_every == 0 or self.step == self.total_steps
                # the loop's own host syncs: the metrics, read at once when it logs, and for a progress bar
                # at most once a second (the first step's at once)
                bar_due = self._bar is not None and (not shown or time.perf_counter() - read_at > 1.0)
                if log_now or bar_due:
                    shown, read_at = _read_metrics(unread) or shown, time.perf_counter()
                report = getattr(self.backend, "report_progress", None)  # for the server's status page
                if report is not None:
                    report(self.step, shown.get("loss"))
                if self._bar is not None:  # rank 0's tokens x ranks (equal shards); metrics.jsonl has the sum
                    self._bar.update(self.step, step_tokens * self.dist.world_size, shown)
                if log_now:
                    now = time.perf_counter()
                    self._log(window, now - window_start, window_tokens, window_wait)
                    window, window_tokens, window_wait, window_start = [], 0, 0.0, now
                period = cfg.loop.validation_period()
                if self.val_batches and period and self.step % period == 0 and self.step < self.total_steps:
                    window_start += self._validate()  # not counted in the next window's tokens/s
                if cfg.loop.time_limit is not None and self.elapsed > cfg.loop.time_limit:
                    if window:
                        _read_metrics(unread)
                        self._log(window, time.perf_counter() - window_start, window_tokens, window_wait)
                    self._say(f"time limit of {cfg.loop.time_limit:.0f} s reached at step {self.step}")
                    break
            if result.steps:
                if self.val_batches and cfg.loop.val_every != 0 and self.validated_at != self.step:
                    self._validate()  # the final draft's
                with stop.deferred():
                    self.save_checkpoint()
        except TrainingInterrupted as err:
            stop.hold()  # a second signal does not cut the save
            err.step = self.step
            # the state after the last finished step: its batches and draws come again on resume
            self.data_state, rng, algorithm_state = committed
            _set_rng_state(rng)
            self.algorithm.load_state_dict(algorithm_state)
            if saved != self.step and self.step > 0 and self.dist.world_size == 1:
                self._say(f"{err.name}: saving a checkpoint of step {self.step} ...")
                err.checkpoint = self.save_checkpoint()
            else:  # nothing new, or several ranks (the periodic checkpoint is the latest)
                err.checkpoint = latest_checkpoint(self.out_dir)
            raise
        finally:
            stop.__exit__(None, None, None)
            _read_metrics(unread)  # the history holds numbers
            for _, future in pending:
                future.cancel()
            self._close_logs()
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        result.seconds = time.perf_counter() - start
        return result
