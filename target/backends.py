"""In-process target backends: a HF causal LM on this process's device.

Each call validates the request, runs one forward capturing just what its algorithm needs, and
builds the batch (target/features.py). The remote clients return exactly these batches.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from draftfeed.client.algorithms import get_algorithm
from draftfeed.client.backend import DFlashTargetBackend, DSparkTargetBackend, Eagle3TargetBackend
from draftfeed.client.layers import (
    default_dflash_layer_ids,
    default_dspark_layer_ids,
    default_eagle3_layer_ids,
    validate_dflash_layer_ids,
    validate_dspark_layer_ids,
    validate_eagle3_layer_ids,
)

from .algorithms import get_server_algorithm
from .algorithms.dflash import DFlashFeatures
from .algorithms.dspark import DSparkFeatures
from .algorithms.eagle3 import Eagle3Features
from .capture import TargetLayout, discover, run_target
from .causal_mask import no_padding
from .checks import Limits, check_generate_inputs
from .features import Needs, TokenBatch, VocabMapping
from .packing import packed_attention_mask
from .supervision import check_vocab_mapping

__all__ = [
    "HFTargetModel",
    "HFEagle3TargetModel",
    "HFDFlashTargetModel",
    "HFDSparkTargetModel",
    "forward_for",
    "forward_inputs",
]


def forward_inputs(model: nn.Module, tb: TokenBatch):
    """(input_ids, attention mask, position_ids) for the HF forward of `tb`.

    Packed rows get their block-causal mask (target/packing.py). `tb.attention_mask is None` means
    the caller checked on the host that no position is padding (the scheduler does): the forward
    then gets an all-ones mask made on the device and must run inside `no_padding()`.
    """
    if tb.packed:
        mask = packed_attention_mask(
            model.config.get_text_config(), tb.position_ids, tb.seq_lens, tb.input_ids.shape[1], model.dtype
        )
    elif tb.attention_mask is None:
        mask = torch.ones_like(tb.input_ids, dtype=torch.long)
    else:
        mask = tb.attention_mask
    position_ids = tb.position_ids.long() if tb.position_ids is not None else None
    return tb.input_ids.long(), mask, position_ids


def forward_for(model: nn.Module, layout: TargetLayout, tb: TokenBatch, needs: Needs):
    """One target forward over `tb` (on the model's device) capturing `needs`."""
    unpadded = not tb.packed and tb.attention_mask is None
    with no_padding() if unpadded else nullcontext():
        return run_needs(model, layout, *forward_inputs(model, tb), needs)


def run_needs(model: nn.Module, layout: TargetLayout, input_ids, mask, position_ids, needs: Needs):
    """`run_target` on prepared inputs (`forward_inputs`), capturing `needs`."""
    return run_target(
        model,
        layout,
        input_ids,
        mask,
        position_ids,
        layer_ids=needs.layers,
        want_first_input=needs.first_input,
        want_final=needs.final,
        want_logits=needs.logits,
        want_top1=needs.top1,
    )


class _HFTarget:
    def __init__(self, model: nn.Module, limits: Limits | None = None):
        self.model = model
        self.layout = discover(model)
        self.limits = limits
        self.device = next(model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def _token_batch(
        self, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
    ) -> TokenBatch:
        check_generate_inputs(
            input_ids,
            attention_mask,
            loss_mask,
            position_ids,
            seq_lens,
            doc_remaining,
            vocab_size=self.layout.vocab_size,
            limits=self.limits,
        )
        tb = TokenBatch(input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining)
        return tb.to(self.device)

    def _run(self, features, *args) -> object:
        tb = self._token_batch(*args)
        return features.build(forward_for(self.model, self.layout, tb, features.needs), tb)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()


class HFTargetModel(_HFTarget):
    """The in-process backend of any registered algorithm (`target/algorithms/`, `client/algorithms/`):
    `layer_ids` None = the algorithm's default. `generate_batch` returns the algorithm's batch dataclass,
    as `RemoteTargetModel(urls, algorithm=...)` does from a server."""

    def __init__(
        self,
        model: nn.Module,
        algorithm: str,
        layer_ids: list[int] | None = None,
        capture_logits: bool = False,
        *,
        limits: Limits | None = None,
    ):
        super().__init__(model, limits)
        server_side = get_server_algorithm(algorithm)
        self.algorithm = algorithm
        self.layer_ids = get_algorithm(algorithm).layer_ids(layer_ids, self.num_layers)
        self.features = server_side.features(self.layer_ids, self.num_layers, capture_logits, False)

    def generate_batch(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ):
        return self._run(
            self.features, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
        )


class HFEagle3TargetModel(_HFTarget, Eagle3TargetBackend):
    """EAGLE-3 supervision from an in-process HF target.

    Until `set_vocab_mapping` it returns shifted full `logits`; afterwards `target_probs` +
    `position_mask` over the draft vocab. With `require_vocab_mapping=True`, generating before a
    mapping is a FailedPrecondition error instead.
    """

    def __init__(
        self,
        model: nn.Module,
        aux_layer_ids: list[int] | None = None,
        *,
        require_vocab_mapping: bool = False,
        limits: Limits | None = None,
    ):
        super().__init__(model, limits)
        n = self.num_layers
        ids = (
            default_eagle3_layer_ids(n)
            if aux_layer_ids is None
            else validate_eagle3_layer_ids(aux_layer_ids, n)
        )
        self.aux_layer_ids = ids
        self.features = Eagle3Features(ids, require_mapping=require_vocab_mapping)

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        check_vocab_mapping(selected_token_ids, selected_token_mask, self.layout.vocab_size)
        self.features.mapping = VocabMapping(selected_token_ids, selected_token_mask).to(self.device)

    def generate_batch(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ):
        return self._run(
            self.features, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
        )


class HFDFlashTargetModel(_HFTarget, DFlashTargetBackend):
    """DFlash features from an in-process HF target."""

    def __init__(
        self,
        model: nn.Module,
        target_layer_ids: list[int] | None = None,
        capture_logits: bool = False,
        *,
        limits: Limits | None = None,
    ):
        super().__init__(model, limits)
        n = self.num_layers
        ids = (
            default_dflash_layer_ids(n)
            if target_layer_ids is None
            else validate_dflash_layer_ids(target_layer_ids, n)
        )
        self.target_layer_ids = ids
        self.features = DFlashFeatures(ids, capture_logits)

    def generate_batch(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ):
        return self._run(
            self.features, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
        )


class HFDSparkTargetModel(_HFTarget, DSparkTargetBackend):
    """DSpark features from an in-process HF target."""

    def __init__(
        self, model: nn.Module, target_layer_ids: list[int] | None = None, *, limits: Limits | None = None
    ):
        super().__init__(model, limits)
        n = self.num_layers
        ids = (
            default_dspark_layer_ids(n)
            if target_layer_ids is None
            else validate_dspark_layer_ids(target_layer_ids, n)
        )
        self.target_layer_ids = ids
        self.final_logit_softcapping = self.layout.final_logit_softcapping
        self.features = DSparkFeatures(ids, n)

    def generate_batch(
        self, input_ids, attention_mask, loss_mask, position_ids=None, seq_lens=None, doc_remaining=None
    ):
        return self._run(
            self.features, input_ids, attention_mask, loss_mask, position_ids, seq_lens, doc_remaining
        )
