"""A new draft algorithm needs new files, not edits (issue 18, item 6).

A fourth, toy algorithm -- the mean of K captured decoder layers -- is defined and registered in this file
alone: its client-side entry (`draftfeed.client.algorithms`: batch, reply field kinds, layer ids) and its
server-side entry (`draftfeed.target.algorithms`: the captures it needs and the fields it builds). A real
server on port 0 serves it, the generic remote client fetches it, and the answer equals the in-process
backend's bit for bit (and the mean of HF's own hidden states).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import pytest
import torch
from test_backends import inputs
from test_service import start_server

from draftfeed.client import algorithms as client_algorithms
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.remote import RemoteTargetModel
from draftfeed.target import algorithms as target_algorithms
from draftfeed.target.backends import HFTargetModel
from draftfeed.target.features import Needs, concat_features

NAME = "mean_of_layers"


# ---------------------------------------------------------------- the toy algorithm, client side


@dataclass
class MeanBatch:
    """`mean_hidden` [B,S,H]: the mean of the outputs of the K target layers; the request's tokens."""

    mean_hidden: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    doc_remaining: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def default_mean_layer_ids(num_layers: int, k: int = 3) -> list[int]:
    return [1, num_layers // 2, num_layers - 2][:k]


def validate_mean_layer_ids(ids: Sequence[int], num_layers: int) -> list[int]:
    ids = client_algorithms.check_layer_ints(ids, "mean layer ids")
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < num_layers for i in ids):
        raise InvalidArgument(f"mean layer ids must be distinct ids in 0..{num_layers - 1}, got {ids}")
    return ids


CLIENT_SIDE = client_algorithms.Algorithm(
    name=NAME,
    batch=MeanBatch,
    field_kinds={"mean_hidden": "hidden"},
    default_layer_ids=default_mean_layer_ids,
    validate_layer_ids=validate_mean_layer_ids,
)


# ---------------------------------------------------------------- the toy algorithm, server side


@dataclass
class MeanFeatures:
    layer_ids: list[int]
    takes_vocab_mapping = False

    @property
    def needs(self) -> Needs:
        return Needs(layers=frozenset(self.layer_ids))

    def fields(self, cap, tb) -> dict[str, torch.Tensor]:
        stacked = concat_features(cap, self.layer_ids).unflatten(-1, (len(self.layer_ids), -1))
        return dict(
            mean_hidden=stacked.mean(dim=-2),
            input_ids=tb.input_ids,
            attention_mask=tb.attention_mask,
            loss_mask=tb.loss_mask,
            **tb.packing(),
        )

    def build(self, cap, tb) -> MeanBatch:
        return MeanBatch(**self.fields(cap, tb))


SERVER_SIDE = target_algorithms.ServerAlgorithm(
    NAME, lambda ids, n, capture_logits, latent: MeanFeatures(ids)
)


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def registered():
    client_algorithms.register(CLIENT_SIDE)
    target_algorithms.register(SERVER_SIDE)
    yield
    target_algorithms.ALGORITHMS.pop(NAME)
    client_algorithms.ALGORITHMS.pop(NAME)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("layer_ids", [None, [0, 3, 5, 6]])
def test_a_toy_algorithm_registered_here_is_served_and_equals_its_in_process_answer(
    registered, model, layer_ids
):
    srv = start_server(model)
    remote = RemoteTargetModel.from_urls([srv.url], algorithm=NAME, layer_ids=layer_ids)
    try:
        assert NAME in remote.info.algorithms
        local = HFTargetModel(model, NAME, layer_ids)
        expected_ids = layer_ids or default_mean_layer_ids(8)
        assert remote.layer_ids == local.layer_ids == expected_ids
        answers = []
        for seed in range(2):
            got, want = remote.generate_batch(*inputs(seed=seed)), local.generate_batch(*inputs(seed=seed))
            answers.append(got)
            assert isinstance(got, MeanBatch)
            ta, tb = got.tensors(), want.tensors()
            assert set(ta) == set(tb) == {"mean_hidden", "input_ids", "attention_mask", "loss_mask"}
            for k in ta:
                assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
        ids, attn, _ = inputs()
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        mean = torch.stack([hs[i + 1] for i in expected_ids]).mean(0)
        real = attn.bool()
        torch.testing.assert_close(answers[0].mean_hidden[real], mean[real], atol=1e-5, rtol=1e-5)
    finally:
        remote.close()
        srv.stop(grace=0)


def test_its_layer_ids_are_checked_by_its_own_rule(registered, model):
    srv = start_server(model)
    try:
        with pytest.raises(InvalidArgument, match="mean layer ids"):
            RemoteTargetModel.from_urls([srv.url], algorithm=NAME, layer_ids=[2, 2])
        # a rule of N: the layer count comes from the server's model info, not a local config
        remote = RemoteTargetModel.from_urls([srv.url], algorithm=NAME, layer_ids=lambda n: [0, n - 3])
        assert remote.layer_ids == [0, 5]
        remote.close()
    finally:
        srv.stop(grace=0)


def test_a_server_algorithm_needs_its_client_side_entry():
    with pytest.raises(ValueError, match="client-side entry"):
        target_algorithms.register(target_algorithms.ServerAlgorithm("nowhere", SERVER_SIDE.features))
