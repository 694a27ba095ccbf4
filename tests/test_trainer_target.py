"""The trainer's connection to a remote target (trainer/config.py TargetConfig): every URL form the client
takes, TLS / mutual TLS files and the job token as `draftfeed train` flags, each checked before anything
runs; and a real mTLS + token server that `draftfeed train eagle3` trains against."""

from __future__ import annotations

import pytest
from test_loop import data_file, target_dir  # noqa: F401 - fixtures
from test_tls import pki  # noqa: F401 - fixture

from draftfeed.server.app import TargetServer
from draftfeed.server.cli import main as cli_main
from draftfeed.server.config import ServeConfig
from draftfeed.trainer.config import ConfigError, TargetConfig, split_target_urls

TOKEN = "tok-trainer-job-0123456789abcdef"


@pytest.mark.parametrize(
    "given, urls",
    [
        ("grpc://a:1,grpc://b:2", ["grpc://a:1", "grpc://b:2"]),
        ("grpcs://host:50051", ["grpcs://host:50051"]),
        ("ipv4:127.0.0.1:7001,127.0.0.1:7002", ["ipv4:127.0.0.1:7001,127.0.0.1:7002"]),
        ("grpc://ipv4:127.0.0.1:7001,127.0.0.1:7002", ["grpc://ipv4:127.0.0.1:7001,127.0.0.1:7002"]),
        (
            "grpc://dns:///draftfeed.ml.svc.cluster.local:50051",
            ["grpc://dns:///draftfeed.ml.svc.cluster.local:50051"],
        ),
        ("localhost:5", ["localhost:5"]),
    ],
)
def test_every_client_url_form_is_accepted(given, urls):
    assert split_target_urls(given) == urls
    assert TargetConfig(url=[given]).url == urls


def test_bad_targets_and_files_are_named_before_anything_runs(tmp_path, pki):  # noqa: F811
    with pytest.raises(ConfigError, match=r"--target: server URL 'http://x:1': expected grpc://HOST:PORT"):
        TargetConfig(url=["http://x:1"])
    with pytest.raises(ConfigError, match="'nohost' has no port"):
        TargetConfig(url=["grpc://nohost"])
    with pytest.raises(ConfigError, match=r"--target-ca-file '/nonexistent/ca.pem': no such file"):
        TargetConfig(url=["grpcs://h:1"], ca_file="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="go together"):
        TargetConfig(url=["grpcs://h:1"], client_cert=pki["client_cert"])
    with pytest.raises(ConfigError, match="are for TLS: use grpcs://"):
        TargetConfig(url=["grpc://h:1"], ca_file=pki["ca_cert"])
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty; put the job's token in it"):
        TargetConfig(url=["grpc://h:1"], token_file=str(empty)).client_kwargs()
    token = tmp_path / "job.token"
    token.write_text(TOKEN + "\n")
    kw = TargetConfig(url=["grpc://h:1"], token_file=str(token), job_name="j").client_kwargs()
    assert kw["token"] == TOKEN and kw["job_name"] == "j"
    assert TOKEN not in repr(TargetConfig(url=["grpc://h:1"], token_file=str(token)))


@pytest.fixture(scope="module")
def secure_server(target_dir, pki, tmp_path_factory):  # noqa: F811
    from draftfeed.target.loading import load_target

    tokens = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    tokens.write_text(f"trainer-job: {TOKEN}\n")
    cfg = ServeConfig(
        port=0,
        token_file=str(tokens),
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca_cert"],
    )
    srv = TargetServer(cfg, model=load_target(target_dir)).start()
    yield srv
    srv.stop(grace=1)


def _train(tmp_path, target_dir, data_file, url, *extra):  # noqa: F811
    return cli_main(
        [
            "train", "eagle3", "--target", url, "--target-model", target_dir, "--data", data_file,
            "--out", str(tmp_path), "--steps", "2", "--seq-len", "48", "--batch-size", "2",
            "--draft-vocab-size", "24", "--device", "cpu", "--job-name", "trainer-job", *extra,
        ]
    )  # fmt: skip


def test_train_against_a_mutual_tls_server_with_a_job_token(
    tmp_path,
    target_dir,  # noqa: F811
    data_file,  # noqa: F811
    pki,  # noqa: F811
    secure_server,
    capsys,
):
    assert secure_server.url.startswith("grpcs://")
    tls = [
        "--target-ca-file", pki["ca_cert"],
        "--target-client-cert", pki["client_cert"],
        "--target-client-key", pki["client_key"],
    ]  # fmt: skip
    token = tmp_path / "job.token"
    token.write_text(TOKEN + "\n")
    # without the token: refused by the server, said plainly, nothing trained
    assert _train(tmp_path / "anon", target_dir, data_file, secure_server.url, *tls) == 2
    err = capsys.readouterr().err
    assert "draftfeed: error:" in err and "token" in err.lower()
    assert not (tmp_path / "anon" / "metrics.jsonl").exists()
    # with TLS files and the token: trains
    assert (
        _train(
            tmp_path / "ok", target_dir, data_file, secure_server.url, *tls, "--target-token-file", str(token)
        )
        == 0
    )
    assert (tmp_path / "ok" / "metrics.jsonl").is_file()
    assert TOKEN not in capsys.readouterr().err
