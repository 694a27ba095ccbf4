"""Default target-layer ids and their validation, per draft algorithm (docs/architecture.md).

Each algorithm's rule lives in its own module (`client/algorithms/<name>.py`); this module names them
for callers that import them from here.
N is the target's decoder-layer count. A layer id i means the output of decoder layer i (HF
`hidden_states[i + 1]`), except DSpark's -1 (input of the first layer) and N-1 (final-norm output).
"""

from __future__ import annotations

from .algorithms.dflash import default_dflash_layer_ids, validate_dflash_layer_ids
from .algorithms.dspark import default_dspark_layer_ids, validate_dspark_layer_ids
from .algorithms.eagle3 import default_eagle3_layer_ids, validate_eagle3_layer_ids

__all__ = [
    "default_eagle3_layer_ids",
    "default_dflash_layer_ids",
    "default_dspark_layer_ids",
    "validate_eagle3_layer_ids",
    "validate_dflash_layer_ids",
    "validate_dspark_layer_ids",
]
