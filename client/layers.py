"""Default target-layer ids and their validation, per draft algorithm (docs/architecture.md).

Each algorithm's rule lives in its own module (`client/algorithms/<name>.py`); this module names them
for callers that import them from here, and `LAYER_IDS` is the registry's (default, validator) pairs.
N is the target's decoder-layer count. A layer id i means the output of decoder layer i (HF
`hidden_states[i + 1]`), except DSpark's -1 (input of the first layer) and N-1 (final-norm output).
"""

from __future__ import annotations

from .algorithms import ALGORITHMS
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
    "LAYER_IDS",
]


# algorithm -> (default builder, validator) of the built-in algorithms, from the registry (the live registry,
# with any algorithm registered later, is `draftfeed.client.algorithms.ALGORITHMS`)
LAYER_IDS = {name: (a.default_layer_ids, a.validate_layer_ids) for name, a in ALGORITHMS.items()}
