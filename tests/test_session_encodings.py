"""What a session asks for (client/encodings.py `parse_encodings` / `session_encodings`, `--encodings`):
the exact compact default (EAGLE-3 probabilities rebuilt on the trainer, bit-equal to the raw reply),
the presets and per-kind overrides, and the server's offer checked before the first request."""

from __future__ import annotations

import pytest
import torch
from test_backends import inputs, mapping

from draftfeed.client.encodings import parse_encodings, session_encodings
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.remote import RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.server.app import TargetServer
from draftfeed.server.config import ServeConfig
from draftfeed.trainer.config import ConfigError, TargetConfig

OFFERED = [
    "hidden/raw", "hidden/fp8", "hidden/bf16", "hidden/zstd[:LEVEL]", "final/raw", "final/fp8",
    "probs/raw", "probs/bf16", "probs/topk:K", "probs/latent", "mask/raw", "mask/bits", "ids/raw", "ids/narrow",
]  # fmt: skip
OLD_SERVER = [e for e in OFFERED if e not in ("probs/latent", "hidden/fp8")]


@pytest.mark.parametrize(
    "spec, preset, overrides",
    [
        (None, "exact", {}),
        ("exact", "exact", {}),
        ("compact", "compact", {}),
        ("raw", "raw", {}),
        ("hidden=fp8,probs=latent", "exact", {"hidden": "fp8", "probs": "latent"}),
        ("compact, probs=raw", "compact", {"probs": "raw"}),
        ("probs=topk", None, None),  # topk needs its K
        ({"hidden": "bf16", "final": "fp8"}, "exact", {"hidden": "bf16", "final": "fp8"}),
    ],
)
def test_presets_and_overrides_parse(spec, preset, overrides):
    if preset is None:
        with pytest.raises(InvalidArgument, match="needs its K"):
            parse_encodings(spec)
        return
    assert parse_encodings(spec) == (preset, overrides)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fast", r"'fast' is neither a preset \(exact, compact, raw"),
        ("hidden=fp8,compact", "first only"),
        ("pixels=raw", "unknown tensor kind 'pixels'"),
        ("hidden=int8", r"unknown encoding 'int8'; supported for tensor kind 'hidden': raw, fp8"),
        ("probs=fp8", "not supported for tensor kind 'probs'"),
    ],
)
def test_bad_encodings_are_named(spec, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_encodings(spec)
    with pytest.raises(ConfigError, match="--encodings"):
        TargetConfig(url=["grpc://h:1"], encodings=spec)


def test_what_each_algorithm_asks_for():
    assert session_encodings(None, "eagle3", OFFERED) == {"probs": "latent"}
    assert session_encodings("compact", "eagle3", OFFERED) == {"probs": "latent", "hidden": "fp8"}
    assert session_encodings("raw", "eagle3", OFFERED) == {}
    assert session_encodings("compact,probs=raw", "eagle3", OFFERED) == {"probs": "raw", "hidden": "fp8"}
    for algorithm in ("dflash", "dspark"):  # stay exact: nothing to rebuild
        assert session_encodings(None, algorithm, OFFERED) == {}
        assert session_encodings("compact", algorithm, OFFERED) == {"hidden": "fp8"}
    with pytest.raises(InvalidArgument, match="EAGLE-3 sessions only"):
        session_encodings("probs=latent", "dspark", OFFERED)


def test_the_servers_offer_decides_before_the_first_request():
    # the default never fails against a server without latent: EAGLE-3 then takes raw probabilities
    assert session_encodings(None, "eagle3", OLD_SERVER) == {}
    # an explicit choice must be offered; the error says what is
    with pytest.raises(
        InvalidArgument, match=r"grpc://old:1 does not offer encoding 'fp8'.*offers bf16, raw, zstd"
    ):
        session_encodings("compact", "eagle3", OLD_SERVER, "grpc://old:1")
    with pytest.raises(InvalidArgument, match="does not offer encoding 'latent' for tensor kind 'probs'"):
        session_encodings("probs=latent", "eagle3", OLD_SERVER)
    assert session_encodings("hidden=zstd:3", "dflash", OFFERED) == {"hidden": "zstd:3"}  # parameterised


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model):
    srv = TargetServer(ServeConfig(port=0), model=model).start()
    yield srv
    srv.stop(grace=1)


def _remote(server, encodings=None):
    r = RemoteEagle3TargetModel.from_urls([server.url], encodings=encodings, cache_dir=None)
    r.set_vocab_mapping(*mapping(160))
    return r


def test_eagle3_default_is_the_exact_compact_reply_bit_equal_to_raw(server, model):
    """The default EAGLE-3 session ships the final-norm state; the probabilities the client rebuilds are
    bit-identical to the raw reply's (fp32, CPU), and so is the trainer's loss."""
    from draftfeed.trainer.losses import eagle3_batch_loss
    from draftfeed.trainer.models.eagle3 import Eagle3DraftConfig, Eagle3DraftModel

    with _remote(server) as exact, _remote(server, "raw") as raw:
        assert server.sessions.get(exact.servers[0].session_id).encodings["probs"] == "latent"
        assert server.sessions.get(raw.servers[0].session_id).encodings["probs"] == "raw"
        for seed in range(3):
            got, want = exact.generate_batch(*inputs(seed)), raw.generate_batch(*inputs(seed))
            assert got.target_probs.dtype == torch.float32
            assert torch.equal(got.target_probs, want.target_probs)
            assert torch.equal(got.position_mask, want.position_mask)
            assert torch.equal(got.aux_hidden_states, want.aux_hidden_states)
    sel, mask = mapping(160)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(model.config, draft_vocab_size=40))
    draft.set_vocab_mapping(sel, mask)
    a = eagle3_batch_loss(draft, got.to_trainer_inputs(), ttt_steps=2).loss
    b = eagle3_batch_loss(draft, want.to_trainer_inputs(), ttt_steps=2).loss
    assert torch.equal(a, b)


def test_compact_and_overrides_reach_the_session(server):
    with _remote(server, "compact") as r:
        enc = server.sessions.get(r.servers[0].session_id).encodings
        assert enc["hidden"] == "fp8" and enc["probs"] == "latent" and enc["final"] == "raw"
        r.generate_batch(*inputs())
    with _remote(server, "hidden=bf16,probs=raw") as r:
        enc = server.sessions.get(r.servers[0].session_id).encodings
        assert enc["hidden"] == "bf16" and enc["probs"] == "raw"
    with RemoteDSparkTargetModel.from_urls([server.url], cache_dir=None) as r:
        assert set(server.sessions.get(r.servers[0].session_id).encodings.values()) == {"raw"}


def test_train_cli_takes_encodings():
    import argparse

    from draftfeed.trainer.cli import register, train_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "eagle3", "--out", "/tmp/x", "--target", "grpc://h:1", "--encodings", "compact"]
    )
    cfg = train_config_from_args(args)
    assert cfg.target.client_kwargs()["encodings"] == "compact"
    # regenerate runs the target in this process: it takes no wire flags
    with pytest.raises(SystemExit):
        parser.parse_args(["regenerate", "--encodings", "hidden=fp8"])
