"""Who may use the server: per-job tokens, quotas and allowed algorithms, or loopback only.

A token file (YAML or JSON) maps job names to a token, or to a table:

    eagle-a: "s3cret-token-a"              # a token, no limits
    dspark-b:
      token: "s3cret-token-b"              # or token_sha256: <hex digest of the token>
      tokens_per_s: 200000                 # average token throughput (a token bucket, 1 s of burst)
      max_in_flight: 8                     # requests queued or on the GPU at once
      algorithms: [dspark]                 # which algorithms it may open sessions for
      weight: 2.0                          # its share of the GPU against other jobs (default 1)

Clients send `authorization: Bearer <token>` metadata on every call. No token or an unknown one is
UNAUTHENTICATED; a session belongs to the job that opened it, and another job gets PERMISSION_DENIED.
Quotas are checked before a request is queued: over tokens/s is RESOURCE_EXHAUSTED with a retry hint
(the wait until the bucket refills), over max_in_flight likewise. Only sha256 digests of tokens are
kept in memory; no token is ever logged, exported as a metric, or listed in /sessions.

Scheduling weights come from the operator: a job's `weight` (in [MIN_WEIGHT, MAX_WEIGHT] = [0.01,
100], default 1; 1 for everyone without a token file) is its share of forwards against other jobs
with work queued. A client may ask for less (`weight=` in `from_urls`, for a low-priority job) but
never more: what it asks is clamped to [MIN_WEIGHT, the job's weight].

Without a token file anyone who reaches the port may use it, so the server then answers only peers
on loopback, unless it was started with --insecure-allow-remote.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from draftfeed.client.channel import bearer_token
from draftfeed.client.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated

__all__ = [
    "JobPolicy",
    "Caller",
    "AccessControl",
    "load_token_file",
    "is_loopback_peer",
    "MIN_WEIGHT",
    "MAX_WEIGHT",
]

log = logging.getLogger("draftfeed.auth")

LOOPBACK = ("127.0.0.0/8", "::1/128")
_GRPC_TOKEN_HINT = (
    "send metadata 'authorization: Bearer <token>' (token= in from_urls, --token-file of the trainer)"
)
_KEYS = {"token", "token_sha256", "tokens_per_s", "max_in_flight", "algorithms", "weight"}
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0  # the range of a job's scheduling weight


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class JobPolicy:
    """One job's entry in the token file (the token itself is kept only as its sha256)."""

    name: str
    token_sha256: bytes = field(repr=False)
    tokens_per_s: float | None = None
    max_in_flight: int | None = None
    algorithms: frozenset[str] | None = None
    weight: float = 1.0


def _policy(name: str, entry, where: str) -> JobPolicy:
    if isinstance(entry, str):
        entry = {"token": entry}
    if not isinstance(entry, dict):
        raise InvalidArgument(f"{where}: job {name!r} must map to a token string or a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise InvalidArgument(
            f"{where}: job {name!r} has unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}"
        )
    if ("token" in entry) == ("token_sha256" in entry):
        raise InvalidArgument(f"{where}: job {name!r} needs exactly one of token, token_sha256")
    if "token" in entry:
        token = str(entry["token"])
        if len(token) < 16:
            raise InvalidArgument(f"{where}: job {name!r} has a token shorter than 16 characters")
        digest = _digest(token)
    else:
        try:
            digest = bytes.fromhex(str(entry["token_sha256"]))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise InvalidArgument(f"{where}: job {name!r}: token_sha256 must be 64 hex digits")
    rate = entry.get("tokens_per_s")
    if rate is not None and not (isinstance(rate, int | float) and rate > 0):
        raise InvalidArgument(f"{where}: job {name!r}: tokens_per_s must be a number > 0, got {rate!r}")
    in_flight = entry.get("max_in_flight")
    if in_flight is not None and not (isinstance(in_flight, int) and in_flight >= 1):
        raise InvalidArgument(
            f"{where}: job {name!r}: max_in_flight must be an integer >= 1, got {in_flight!r}"
        )
    algorithms = entry.get("algorithms")
    if algorithms is not None:
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise InvalidArgument(f"{where}: job {name!r}: algorithms must be a list of names")
        algorithms = frozenset(algorithms)
    weight = entry.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not MIN_WEIGHT <= weight <= MAX_WEIGHT
    ):
        raise InvalidArgument(
            f"{where}: job {name!r}: weight must be a number in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {weight!r}"
        )
    return JobPolicy(name, digest, float(rate) if rate else None, in_flight, algorithms, float(weight))


def _parse_error(err: Exception) -> str:
    """What is wrong and where, never the text there: the offending line may hold a token (a YAML
    error's str() quotes it)."""
    mark = getattr(err, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x)
        return f"{what or 'invalid YAML'} at line {mark.line + 1}, column {mark.column + 1} (text not shown)"
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno}, column {err.colno} (text not shown)"
    return f"{type(err).__name__} (text not shown)"


def load_token_file(path: str | Path) -> dict[str, JobPolicy]:
    """Job name -> policy from a YAML or JSON token file; InvalidArgument naming what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InvalidArgument(f"--token-file {str(path)!r} cannot be read: {err}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - json or yaml parse errors
        raise InvalidArgument(f"--token-file {str(path)!r} does not parse: {_parse_error(err)}") from None
    if not isinstance(data, dict) or not data:
        raise InvalidArgument(f"--token-file {str(path)!r}: expected a table of job name -> token")
    jobs = {str(name): _policy(str(name), entry, str(path)) for name, entry in data.items()}
    seen: dict[bytes, str] = {}
    for job in jobs.values():
        if job.token_sha256 in seen:
            raise InvalidArgument(f"{path}: jobs {seen[job.token_sha256]!r} and {job.name!r} share a token")
        seen[job.token_sha256] = job.name
    return jobs


def is_loopback_peer(peer: str, networks=LOOPBACK) -> bool:
    """Whether a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`) is local."""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(n) for n in networks)


@dataclass
class Caller:
    """Who made a call: a job from the token file, or `None` when the server runs without tokens."""

    job: JobPolicy | None

    @property
    def name(self) -> str | None:
        return self.job.name if self.job else None


class _Bucket:
    """Token bucket that may go into debt: a request is admitted while the level is positive, so any
    request size passes, and the average stays at `rate`. Capacity: one second of tokens."""

    def __init__(self, rate: float):
        self.rate = rate
        self.level = rate
        self.stamp = time.monotonic()

    def take(self, tokens: int) -> float:
        """0 when admitted (and charged), else the seconds until the level is positive again."""
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level <= 0:
            return -self.level / self.rate + 1e-3
        self.level -= tokens
        return 0.0

    def refund(self, tokens: int) -> None:
        self.level = min(self.rate, self.level + tokens)


class AccessControl:
    """Authenticates calls and enforces per-job session ownership, algorithms and quotas.

    jobs: job name -> policy (None: no token file; then only `trusted_networks` may connect unless
    `allow_remote`).
    """

    def __init__(
        self,
        jobs: dict[str, JobPolicy] | None = None,
        allow_remote: bool = False,
        trusted_networks: tuple[str, ...] = LOOPBACK,
    ):
        self.jobs = jobs
        self.allow_remote = allow_remote
        self.trusted_networks = trusted_networks
        self._by_digest = {j.token_sha256: j for j in (jobs or {}).values()}
        self._lock = threading.Lock()
        self._buckets = {j.name: _Bucket(j.tokens_per_s) for j in (jobs or {}).values() if j.tokens_per_s}
        self._in_flight: dict[str, int] = {}

    @property
    def describe(self) -> str:
        if self.jobs is not None:
            return f"token auth on ({len(self.jobs)} jobs)"
        if self.allow_remote:
            return "NO authentication: any host that reaches the port may use it (--insecure-allow-remote)"
        return "no token file: only clients on this machine (loopback) are answered"

    def authenticate(self, context) -> Caller:
        """The caller of a gRPC call (its peer and `authorization: Bearer` metadata)."""
        return self.check(context.peer(), bearer_token(context.invocation_metadata()))

    def check_peer(self, peer: str) -> None:
        """The rule without a token file: only loopback peers, unless --insecure-allow-remote. The
        admin port (which takes no token) applies it alone; with a token file it lets every peer in."""
        if self.jobs is None and not self.allow_remote and not is_loopback_peer(peer, self.trusted_networks):
            raise PermissionDenied(
                "this server has no token file and answers only clients on its own machine; "
                "start it with --token-file (or --insecure-allow-remote on a trusted network)"
            )

    def check(self, peer: str, token: str | None, how_to_send: str = _GRPC_TOKEN_HINT) -> Caller:
        """The caller from its peer (a gRPC peer string, `ipv4:HOST:PORT`) and the token it sent;
        `how_to_send` completes the message when the token is missing."""
        if self.jobs is None:
            self.check_peer(peer)
            return Caller(None)
        if token is None:
            raise Unauthenticated(f"this server needs a job token: {how_to_send}")
        job = self._by_digest.get(_digest(token))  # a lookup by digest: nothing to time
        if job is None:
            raise Unauthenticated("the job token is not valid on this server")
        return Caller(job)

    # -- per-job rules ------------------------------------------------------------------------

    def job_name(self, caller: Caller, asked: str) -> str:
        """The job name a new session records: the token's job when tokens are on."""
        if caller.job is None:
            return asked
        if asked and asked != caller.job.name:
            log.info("session job name %r recorded as the token's job %r", asked[:64], caller.job.name)
        return caller.job.name

    def session_weight(self, caller: Caller, asked: float) -> float:
        """A new session's scheduling weight: the job's (the token file's, 1 without one); a client's
        `asked` weight (0: none asked) can only lower it, never below MIN_WEIGHT. NaN is refused."""
        allowed = caller.job.weight if caller.job is not None else 1.0
        if asked != asked:  # NaN
            raise InvalidArgument("session weight is NaN; ask for a number > 0 (or leave it unset)")
        if asked < 0:
            raise InvalidArgument(f"session weight must be > 0, got {asked}")
        if not asked:
            return allowed
        if asked > allowed:
            log.info("session weight %g asked above the job's %g: the job's weight is used", asked, allowed)
        return max(MIN_WEIGHT, min(asked, allowed))

    def check_algorithm(self, caller: Caller, algorithm: str) -> None:
        allowed = caller.job.algorithms if caller.job else None
        if allowed is not None and algorithm not in allowed:
            raise PermissionDenied(
                f"job {caller.job.name!r} may not open {algorithm!r} sessions (allowed: {', '.join(sorted(allowed))})"
            )

    def check_owner(self, caller: Caller, session) -> None:
        if caller.job is not None and session.job_name != caller.job.name:
            raise PermissionDenied(f"session {session.id[:8]}... belongs to another job")

    def admit(self, caller: Caller, tokens: int):
        """Charge a request of `tokens` to its job; returns a `release()` to call when it leaves the
        queue or the GPU (exactly once). ResourceExhausted, with `retry_after_s`, when over quota."""
        job = caller.job
        if job is None or (job.tokens_per_s is None and job.max_in_flight is None):
            return _noop
        with self._lock:
            n = self._in_flight.get(job.name, 0)
            if job.max_in_flight is not None and n >= job.max_in_flight:
                raise _over(
                    f"job {job.name!r} has {n} requests in flight (its limit is {job.max_in_flight})", 0.2
                )
            bucket = self._buckets.get(job.name)
            if bucket is not None:
                wait = bucket.take(tokens)
                if wait > 0:
                    raise _over(f"job {job.name!r} is over its quota of {job.tokens_per_s:g} tokens/s", wait)
            self._in_flight[job.name] = n + 1
        done = threading.Event()

        def release(refund: bool = False):
            if done.is_set():
                return
            done.set()
            with self._lock:
                self._in_flight[job.name] -= 1
                if refund and bucket is not None:
                    bucket.refund(tokens)

        return release

    def charge(self, caller: Caller, tokens: int, submit: Callable[[], Future]) -> Future:
        """`submit()` (queueing a request) with `tokens` charged to the caller's job (`admit`): refunded
        when the submit raises, released when the request's future is done."""
        release = self.admit(caller, tokens)
        try:
            future = submit()
        except BaseException:
            release(refund=True)
            raise
        future.add_done_callback(lambda _f: release())
        return future

    def in_flight(self, job: str) -> int:
        with self._lock:
            return self._in_flight.get(job, 0)


def _noop(refund: bool = False) -> None:
    return None


def _over(what: str, wait: float) -> ResourceExhausted:
    wait = math.ceil(wait * 100) / 100
    err = ResourceExhausted(f"{what}; retry in {wait:.2f} s")
    err.retry_after_s = wait
    return err
