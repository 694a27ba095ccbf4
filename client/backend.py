"""The target-backend interfaces a draft trainer calls.

Two real implementations of each exist: the in-process HF target (`draftfeed.server`) and the
remote client (`draftfeed.client.remote`). A training loop holds one of these and does not know
which. `Eagle3TargetBackend` follows NeMo AutoModel's contract of the same name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

import torch
from torch import nn

from .batches import DFlashTargetBatch, DSparkTargetBatch, Eagle3TargetBatch

__all__ = ["Eagle3TargetBackend", "DFlashTargetBackend", "DSparkTargetBackend", "completed_future"]


def completed_future(fn, *args, **kwargs) -> Future:
    """Run `fn` now and wrap its result (or exception) in a finished future."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - delivered through the future
        fut.set_exception(exc)
    return fut


class _TargetBackend(ABC):
    @abstractmethod
    def get_input_embeddings(self) -> nn.Module:
        """A module whose `.weight` [V,H] is the target's token embedding (frozen)."""

    @property
    def supports_async(self) -> bool:
        """True when `generate_batch_async` overlaps with the caller's work."""
        return False

    def generate_batch_async(self, *args, **kwargs) -> Future:
        """Like `generate_batch`, returning a future (`.result(timeout)`, `.cancel()`).

        The default runs at once; remote backends keep several requests in flight.
        """
        return completed_future(self.generate_batch, *args, **kwargs)

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release what the backend holds (a remote session, a model reference)."""

    def report_progress(self, step: int, loss: float | None = None) -> None:  # noqa: B027 - optional
        """The trainer's last finished optimizer step and its loss; a remote backend sends them with its
        next requests (the server's status page shows them). Nothing for an in-process target."""

    @property
    def num_remote_servers(self) -> int:
        """How many target servers feed this backend (0 for an in-process target)."""
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Eagle3TargetBackend(_TargetBackend):
    """Produces EAGLE-3 supervision (`Eagle3TargetBatch`) for token batches."""

    aux_layer_ids: list[int]

    @abstractmethod
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> Eagle3TargetBatch:
        """Run the target on `input_ids` [B,S] and return aux states plus supervision.

        Without a vocab mapping the batch carries shifted full `logits`; after
        `set_vocab_mapping` it carries `target_probs` + `position_mask` instead.
        """

    @abstractmethod
    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Project supervision onto the draft vocab: `selected_token_ids` int64 [Vd] (draft index ->
        target id), `selected_token_mask` bool [V]."""


class DFlashTargetBackend(_TargetBackend):
    """Produces DFlash features (`DFlashTargetBatch`)."""

    target_layer_ids: list[int]

    @abstractmethod
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> DFlashTargetBatch:
        """Run the target and return the concatenated target-layer features."""

    @abstractmethod
    def get_output_embeddings(self) -> nn.Module:
        """A module whose `.weight` [V,H] is the target's `lm_head` (frozen)."""


class DSparkTargetBackend(_TargetBackend):
    """Produces DSpark features (`DSparkTargetBatch`)."""

    target_layer_ids: list[int]
    final_logit_softcapping: float | None = None

    @abstractmethod
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
        doc_remaining: torch.Tensor | None = None,
    ) -> DSparkTargetBatch:
        """Run the target and return target-layer features plus the final-norm state."""

    @abstractmethod
    def get_output_embeddings(self) -> nn.Module:
        """A module whose `.weight` [V,H] is the target's `lm_head` (frozen)."""
