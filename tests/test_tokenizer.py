"""The target's tokenizer from the server (GetTokenizer, client/tokenizer.py): a real server serves the files
`save_pretrained` writes, a remote `draftfeed train` with no local copy of the target trains with them, and a
local `--target-model` whose tokenizer differs from the served one is a clear error."""

from __future__ import annotations

import shutil
from concurrent import futures

import grpc
import pytest
from test_loop import data_file, target_dir, word_tokenizer  # noqa: F401 - fixtures

from draftfeed.client import wire
from draftfeed.client.errors import FailedPrecondition
from draftfeed.client.pb import draftfeed_pb2_grpc as pb_grpc
from draftfeed.client.tokenizer import fetch_tokenizer, tokenizer_digest
from draftfeed.server.app import TargetServer
from draftfeed.server.cli import main as cli_main
from draftfeed.server.config import ServeConfig
from draftfeed.target import loading


@pytest.fixture(scope="module")
def served(target_dir):  # noqa: F811
    """A server started the way `draftfeed serve --model DIR` starts: the target and its tokenizer from DIR."""
    srv = TargetServer(ServeConfig(port=0, model=target_dir, device="cpu", dtype="float32")).start()
    yield srv
    srv.stop(grace=1)


def test_the_server_serves_its_tokenizer(served, target_dir, tmp_path):  # noqa: F811
    local = loading.load_tokenizer(target_dir)
    tokenizer, digest = fetch_tokenizer(served.url, tmp_path)
    assert digest == tokenizer_digest(local) == tokenizer_digest(tokenizer)
    assert (tmp_path / digest / "tokenizer.json").is_file()
    assert tokenizer.chat_template == local.chat_template
    text = "the quick brown fox jumps over a lazy dog"
    assert tokenizer(text)["input_ids"] == local(text)["input_ids"]
    chat = [{"role": "user", "content": "hex bright jugs"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == local.apply_chat_template(
        chat, tokenize=False
    )
    # fetched again (another rank, a resumed run): the files already there are used
    again, same = fetch_tokenizer(served.url, tmp_path)
    assert same == digest and [p.name for p in tmp_path.iterdir()] == [digest]


def test_a_server_without_a_tokenizer_says_so(tiny_model, tmp_path):
    srv = TargetServer(ServeConfig(port=0), model=tiny_model("llama")).start()
    try:
        with pytest.raises(FailedPrecondition, match="has no tokenizer.*--target-model"):
            fetch_tokenizer(srv.url, tmp_path)
    finally:
        srv.stop(grace=0)


def test_a_server_older_than_get_tokenizer_gives_none(tmp_path):
    """The generated servicer's defaults answer UNIMPLEMENTED, as a server older than the RPC does."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=wire.grpc_options())
    wire.add_to_server(pb_grpc.TargetServiceServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert fetch_tokenizer(f"grpc://127.0.0.1:{port}", tmp_path) is None
    finally:
        server.stop(grace=None)


def _train(out, url, data, *extra):
    return cli_main(
        [
            "train", "eagle3", "--target", url, "--data", data, "--out", str(out), "--steps", "1",
            "--seq-len", "48", "--batch-size", "2", "--draft-vocab-size", "24", "--device", "cpu", *extra,
        ]
    )  # fmt: skip


def test_remote_train_takes_the_tokenizer_and_config_from_the_server(
    served,
    data_file,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    """No --target-model: the tokenizer comes from GetTokenizer and the config from the model info; the
    built-in default target (the old local fallback) is never touched."""

    def no_local_target(*args, **kwargs):
        raise AssertionError("a remote run read a local target")

    monkeypatch.setattr(loading, "default_target_path", no_local_target)
    assert _train(tmp_path / "o", served.url, data_file) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "metrics.jsonl").is_file()
    assert (tmp_path / "o" / "export" / "config.json").is_file()
    (cached,) = (tmp_path / "o" / "target_tokenizer").iterdir()
    assert (cached / "tokenizer.json").is_file()


def test_a_local_tokenizer_must_match_the_served_one(served, target_dir, data_file, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(target_dir, other)
    tok = word_tokenizer()
    tok.chat_template = tok.chat_template.replace("<|assistant|> ", "<|assistant|>")
    tok.save_pretrained(other)
    assert _train(tmp_path / "bad", served.url, data_file, "--target-model", str(other)) == 2
    err = capsys.readouterr().err
    assert f"the tokenizer at --target-model {other} is not the one the server at {served.url} serves" in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    # the same tokenizer as the server's: trains with it
    assert _train(tmp_path / "ok", served.url, data_file, "--target-model", target_dir) == 0
    assert (tmp_path / "ok" / "metrics.jsonl").is_file()
