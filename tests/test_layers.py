"""Default layer ids follow docs/architecture.md's formulas; every validation rule names the id and the range."""

from __future__ import annotations

import warnings

import grpc
import pytest
import requests
import torch
from test_backends import inputs, mapping
from test_nemo_http import Client, pack
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.layers import (
    default_dflash_layer_ids,
    default_dspark_layer_ids,
    default_eagle3_layer_ids,
    validate_dflash_layer_ids,
    validate_dspark_layer_ids,
    validate_eagle3_layer_ids,
)
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import TargetStub
from draftfeed.server import cli
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.target.backends import HFEagle3TargetModel


@pytest.mark.parametrize("n", [8, 16, 28, 30, 36, 64])
def test_defaults_follow_the_formulas(n):
    assert default_eagle3_layer_ids(n) == [1, n // 2 - 1, n - 4]
    assert default_dflash_layer_ids(n, 1) == [n // 2]
    for k in (2, 3, 5):
        assert default_dflash_layer_ids(n, k) == [round(1 + i * (n - 4) / (k - 1)) for i in range(k)]
        # DSpark defaults to DFlash's spacing (DeepSpec's rule) on targets deep enough for it
        assert default_dspark_layer_ids(n, k) == default_dflash_layer_ids(n, k)
    assert default_dspark_layer_ids(n, 1) == [n // 2]
    for ids in (default_eagle3_layer_ids(n), default_dflash_layer_ids(n)):
        assert all(0 <= i < n for i in ids)
    for k in (1, 2, 5, 10 * n):  # never the embedding output (-1) nor the final-norm output (N-1)
        assert all(0 <= i <= n - 2 for i in default_dspark_layer_ids(n, k))


def test_known_defaults():
    assert default_dflash_layer_ids(28) == [1, 7, 13, 19, 25]
    assert default_dflash_layer_ids(36) == [1, 9, 17, 25, 33]
    assert default_dspark_layer_ids(36) == [1, 9, 17, 25, 33]  # DeepSpec's Qwen3-4B/8B recipe
    assert default_dspark_layer_ids(30) == [1, 8, 14, 20, 27]  # the default target, SmolLM2-135M
    assert default_eagle3_layer_ids(16) == [1, 7, 12]


def test_eagle3_rules():
    assert validate_eagle3_layer_ids([0, 3, 7], 8) == [0, 3, 7]
    with pytest.raises(
        InvalidArgument, match=r"exactly 3 aux_layer_ids, got 2: \[1, 2\]; valid ids are 0..7"
    ):
        validate_eagle3_layer_ids([1, 2], 8)
    with pytest.raises(InvalidArgument, match=r"aux layer id 8 is out of range: valid ids are 0..7"):
        validate_eagle3_layer_ids([1, 2, 8], 8)
    with pytest.raises(InvalidArgument, match=r"aux layer id -1 is out of range"):
        validate_eagle3_layer_ids([-1, 2, 3], 8)
    with pytest.raises(
        InvalidArgument, match=r"distinct, got \[1, 1, 3\] \(id 1 repeats\); pick 3 different ids in 0..7"
    ):
        validate_eagle3_layer_ids([1, 1, 3], 8)
    with pytest.raises(InvalidArgument, match="not an integer"):
        validate_eagle3_layer_ids([1, 2.5, 3], 8)
    with pytest.raises(InvalidArgument, match="N=4"):
        default_eagle3_layer_ids(4)


def test_dflash_rules():
    assert validate_dflash_layer_ids([5], 8) == [5]
    with pytest.raises(InvalidArgument, match=r"must not be empty; pass ids in 0..7"):
        validate_dflash_layer_ids([], 8)
    with pytest.raises(InvalidArgument, match=r"target layer id 9 is out of range: valid ids are 0..7"):
        validate_dflash_layer_ids([1, 9], 8)


def test_dspark_rules():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_dspark_layer_ids([0, 3, 6], 8) == [0, 3, 6]
    with pytest.warns(UserWarning, match=r"\[-1, 7\].*SGLang"):
        validate_dspark_layer_ids([-1, 3, 7], 8)
    with pytest.raises(
        InvalidArgument,
        match=r"strictly increasing, got \[3, 3\] \(id 3 after 3\); valid ids are -1 and 0..7",
    ):
        validate_dspark_layer_ids([3, 3], 8)
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        validate_dspark_layer_ids([4, 2], 8)
    with pytest.raises(InvalidArgument, match=r"id -2 is out of range: valid ids are -1 .* and 0..7"):
        validate_dspark_layer_ids([-2, 3], 8)
    with pytest.raises(InvalidArgument, match=r"id 8 is out of range"):
        validate_dspark_layer_ids([3, 8], 8)
    with pytest.raises(
        InvalidArgument, match=r"must not be empty; pass strictly increasing ids from -1 and 0..7"
    ):
        validate_dspark_layer_ids([], 8)


# ---- shallow targets (4 and 6 decoder layers): never a repeated layer, a clear error or the server's default ----


def test_defaults_never_repeat_a_layer():
    with pytest.raises(InvalidArgument, match=r"\[1, 2, 2\] are not 3 distinct.*--aux-layer-ids"):
        default_eagle3_layer_ids(6)
    assert default_eagle3_layer_ids(7) == [1, 2, 3]
    with pytest.raises(InvalidArgument, match=r"\[1, 2, 2, 2, 3\] are not 5 distinct.*fewer target layers"):
        default_dflash_layer_ids(6)
    with pytest.raises(InvalidArgument, match="not 5 distinct"):
        default_dflash_layer_ids(4)
    assert default_dflash_layer_ids(4, 1) == [2]
    for n in (1, 2, 3, 4, 6):  # shallow targets: fewer layers, never a repeat nor an SGLang-invisible one
        ids = default_dspark_layer_ids(n)
        assert ids and len(set(ids)) == len(ids) and all(0 <= i <= max(0, n - 2) for i in ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the default never takes an id SGLang cannot serve (N > 1)
            if n > 1:
                validate_dspark_layer_ids(ids, n)
    with pytest.raises(InvalidArgument, match=r"distinct, got \[0, 0, 0\] \(id 0 repeats\)"):
        validate_dflash_layer_ids([0] * 3, 8)
    with pytest.raises(InvalidArgument, match="distinct"):
        validate_dflash_layer_ids([0] * 2000, 8)


def _shallow(n: int):
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = n
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def test_shallow_targets_on_a_server():
    """6 layers: model info lists no EAGLE-3 / DFlash default, a session naming no ids gets a clear
    INVALID_ARGUMENT, duplicate ids are refused. 4 layers with `--aux-layer-ids`: the default is the
    operator's, reported in model info, and a NeMo client (which cannot choose) is served with it."""
    six = TargetServer(ServeConfig(port=0, data_port=None, nemo_http_port=0), model=_shallow(6)).start()
    try:
        with grpc.insecure_channel(six.url.removeprefix("grpc://")) as ch:
            stub = TargetStub(ch)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert list(info.eagle3_default_layer_ids) == [] and list(info.dflash_default_layer_ids) == []
            assert not info.eagle3_default_layer_ids_from_server and list(info.dspark_default_layer_ids)
            for algorithm, ids in (
                ("eagle3", []),
                ("dflash", []),
                ("dflash", [0, 0, 0]),
                ("eagle3", [1, 2, 2]),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.OpenSession(pb.OpenSessionRequest(algorithm=algorithm, layer_ids=ids))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "distinct" in err.value.details(), err.value.details()
            ok = stub.OpenSession(pb.OpenSessionRequest(algorithm="eagle3", layer_ids=[1, 3, 5]))
            assert list(ok.layer_ids) == [1, 3, 5]
        nemo = Client(six.nemo_http.url)  # NeMo's client cannot choose: a clear 400 naming the flag
        assert nemo.post("model_info").json()["aux_layer_ids"] == []
        ids, mask = mapping(160)
        r = nemo.post("set_vocab_mapping", pack({"selected_token_ids": ids, "selected_token_mask": mask}))
        assert r.status_code == 400 and "--aux-layer-ids" in r.json()["detail"]
    finally:
        six.stop(grace=0)

    model = _shallow(4)
    cfg = ServeConfig(port=0, data_port=None, aux_layer_ids=[0, 2, 3], nemo_http_port=0)
    four = TargetServer(cfg, model=model).start()
    try:
        with grpc.insecure_channel(four.url.removeprefix("grpc://")) as ch:
            info = TargetStub(ch).GetModelInfo(pb.GetModelInfoRequest())
        assert list(info.eagle3_default_layer_ids) == [0, 2, 3] and info.eagle3_default_layer_ids_from_server
        c = Client(four.nemo_http.url)
        assert c.post("model_info").json()["aux_layer_ids"] == [0, 2, 3]
        sel_mask = mapping(160)
        c.set_vocab_mapping(*sel_mask)
        got = c.generate(*inputs())
        local = HFEagle3TargetModel(model, [0, 2, 3])
        local.set_vocab_mapping(*sel_mask)
        want = local.generate_batch(*inputs())
        assert torch.equal(got["aux_hidden_states"], want.aux_hidden_states)
        assert requests.get(f"{four.nemo_http.url}/health", timeout=5).ok
    finally:
        four.stop(grace=0)


@pytest.mark.parametrize("ids", ["1,1,2", "0,2,9", "0,1"])
def test_a_bad_aux_layer_ids_flag_is_refused_at_start(tiny_dirs, ids, capsys):
    argv = ["serve", "--model", tiny_dirs("llama"), "--device", "cpu", "--port", "0", "--aux-layer-ids", ids]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--aux-layer-ids {ids}" in err and "Traceback" not in err
