"""Draft algorithms as the training loop sees them: which backend feeds them, how the draft is built,
how one batch is scored, how the result is exported and read back, and how it drafts for evaluation.

The loop (`loop.py`) is one for every algorithm; an algorithm is a `DraftAlgorithm` subclass in its own
module here (`eagle3.py`, `dflash.py`, `dspark.py`; the block drafts share `block.py`) that adds itself to
`ALGORITHMS`. Its backends, layer ids and reply fields come from the client / server registries
(`draftfeed.client.algorithms`, `draftfeed.target.algorithms`). The block drafts (DFlash, DSpark) share
`BlockAlgorithm`: their backend's frozen embedding / lm_head are fetched once when the draft is built,
anchors are drawn from a per-rank generator that checkpoints with the run, and their loss denominators
are all-reduced over ranks (`DistContext`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
from torch import nn

__all__ = [
    "StepOutput",
    "DistContext",
    "DraftAlgorithm",
    "Eagle3Algorithm",
    "BlockAlgorithm",
    "DFlashAlgorithm",
    "DSparkAlgorithm",
    "block_layer_ids",
    "register",
    "ALGORITHMS",
]


@dataclass
class StepOutput:
    """`loss` is differentiable; `metrics` are detached scalars (averaged over micro-batches and ranks).
    `decode_walk` (EAGLE-3): (max_tokens) -> (rounds, tokens) of greedy speculative decoding over the batch's answers
    (the first max_tokens of each; None: all),
    read off the TTT unroll (`losses.decode_walk`); validation calls it, training never does (a host sync)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    decode_walk: Callable[[int | None], tuple[int, int]] | None = None


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place on a copy); the identity in a single process."""
        if self.world_size == 1:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t


class DraftAlgorithm(ABC):
    """What the loop needs from an algorithm. `cfg` is the whole `TrainConfig`."""

    name: ClassVar[str]

    def __init__(self, cfg):
        self.cfg = cfg

    @abstractmethod
    def open_backend(self, model: nn.Module | None, device: torch.device):
        """The in-process backend over `model` when given, else the remote client for `cfg.target.url`."""

    def needs_token_counts(self, vocab_size: int) -> bool:
        """True when `build_draft` needs the supervised-token counts of the training data."""
        return False

    @abstractmethod
    def build_draft(
        self, backend, target_config: Any, token_counts: torch.Tensor | None, special_ids: list[int]
    ) -> nn.Module:
        """A freshly initialised draft (the caller seeds the RNG first)."""

    def size_flags(self) -> str:
        """This algorithm's own flags that make a step cheaper (named in the slow-on-CPU warning)."""
        return ""

    def prepare_backend(self, backend, draft: nn.Module) -> None:  # noqa: B027 - optional
        """Session state the backend needs before the first batch (called again after a resume)."""

    @abstractmethod
    def loss(self, draft: nn.Module, batch, dist: DistContext) -> StepOutput:
        """Score one target batch."""

    @abstractmethod
    def export(self, draft: nn.Module, out_dir: Path, target_config: Any, backend) -> Path:
        """Write the draft in the layout serving engines load."""

    def state_dict(self) -> dict:
        """Algorithm-owned state to checkpoint (e.g. an anchor-sampling generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027 - optional
        pass

    # -- its exports and their evaluation (`draftfeed eval`) ------------------------------------

    architectures: ClassVar[tuple[str, ...]] = ()  # config.json `architectures` names of its exports

    @classmethod
    @abstractmethod
    def load_export(cls, path, target, *, device=None, dtype=None) -> tuple[nn.Module, list[int] | None]:
        """(the draft, the target layer ids it reads) of an export in `path`, for the HF `target`."""

    @classmethod
    @abstractmethod
    def drafter(cls, draft: nn.Module, confidence_threshold: float = 0.0):
        """The drafter `trainer/evaluate.py` measures the draft with."""


ALGORITHMS: dict[str, type[DraftAlgorithm]] = {}


def register(cls: type[DraftAlgorithm]) -> type[DraftAlgorithm]:
    """Class decorator: add a `DraftAlgorithm` to `ALGORITHMS` under its `name`."""
    ALGORITHMS[cls.name] = cls
    return cls


# the built-in algorithms register themselves, in this order
# isort: off
from .eagle3 import Eagle3Algorithm  # noqa: E402
from .block import BlockAlgorithm, block_layer_ids  # noqa: E402
from .dflash import DFlashAlgorithm  # noqa: E402
from .dspark import DSparkAlgorithm  # noqa: E402
# isort: on
