"""What a trainer imports: backend interfaces, batch dataclasses, errors, layer ids, the token map,
the algorithm registry (`client/algorithms/`) and the remote backends (`from draftfeed.client import
RemoteEagle3TargetModel`, or `RemoteTargetModel(urls, algorithm=NAME)` for any registered algorithm).

Never imports transformers or server code, so a trainer box needs only this package.

Names are imported on first use (PEP 562), so `import draftfeed.client.channel` (the health check)
loads grpc and not torch, and the remote backends' gRPC stubs and encodings (~0.1 s) load only when used.
"""

from .lazy import lazy_getattr

_LAZY = {
    "DFlashTargetBackend": ".backend",
    "DSparkTargetBackend": ".backend",
    "Eagle3TargetBackend": ".backend",
    "DFlashTargetBatch": ".batches",
    "DSparkTargetBatch": ".batches",
    "Eagle3TargetBatch": ".batches",
    "DraftfeedError": ".errors",
    "FailedPrecondition": ".errors",
    "InvalidArgument": ".errors",
    "NotFound": ".errors",
    "PermissionDenied": ".errors",
    "ResourceExhausted": ".errors",
    "Unauthenticated": ".errors",
    "Unavailable": ".errors",
    "default_dflash_layer_ids": ".algorithms.dflash",
    "default_dspark_layer_ids": ".algorithms.dspark",
    "default_eagle3_layer_ids": ".algorithms.eagle3",
    "validate_dflash_layer_ids": ".algorithms.dflash",
    "validate_dspark_layer_ids": ".algorithms.dspark",
    "validate_eagle3_layer_ids": ".algorithms.eagle3",
    "ALGORITHMS": ".algorithms",
    "Algorithm": ".algorithms",
    "TokenCounter": ".vocab",
    "build_token_map": ".vocab",
    "d2t_t2d": ".vocab",
    "RemoteTargetModel": ".remote",
    "RemoteEagle3TargetModel": ".remote",
    "RemoteDFlashTargetModel": ".remote",
    "RemoteDSparkTargetModel": ".remote",
}

_REMOTE = (
    "RemoteTargetModel",
    "RemoteEagle3TargetModel",
    "RemoteDFlashTargetModel",
    "RemoteDSparkTargetModel",
)
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
    "ALGORITHMS",
    "Algorithm",
    "TokenCounter",
    "build_token_map",
    "d2t_t2d",
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__():
    return sorted(__all__)
