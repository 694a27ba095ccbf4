"""A target larger than one GPU: transformers' own tensor-parallel plans under `torchrun`.

`torchrun --nproc-per-node K -m draftfeed.server.cli serve --model DIR` starts K processes. Each
loads its shard with `from_pretrained(..., tp_plan="auto")`; rank 0 runs the gRPC server and the
scheduler, and before each forward broadcasts the batch (a small header, then the token tensors) so
that every rank runs the same forward and takes part in its collectives. With the "auto" plans the
decoder layers' outputs are all-reduced and the logits gathered, so the hooks on rank 0 capture full,
replicated tensors, exactly what a single-GPU server captures (up to reduction order).

The embedding and lm_head weights that clients fetch once are gathered from the shards on request
(every rank joins), and the fingerprint is computed over full tensors, so a TP=K server reports the
same fingerprint as a single-GPU server of the same checkpoint.

Followers ignore the first SIGTERM/SIGINT (torchrun forwards it to every rank) and wait for rank 0
to drain and release them; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from draftfeed.client.errors import InvalidArgument
from draftfeed.target.backends import forward_for
from draftfeed.target.capture import TargetLayout, discover
from draftfeed.target.features import Needs, TokenBatch
from draftfeed.target.fingerprint import fingerprint

from .config import ServeConfig

__all__ = ["TensorParallel", "check_shardable"]

log = logging.getLogger("draftfeed.tp")

_FIELDS = ("input_ids", "attention_mask", "loss_mask", "position_ids", "seq_lens", "doc_remaining")


class _FullStateDict:
    """state_dict() whose tensors are gathered one at a time (a collective on every rank)."""

    def __init__(self, model):
        self.model = model

    def items(self):
        for name, t in self.model.state_dict(keep_vars=True).items():
            with torch.inference_mode(False), torch.no_grad():  # DTensors refuse inference mode
                full = _full(t.detach())
            yield name, full


class _Gathered:
    def __init__(self, model):
        self.config = model.config
        self._model = model

    def state_dict(self):
        return _FullStateDict(self._model)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_shardable(config, world_size: int) -> None:
    """InvalidArgument unless the attention heads, KV heads and MLP width divide by `world_size`
    (transformers' plans shard them evenly; an uneven split fails only at the first forward)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(text, what, None)
        if isinstance(n, int) and n % world_size:
            raise InvalidArgument(
                f"tensor parallel x{world_size} needs {what} ({n}) to divide by {world_size}; "
                f"this target cannot be sharded that way: serve it on one GPU, or pick a size that divides it"
            )


class TensorParallel:
    """This process's place in the tensor-parallel group, and the leader/follower protocol."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.fingerprint = ""
        self._model = None
        self._lock = threading.Lock()  # one collective sequence at a time on the leader
        self._released = False

    # -- setup (every rank) -------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: ServeConfig):
        """Join the process group, load this rank's shard, compute the fingerprint (collectively).
        Returns (group, model)."""
        from transformers import AutoModelForCausalLM

        from draftfeed.target.loading import default_target_path

        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        if cuda:
            torch.cuda.set_device(cfg.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                timeout=timedelta(minutes=30),
                device_id=torch.device("cuda", cfg.local_rank) if cuda else None,
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != cfg.tensor_parallel:
            raise RuntimeError(f"torchrun started {world} ranks but the config says {cfg.tensor_parallel}")
        path = cfg.model
        if path is None:  # the built-in default target: rank 0 converts it once, the others wait
            if rank == 0:
                path = str(default_target_path())
            dist.barrier()
            path = path or str(default_target_path())
        from transformers import AutoConfig

        check_shardable(AutoConfig.from_pretrained(path, local_files_only=True), world)
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype, local_files_only=True)
        model.requires_grad_(False)
        model.eval()
        device = next(model.parameters()).device
        tp = cls(rank, world, device)
        tp._model = model
        tp.fingerprint = fingerprint(_Gathered(model))
        log.info("rank %d/%d loaded its shard of %s on %s", rank, world, path, device)
        return tp, model

    # -- leader (rank 0) ----------------------------------------------------------------------

    def _send(self, header: dict) -> None:
        dist.broadcast_object_list([header], src=0)

    def forward(self, model, layout: TargetLayout, tb: TokenBatch, needs: Needs):
        """The scheduler's forward on rank 0: broadcast the batch, then run it like every rank."""
        with self._lock:
            fields = {n: getattr(tb, n) for n in _FIELDS}
            meta = {n: (tuple(t.shape), t.dtype) for n, t in fields.items() if t is not None}
            self._send({"op": "forward", "fields": meta, "needs": needs})
            for name in meta:
                dist.broadcast(fields[name].to(self.device).contiguous(), src=0)
            return forward_for(model, layout, tb, needs)

    def gather(self, getter: str) -> torch.Tensor:
        """A full host copy of `model.<getter>().weight` (every rank takes part)."""
        with self._lock:
            self._send({"op": "gather", "getter": getter})
            return _full(getattr(self._model, getter)().weight.detach()).cpu().contiguous()

    def release(self) -> None:
        """Tell the followers to exit (after the last batch), then leave the group."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._send({"op": "stop"})
        dist.destroy_process_group()

    # -- followers (rank > 0) -----------------------------------------------------------------

    def follow(self, model) -> int:
        """Run every forward and gather rank 0 broadcasts, until it says stop. Returns 0."""
        _follower_signals()
        layout = discover(model)
        n = 0
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            header = box[0]
            if header["op"] == "stop":
                break
            if header["op"] == "gather":
                _full(getattr(model, header["getter"])().weight.detach())
                continue
            fields = {}
            for name, (shape, dtype) in header["fields"].items():
                t = torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(t, src=0)
                fields[name] = t
            tb = TokenBatch(**{n: fields.get(n) for n in _FIELDS})
            try:
                forward_for(model, layout, tb, header["needs"])
            except Exception:  # noqa: BLE001 - rank 0 answers the request; keep following
                log.exception("rank %d: a forward failed", self.rank)
            n += 1
        log.info("rank %d: released after %d forwards", self.rank, n)
        dist.destroy_process_group()
        return 0


def _follower_signals() -> None:
    count = {"n": 0}

    def on_signal(signum, _frame):
        count["n"] += 1
        if count["n"] > 1:
            os._exit(1)
        print(
            f"draftfeed: tp follower: signal {signum}: waiting for rank 0 to drain",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
