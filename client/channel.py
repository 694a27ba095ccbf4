"""The connection to a draftfeed server: what a URL means, TLS credentials, the job's token, and
the session-spec header that lets any replica behind one balanced channel serve a session.

URLs:
- `grpc://HOST:PORT` (or `HOST:PORT`): one server, plaintext. `grpcs://HOST:PORT`: TLS.
- several servers behind one channel, balanced by gRPC's `round_robin` policy:
  `grpc://10.0.0.1:50051,10.0.0.2:50051` (IP literals), or any gRPC target with a resolver scheme,
  e.g. `grpc://dns:///draftfeed.ns.svc.cluster.local:50051` (every address the name resolves to,
  re-resolved as replicas come and go) or `ipv4:127.0.0.1:7001,127.0.0.1:7002`.

Sessions live on one server. On a balanced channel each call can land on another replica, so the
client sends its session's spec (what it opened: algorithm, layer ids, encodings, vocab mapping)
as binary metadata with every session call; a replica that does not know the session id opens it
under that id from the spec (server/directory.py). The spec travels compressed (a vocab mapping
of 32k draft ids compresses to about 100-130 KiB); servers accept metadata of up to `MAX_METADATA_BYTES`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import zlib
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import DraftfeedError, InvalidArgument, ResourceExhausted, Unavailable
from .pb import draftfeed_pb2 as pb

__all__ = [
    "Target",
    "ChannelSecurity",
    "parse_target",
    "parse_url",
    "open_channel",
    "MAX_METADATA_BYTES",
    "MAX_SPEC_BYTES",
    "SESSION_SPEC_KEY",
    "RETRY_AFTER_KEY",
    "session_spec_metadata",
    "session_spec_from_metadata",
    "bearer_token",
    "retry_after_s",
    "speaks_tls",
    "explain_unavailable",
    "check_health",
]

MAX_METADATA_BYTES = 8 << 20
# a session spec inflated: its vocab mapping is 9 bytes per target token at most (2.3 MiB at V=256k)
MAX_SPEC_BYTES = 16 << 20
SESSION_SPEC_KEY = "draftfeed-session-spec-bin"
RETRY_AFTER_KEY = "retry-after-ms"
_RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")
_RETRY_IN = re.compile(r"retry in ~?([0-9]+(?:\.[0-9]+)?) s")


@dataclass(frozen=True)
class Target:
    """A parsed server URL: the gRPC target string, TLS or not, and whether it names several
    servers (then one channel balances across them with `round_robin`)."""

    url: str
    address: str
    tls: bool
    balanced: bool

    @property
    def host_port(self) -> tuple[str, int] | None:
        """(host, port) of a single-address target, else None."""
        if self.balanced:
            return None
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client proves who it is and whom it trusts.

    ca_file: PEM roots that sign the server's certificate (None: the system's roots).
    client_cert, client_key: PEM files for mutual TLS (servers started with --tls-client-ca).
    token: the job's bearer token (servers started with --token-file); sent as `authorization` metadata.
    server_name: the name to verify in the server's certificate when the URL names an IP address the
        certificate does not list, or several addresses.
    """

    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidArgument("client_cert and client_key go together (mutual TLS needs both)")
        for what in ("ca_file", "client_cert", "client_key"):
            path = getattr(self, what)
            if path is not None and not Path(path).expanduser().is_file():
                raise InvalidArgument(f"{what}={path!r} is not a readable file")

    def __repr__(self) -> str:  # never print the token
        token = "<set>" if self.token else None
        return (
            f"ChannelSecurity(ca_file={self.ca_file!r}, client_cert={self.client_cert!r}, "
            f"client_key={self.client_key!r}, token={token}, server_name={self.server_name!r})"
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).expanduser().read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same trust and client certificate for a plain socket (the session's data plane):
        `ca_file` (else the system's roots), `client_cert`/`client_key` for mutual TLS."""

        def path(p):
            return str(Path(p).expanduser()) if p else None

        ctx = ssl.create_default_context(cafile=path(self.ca_file))
        if self.client_cert:
            ctx.load_cert_chain(path(self.client_cert), path(self.client_key))
        return ctx


def _ip_literal(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None


def parse_target(url: str) -> Target:
    """`grpc://` / `grpcs://` URL, bare `HOST:PORT`, or a gRPC resolver target -> `Target`."""
    tls = url.startswith("grpcs://")
    rest = url.removeprefix("grpcs://").removeprefix("grpc://")
    if rest.startswith(_RESOLVER_SCHEMES):
        return Target(url, rest, tls, balanced=True)
    if "://" in rest:
        raise InvalidArgument(
            f"server URL {url!r}: expected grpc://HOST:PORT, grpcs://HOST:PORT (TLS) or a gRPC target "
            "such as dns:///NAME:PORT"
        )
    parts = rest.split(",")
    for part in parts:
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"server URL {url!r}: {part!r} has no port; expected grpc://HOST:PORT")
    if len(parts) == 1:
        return Target(url, rest, tls, balanced=False)
    versions = {_ip_literal(p.rpartition(":")[0]) for p in parts}
    if versions == {4} or versions == {6}:
        return Target(url, f"ipv{versions.pop()}:{rest}", tls, balanced=True)
    raise InvalidArgument(
        f"server URL {url!r} lists several hosts by name; pass a list of URLs instead, or one DNS name "
        "that resolves to every server (grpc://dns:///NAME:PORT)"
    )


def parse_url(url: str) -> str:
    """The gRPC target string of a server URL (`grpc://host:port` -> `host:port`)."""
    return parse_target(url).address


def open_channel(target: Target, security: ChannelSecurity, options: list[tuple]) -> grpc.Channel:
    """A plaintext or TLS channel to `target`; balanced targets get the `round_robin` policy."""
    options = list(options)
    if target.balanced:
        options.append(("grpc.lb_policy_name", "round_robin"))
    if not target.tls:
        if security.client_cert or security.ca_file:
            raise InvalidArgument(
                f"{target.url}: TLS files were given for a plaintext URL; use grpcs:// to connect with TLS"
            )
        return grpc.insecure_channel(target.address, options=options)
    name = security.server_name
    if name is None and target.balanced and target.address.startswith(("ipv4:", "ipv6:")):
        first = target.address.split(":", 1)[1].split(",")[0]
        name = first.rpartition(":")[0].strip("[]")
    if name is not None:
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target.address, security.credentials(), options=options)


# ------------------------------------------------------------------------------------- metadata


def session_spec_metadata(spec: pb.OpenSessionRequest) -> tuple[tuple[str, bytes], ...]:
    """The session's spec as binary metadata (zlib-compressed `OpenSessionRequest`)."""
    return ((SESSION_SPEC_KEY, zlib.compress(spec.SerializeToString(), 1)),)


def session_spec_from_metadata(metadata) -> pb.OpenSessionRequest | None:
    """The spec a client sent with a call, or None. InvalidArgument when it does not decode;
    ResourceExhausted when it inflates past `MAX_SPEC_BYTES` (checked while inflating)."""
    for key, value in metadata or ():
        if key == SESSION_SPEC_KEY:
            try:
                inflate = zlib.decompressobj()
                raw = inflate.decompress(value, MAX_SPEC_BYTES)
                if inflate.unconsumed_tail:
                    raise ResourceExhausted(
                        f"metadata {SESSION_SPEC_KEY} inflates past this server's limit of {MAX_SPEC_BYTES} "
                        "bytes (MAX_SPEC_BYTES); a session spec with a vocab mapping needs far less"
                    )
                if not inflate.eof:
                    raise zlib.error("the compressed data is truncated")
                return pb.OpenSessionRequest.FromString(raw)
            except ResourceExhausted:
                raise
            except Exception as err:  # noqa: BLE001 - zlib.error or a DecodeError
                raise InvalidArgument(f"metadata {SESSION_SPEC_KEY} does not decode: {err}") from None
    return None


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def retry_after_s(err: BaseException) -> float | None:
    """The wait a server asked for with a RESOURCE_EXHAUSTED quota answer (trailing metadata
    `retry-after-ms`, or "retry in N s" in the message), or None."""
    value = getattr(err, "retry_after_s", None)
    if value is not None:
        return float(value)
    m = _RETRY_IN.search(str(err))
    return float(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ diagnosis


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool | None:
    """Whether the port answers a TLS ClientHello (True), answers something else (False), or
    cannot be reached at all (None). Certificates are not checked: this only names the protocol."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            try:
                with ctx.wrap_socket(sock) as tls:
                    tls.do_handshake()
                return True
            except ssl.SSLError as err:  # an alert from the peer still means it speaks TLS
                return "ALERT" in str(err).upper()
            except OSError:
                return False
    except OSError:
        return None


def explain_unavailable(target: Target, security: ChannelSecurity, err: DraftfeedError) -> DraftfeedError:
    """A connection failure with what to do about it: plaintext to a TLS port, TLS to a plaintext
    port, or a TLS handshake the server refused (certificate, CA, or a missing client cert)."""
    if not isinstance(err, Unavailable):
        return err
    hp = target.host_port
    tls = speaks_tls(*hp) if hp is not None else None
    if tls is None:  # nothing answers there
        return Unavailable(f"{target.url}: is `draftfeed serve` running at {target.address}? ({err})")
    if tls and not target.tls:
        return Unavailable(
            f"{target.url}: the server speaks TLS and this URL is plaintext; use grpcs://{target.address} "
            f"(with ca_file= for a private CA) ({err})"
        )
    if not tls and target.tls:
        return Unavailable(
            f"{target.url}: the server does not speak TLS; use grpc://{target.address}, or start the "
            f"server with --tls-cert/--tls-key ({err})"
        )
    if target.tls:
        text = str(err)
        if "CERTIFICATE_VERIFY_FAILED" in text or "BAD_SIGNATURE" in text:
            hint = (
                "this client does not trust the server's certificate: pass ca_file= (the CA that signed it)"
            )
        elif "Hostname Verification" in text:
            hint = "the server's certificate is not issued for this name: pass server_name= (a name it lists)"
        elif security.client_cert is None:
            hint = "the server may require a client certificate (client_cert=, client_key=)"
        else:
            hint = "the server did not accept this client certificate (is it signed by its --tls-client-ca?)"
        return Unavailable(f"{target.url}: the TLS handshake failed: {hint} ({err})")
    return err


def check_health(
    url: str, security: ChannelSecurity | None = None, service: str = "", timeout: float = 5.0
) -> str:
    """The server's health status name (`SERVING`, `NOT_SERVING`, ...) through the standard gRPC
    health service; Unavailable (with a diagnosis) when it cannot be reached."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = parse_target(url)
    security = security or ChannelSecurity()
    channel = open_channel(target, security, [])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        raise explain_unavailable(target, security, Unavailable(f"{url}: {err.details()}")) from None
    finally:
        channel.close()
