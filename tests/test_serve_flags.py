"""`draftfeed serve`'s flags come from the ServeConfig / Limits dataclass fields (client/config_flags.py,
as `draftfeed train`'s do): the same flag set, spellings and defaults as the hand-written parser they
replaced, each flag lands in its field, and each help text is its field's."""

from __future__ import annotations

import dataclasses
import re

import pytest

from draftfeed.client.errors import InvalidArgument
from draftfeed.server.cli import build_parser, main, serve_config_from_args
from draftfeed.server.config import Limits, ServeConfig

# flag -> (config field, its default): what the hand-written parser had before the flags were generated
BEFORE = {
    "--model": ("model", None),
    "--host": ("host", "127.0.0.1"),
    "--port": ("port", 50051),
    "--admin-port": ("admin_port", None),
    "--nemo-http-port": ("nemo_http_port", None),
    "--data-port": ("data_port", 0),
    "--no-data-plane": ("data_port", 0),  # a switch: sets data_port to None
    "--device": ("device", "auto"),
    "--dtype": ("dtype", "auto"),
    "--max-batch-size": ("limits.max_batch_size", 256),
    "--max-seq-len": ("limits.max_seq_len", 32768),
    "--max-request-tokens": ("limits.max_request_tokens", 262144),
    "--max-packed-seq-len": ("limits.max_packed_seq_len", 8192),
    "--max-batch-tokens": ("max_forward_tokens", 16384),
    "--max-chunk-bytes": ("max_chunk_bytes", 1 << 20),
    "--max-queue": ("max_queue", 256),
    "--max-queued-per-job": ("max_queued_per_session", 32),
    "--grpc-workers": ("grpc_workers", 128),
    "--max-streams-per-job": ("max_streams_per_job", 32),
    "--no-cuda-graphs": ("cuda_graphs", True),  # a switch: sets it to False
    "--grace-seconds": ("grace_seconds", 30.0),
    "--aux-layer-ids": ("aux_layer_ids", None),
    "--session-ttl": ("session_ttl_s", 900.0),
    "--tls-cert": ("tls_cert", None),
    "--tls-key": ("tls_key", None),
    "--tls-client-ca": ("tls_client_ca", None),
    "--token-file": ("token_file", None),
    "--insecure-allow-remote": ("insecure_allow_remote", False),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _serve(argv: list[str]) -> ServeConfig:
    return serve_config_from_args(build_parser().parse_args(["serve", *argv]))


def _serve_parser():
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices["serve"]


def test_help_lists_the_same_flags(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out.split("\noptions:")[0]  # argparse never breaks a [--flag VALUE]
    assert set(re.findall(r"\[(--[a-z][a-z-]*)", usage)) == set(BEFORE)


def test_defaults_are_unchanged(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = _serve([])
    assert cfg == ServeConfig()
    for name, (field, default) in BEFORE.items():
        assert _get(cfg, field) == default, name
    assert cfg.tensor_parallel == 1 and cfg.local_rank == 0


def test_each_flag_lands_in_its_field(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    pem = tmp_path / "x.pem"
    pem.write_text("not read here")
    given = {
        "--model": ("/some/checkpoint", "/some/checkpoint"),
        "--host": ("0.0.0.0", "0.0.0.0"),
        "--port": ("1234", 1234),
        "--admin-port": ("1235", 1235),
        "--nemo-http-port": ("1236", 1236),
        "--device": ("cpu", "cpu"),
        "--dtype": ("float32", "float32"),
        "--max-batch-size": ("4", 4),
        "--max-seq-len": ("100", 100),
        "--max-request-tokens": ("400", 400),
        "--max-packed-seq-len": ("50", 50),
        "--max-batch-tokens": ("2048", 2048),
        "--max-chunk-bytes": ("4096", 4096),
        "--max-queue": ("7", 7),
        "--max-queued-per-job": ("3", 3),
        "--grpc-workers": ("16", 16),
        "--max-streams-per-job": ("5", 5),
        "--grace-seconds": ("2.5", 2.5),
        "--aux-layer-ids": ("1, 2,3", [1, 2, 3]),
        "--session-ttl": ("0", 0.0),
        "--tls-cert": (str(pem), str(pem)),
        "--tls-key": (str(pem), str(pem)),
        "--tls-client-ca": (str(pem), str(pem)),
        "--token-file": (str(pem), str(pem)),
    }
    argv = [x for flag, (text, _) in given.items() for x in (flag, text)]
    cfg = _serve([*argv, "--no-cuda-graphs", "--insecure-allow-remote"])
    for flag, (_, want) in given.items():
        assert _get(cfg, BEFORE[flag][0]) == want, flag
    assert cfg.cuda_graphs is False and cfg.insecure_allow_remote is True
    assert cfg.tensor_parallel == 2 and cfg.local_rank == 1  # torchrun's environment
    assert _serve(["--data-port", "9"]).data_port == 9
    assert _serve(["--no-data-plane"]).data_port is None
    assert _serve(["--data-port", "9", "--no-data-plane"]).data_port is None


def test_bad_values_get_clear_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--aux-layer-ids", "1,x"])
    assert "is not a comma-separated list of layer ids" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="--max-batch-tokens must be >= 1"):
        _serve(["--max-batch-tokens", "0"])
    assert main(["serve", "--port", "70000"]) == 2  # the config's own check, no traceback
    assert "--port 70000 is not a TCP port" in capsys.readouterr().err


def test_help_texts_are_the_fields():
    by_flag = {o: a for a in _serve_parser()._actions for o in a.option_strings}
    sections = {"": ServeConfig, "limits.": Limits}
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            name = f.metadata.get("flag")
            if name is None:
                continue
            action = by_flag[name]
            assert action.dest == prefix + f.name and action.help.startswith(f.metadata["help"]), name
