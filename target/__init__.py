"""The target side, shared by the server and an in-process trainer: loading a target, capturing its layers in
one forward, the features each algorithm builds from it (`target/algorithms/<name>.py`), request checks, the
in-process backends and the fingerprint. It imports nothing from `draftfeed.server` or `draftfeed.trainer`.

Names are imported on first use (PEP 562), so importing the package does not import torch or transformers.
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
    "project_supervision": "draftfeed.client.supervision",
    "shift_left": "draftfeed.client.supervision",
    "load_target": ".loading",
    "load_tokenizer": ".loading",
    "fingerprint": ".fingerprint",
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
    "load_target",
    "load_tokenizer",
    "fingerprint",
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__():
    return sorted(__all__)
