"""What a trainer imports: backend interfaces, batch dataclasses, errors, layer ids, the token map.

Never imports transformers or server code, so a trainer box needs only this package.
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

__all__ = [
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
