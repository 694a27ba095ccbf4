"""The GPU side: target loading, layer capture, supervision math, backends, and the gRPC service.

Names are imported on first use (PEP 562), so `draftfeed health` and `draftfeed --version` start
without importing torch or transformers.
"""

from draftfeed.client.lazy import lazy_getattr

_LAZY = {
    "default_dflash_layer_ids": "draftfeed.client.layers",
    "default_dspark_layer_ids": "draftfeed.client.layers",
    "default_eagle3_layer_ids": "draftfeed.client.layers",
    "validate_dflash_layer_ids": "draftfeed.client.layers",
    "validate_dspark_layer_ids": "draftfeed.client.layers",
    "validate_eagle3_layer_ids": "draftfeed.client.layers",
    "build_token_map": "draftfeed.client.vocab",
    "HFDFlashTargetModel": ".backends",
    "HFDSparkTargetModel": ".backends",
    "HFEagle3TargetModel": ".backends",
    "TargetLayout": ".capture",
    "discover": ".capture",
    "run_target": ".capture",
    "block_causal_mask": ".packing",
    "packed_attention_mask": ".packing",
    "project_supervision": ".supervision",
    "shift_left": ".supervision",
}

__all__ = [
    "HFEagle3TargetModel",
    "HFDFlashTargetModel",
    "HFDSparkTargetModel",
    "TargetLayout",
    "discover",
    "run_target",
    "shift_left",
    "project_supervision",
    "block_causal_mask",
    "packed_attention_mask",
    "build_token_map",
    "default_eagle3_layer_ids",
    "default_dflash_layer_ids",
    "default_dspark_layer_ids",
    "validate_eagle3_layer_ids",
    "validate_dflash_layer_ids",
    "validate_dspark_layer_ids",
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__():
    return sorted(__all__)
