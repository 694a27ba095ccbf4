"""The GPU side: target loading, layer capture, supervision math, backends, and the gRPC service."""

from draftfeed.client.layers import (
    default_dflash_layer_ids,
    default_dspark_layer_ids,
    default_eagle3_layer_ids,
    validate_dflash_layer_ids,
    validate_dspark_layer_ids,
    validate_eagle3_layer_ids,
)
from draftfeed.client.vocab import build_token_map

from .architectures import DSPARK_DRAFTS, dspark_draft_architecture
from .backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from .capture import TargetLayout, discover, run_target
from .packing import block_causal_mask, packed_attention_mask
from .supervision import project_supervision, shift_left

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
    "DSPARK_DRAFTS",
    "dspark_draft_architecture",
]
