"""What a trainer imports: backend interfaces, batch dataclasses, errors, layer ids, the token map,
and the remote backends (`from draftfeed.client import RemoteEagle3TargetModel`).

Never imports transformers or server code, so a trainer box needs only this package. The remote
backends are imported on first use (they pull in the gRPC stubs and the encodings, ~0.1 s).
"""

from .backend import DFlashTargetBackend, DSparkTargetBackend, Eagle3TargetBackend
from .batches import DFlashTargetBatch, DSparkTargetBatch, Eagle3TargetBatch
from .errors import (
    DraftfeedError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .layers import (
    default_dflash_layer_ids,
    default_dspark_layer_ids,
    default_eagle3_layer_ids,
    validate_dflash_layer_ids,
    validate_dspark_layer_ids,
    validate_eagle3_layer_ids,
)
from .vocab import TokenCounter, build_token_map, d2t_t2d

_REMOTE = ("RemoteEagle3TargetModel", "RemoteDFlashTargetModel", "RemoteDSparkTargetModel")

__all__ = [
    *_REMOTE,
    "Eagle3TargetBackend",
    "DFlashTargetBackend",
    "DSparkTargetBackend",
    "Eagle3TargetBatch",
    "DFlashTargetBatch",
    "DSparkTargetBatch",
    "DraftfeedError",
    "InvalidArgument",
    "FailedPrecondition",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "default_eagle3_layer_ids",
    "default_dflash_layer_ids",
    "default_dspark_layer_ids",
    "validate_eagle3_layer_ids",
    "validate_dflash_layer_ids",
    "validate_dspark_layer_ids",
    "TokenCounter",
    "build_token_map",
    "d2t_t2d",
]


def __getattr__(name: str):
    if name in _REMOTE:
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_REMOTE))
