"""Every listening port refuses to start when taken: gRPC (no SO_REUSEPORT sharing with another
server), data plane, admin and NeMo HTTP, with an error naming the port and its flag, exit non-zero,
no traceback."""

from __future__ import annotations

import socket

import pytest
from test_service import start_server

from draftfeed.client.errors import FailedPrecondition
from draftfeed.server import cli
from draftfeed.server.listening import bind_tcp


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def test_a_second_server_on_a_taken_grpc_port_refuses_to_start(tiny_dirs, model, capsys):
    first = start_server(model)  # a real gRPC server, as the first `draftfeed serve` would be
    try:
        # without SO_REUSEPORT off, this second server would bind and share the port's connections
        with pytest.raises(FailedPrecondition, match=f"--port {first.port}: cannot listen"):
            start_server(model, port=first.port, data_port=None)
        argv = ["serve", "--model", tiny_dirs("llama"), "--device", "cpu", "--port", str(first.port)]
        assert cli.main(argv) == 2
    finally:
        first.stop(grace=0)
    err = capsys.readouterr().err
    assert f"--port {first.port}" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--data-port", "--admin-port", "--nemo-http-port"])
def test_other_taken_ports_refuse_to_start(tiny_dirs, flag, capsys):
    taken = bind_tcp("127.0.0.1", 0, "test")
    port = taken.getsockname()[1]
    try:
        argv = ["serve", "--model", tiny_dirs("llama"), "--device", "cpu", "--port", "0", flag, str(port)]
        assert cli.main(argv) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"{flag} {port}" in err and "in use" in err
    assert "Traceback" not in err


def test_bind_tcp_names_the_flag():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(FailedPrecondition, match=f"--data-port {port}"):
            bind_tcp("127.0.0.1", port, "--data-port")
