"""The target's tokenizer over the wire (`GetTokenizer`), both ends: the server packs its tokenizer once
(`tokenizer_message`: the files `save_pretrained` writes and their digest); a remote trainer fetches it
(`fetch_tokenizer`) or checks its own copy against it (`tokenizer_digest`).

The digest covers what training depends on, not the files' bytes (which vary with the transformers
version that wrote them): every token and its id, the bos, eos, unk and pad tokens, and the chat template.
transformers is imported only inside `fetch_tokenizer`, so importing the client stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc

from .channel import ChannelSecurity, explain_unavailable, open_channel, parse_target
from .errors import DraftfeedError, error_for_code
from .pb import draftfeed_pb2 as pb
from .wire import TargetStub, grpc_options

__all__ = ["tokenizer_digest", "tokenizer_message", "fetch_tokenizer"]

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_digest(tokenizer) -> str:
    """sha256 (hex, 32 characters) of the tokens and their ids, the special tokens and the chat template."""
    state = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "special": {name: getattr(tokenizer, name, None) for name in _SPECIAL},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tokenizer_message(tokenizer) -> pb.Tokenizer:
    """The `GetTokenizer` reply for `tokenizer`: what `save_pretrained` writes, and the digest."""
    with tempfile.TemporaryDirectory(prefix="draftfeed-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return pb.Tokenizer(files=files, digest=tokenizer_digest(tokenizer))


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def fetch_tokenizer(
    url: str, directory: str | Path, *, security: ChannelSecurity | None = None, timeout=120.0
):
    """(tokenizer, digest) of the tokenizer the server at `url` serves, its files written under
    `directory/<digest>` (kept: a later call, another rank, reuses them) and loaded from there with
    `AutoTokenizer`. None from a server older than `GetTokenizer`. A server without a tokenizer raises
    FailedPrecondition."""
    security = security or ChannelSecurity()
    target = parse_target(url)
    channel = open_channel(target, security, grpc_options())
    try:
        reply = TargetStub(channel).GetTokenizer(
            pb.GetTokenizerRequest(), timeout=timeout, metadata=security.metadata
        )
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise explain_unavailable(target, security, error_for_code(err.code(), err.details() or "")) from None
    finally:
        channel.close()
    bad = [name for name in reply.files if not _safe_name(name)]
    if bad or not reply.files or len(reply.digest) != 32:
        raise DraftfeedError(
            f"{url}: the server's tokenizer reply is malformed (file names {sorted(reply.files)})"
        )
    path = Path(directory).expanduser() / reply.digest
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{reply.digest}."))
        try:
            for name, data in reply.files.items():
                (tmp / name).write_bytes(data)
            os.replace(tmp, path)  # atomic; another process that got there first wrote the same files
        except OSError:
            if not path.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True), reply.digest
