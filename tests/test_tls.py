"""TLS and mutual TLS on the gRPC and admin ports, with a throwaway CA made by `cryptography`:
TLS works; a client that does not trust the server, or has no (trusted) client certificate, is
refused; plaintext to a TLS port (and TLS to a plaintext port) fails with a message saying so; the
container entrypoints (docker/serve.sh, docker/healthcheck.sh) with their TLS variables."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import pytest
import requests
from test_backends import inputs
from test_service import assert_same, start_server

from draftfeed.client.channel import ChannelSecurity, check_health, parse_target, speaks_tls
from draftfeed.client.errors import InvalidArgument, Unavailable
from draftfeed.client.remote import RemoteDSparkTargetModel
from draftfeed.server.cli import main as cli_main
from draftfeed.target.backends import HFDSparkTargetModel

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject, issuer, key):
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(cn):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(cn), _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca, cn, server: bool):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = _builder(_name(cn), ca_cert.subject, key).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM files: ca, server cert/key, client cert/key, and a client signed by another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("draftfeed test CA"), make_ca("someone else's CA")
    files = {}

    def write(name, key, cert):
        if key is not None:
            files[f"{name}_key"] = d / f"{name}.key"
            files[f"{name}_key"].write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        files[f"{name}_cert"] = d / f"{name}.pem"
        files[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    write("ca", None, ca[1])
    write("other_ca", None, other[1])
    write("server", *issue(ca, "draftfeed server", server=True))
    write("client", *issue(ca, "trainer", server=False))
    write("stranger", *issue(other, "stranger", server=False))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def test_tls_round_trip_and_refusals(model, pki):
    srv = start_server(model, admin_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    try:
        assert srv.url.startswith("grpcs://127.0.0.1:")
        with RemoteDSparkTargetModel.from_urls([srv.url], ca_file=pki["ca_cert"]) as remote:
            assert_same(
                remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs())
            )
        assert check_health(srv.url, ChannelSecurity(ca_file=pki["ca_cert"])) == "SERVING"
        assert cli_main(["health", "--target", srv.url, "--ca-file", pki["ca_cert"]]) == 0
        # a client that trusts another CA (or only the system's roots) is refused
        for ca in (pki["other_ca_cert"], None):
            with pytest.raises(Unavailable, match="TLS handshake failed: this client does not trust"):
                RemoteDSparkTargetModel.from_urls([srv.url], ca_file=ca)
        # plaintext to the TLS port: says so and names the fix
        plain = srv.url.replace("grpcs://", "grpc://")
        with pytest.raises(
            Unavailable, match="the server speaks TLS and this URL is plaintext; use grpcs://"
        ):
            RemoteDSparkTargetModel.from_urls([plain])
        with pytest.raises(InvalidArgument, match="use grpcs://"):
            RemoteDSparkTargetModel.from_urls([plain], ca_file=pki["ca_cert"])
        # the admin port speaks HTTPS with the same certificate
        base = f"https://127.0.0.1:{srv.admin.port}"
        assert requests.get(f"{base}/readyz", verify=pki["ca_cert"], timeout=5).json()["ready"] is True
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{base}/readyz", timeout=5)
        # and so does the status page with its JSON (the admin port's TLS, nothing of its own)
        doc = requests.get(f"{base}/status.json", verify=pki["ca_cert"], timeout=5).json()
        assert doc["model"]["fingerprint"] == srv.info.fingerprint
        assert "status.json" in requests.get(f"{base}/status", verify=pki["ca_cert"], timeout=5).text
        for path in ("/status", "/status.json"):
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(base + path, timeout=5)
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(base.replace("https://", "http://") + path, timeout=5)
    finally:
        srv.stop(grace=0)


def test_tls_client_to_a_plaintext_port(model, pki):
    srv = start_server(model)
    try:
        tls_url = srv.url.replace("grpc://", "grpcs://")
        assert speaks_tls(*parse_target(srv.url).host_port) is False
        with pytest.raises(Unavailable, match="the server does not speak TLS; use grpc://"):
            RemoteDSparkTargetModel.from_urls([tls_url], ca_file=pki["ca_cert"])
    finally:
        srv.stop(grace=0)


def test_mutual_tls(model, pki):
    srv = start_server(
        model,
        admin_port=0,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca_cert"],
    )
    try:
        mine = dict(ca_file=pki["ca_cert"], client_cert=pki["client_cert"], client_key=pki["client_key"])
        with RemoteDSparkTargetModel.from_urls([srv.url], **mine) as remote:
            assert_same(
                remote.generate_batch(*inputs()), HFDSparkTargetModel(model).generate_batch(*inputs())
            )
        with pytest.raises(Unavailable, match="may require a client certificate"):
            RemoteDSparkTargetModel.from_urls([srv.url], ca_file=pki["ca_cert"])
        stranger = dict(
            ca_file=pki["ca_cert"], client_cert=pki["stranger_cert"], client_key=pki["stranger_key"]
        )
        with pytest.raises(Unavailable, match="TLS handshake failed"):
            RemoteDSparkTargetModel.from_urls([srv.url], **stranger)
        with pytest.raises(InvalidArgument, match="go together"):
            RemoteDSparkTargetModel.from_urls(
                [srv.url], ca_file=pki["ca_cert"], client_cert=pki["client_cert"]
            )
        assert (
            cli_main(
                [
                    "health",
                    "--target",
                    srv.url,
                    "--ca-file",
                    pki["ca_cert"],
                    "--client-cert",
                    pki["client_cert"],
                    "--client-key",
                    pki["client_key"],
                ]
            )
            == 0
        )
        base = f"https://127.0.0.1:{srv.admin.port}"
        cert = (pki["client_cert"], pki["client_key"])
        assert requests.get(f"{base}/healthz", verify=pki["ca_cert"], cert=cert, timeout=5).status_code == 200
        with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
            requests.get(f"{base}/healthz", verify=pki["ca_cert"], timeout=5)
        # the status page needs the client certificate too
        r = requests.get(f"{base}/status.json", verify=pki["ca_cert"], cert=cert, timeout=5)
        assert r.status_code == 200 and r.json()["server"]["ready"] is True
        for path in ("/status", "/status.json"):
            with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
                requests.get(base + path, verify=pki["ca_cert"], timeout=5)
    finally:
        srv.stop(grace=0)


def test_server_config_checks(pki):
    from draftfeed.server.config import ServeConfig

    with pytest.raises(InvalidArgument, match="--tls-cert and --tls-key go together"):
        ServeConfig(tls_cert=pki["server_cert"])
    with pytest.raises(InvalidArgument, match="needs --tls-cert"):
        ServeConfig(tls_client_ca=pki["ca_cert"])
    with pytest.raises(InvalidArgument, match="not a readable file"):
        ServeConfig(tls_cert="/nonexistent.pem", tls_key=pki["server_key"])
    assert ssl.PEM_cert_to_DER_cert(open(pki["ca_cert"]).read())


def test_entrypoints_with_mutual_tls(tmp_path, tiny_dirs, pki):
    """The TLS variables of docker/serve.sh reach the gRPC, data and admin ports; docker/healthcheck.sh's
    TLS branch (CA, server name, client certificate) says SERVING, and fails without the certificate."""
    import os
    import signal
    import subprocess
    import sys

    from test_docker import DOCKER, _free_port, _wait_healthy, start_serve_entrypoint

    port, data_port, admin_port = _free_port(), _free_port(), _free_port()
    server_env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        DRAFTFEED_PYTHON=sys.executable,
        DRAFTFEED_MODEL=tiny_dirs("llama"),
        DRAFTFEED_HOST="127.0.0.1",
        DRAFTFEED_PORT=str(port),
        DRAFTFEED_DATA_PORT=str(data_port),
        DRAFTFEED_ADMIN_PORT=str(admin_port),
        DRAFTFEED_GRACE_SECONDS="5",
        DRAFTFEED_TLS_CERT=pki["server_cert"],
        DRAFTFEED_TLS_KEY=pki["server_key"],
        DRAFTFEED_TLS_CLIENT_CA=pki["ca_cert"],
    )
    probe_env = dict(
        server_env,
        DRAFTFEED_TLS_CA=pki["ca_cert"],
        DRAFTFEED_HEALTH_CLIENT_CERT=pki["client_cert"],
        DRAFTFEED_HEALTH_CLIENT_KEY=pki["client_key"],
    )
    log_path = tmp_path / "server.log"
    server = start_serve_entrypoint(server_env, log_path)
    try:
        _wait_healthy(server, probe_env, log_path)  # healthy, and the banner is out
        assert "(mutual TLS)" in log_path.read_text()
        no_cert = {k: v for k, v in probe_env.items() if not k.startswith("DRAFTFEED_HEALTH_CLIENT")}
        refused = subprocess.run(
            [str(DOCKER / "healthcheck.sh")], env=no_cert, capture_output=True, text=True
        )
        assert refused.returncode != 0 and "SERVING" not in refused.stdout
        cert = (pki["client_cert"], pki["client_key"])
        ready = requests.get(
            f"https://127.0.0.1:{admin_port}/readyz", verify=pki["ca_cert"], cert=cert, timeout=5
        )
        assert ready.status_code == 200
        mine = dict(ca_file=pki["ca_cert"], client_cert=pki["client_cert"], client_key=pki["client_key"])
        with RemoteDSparkTargetModel.from_urls([f"grpcs://127.0.0.1:{port}"], **mine) as remote:
            assert remote.generate_batch(*inputs()).target_hidden_states.shape[0] == 2
            data = remote.servers[0].data
            assert data is not None and data.tls  # the reply came over the TLS data plane
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
