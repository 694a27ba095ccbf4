"""DFlash on the client: its batch, reply fields and target-layer ids.

DFlash takes the concatenated outputs of K decoder layers (default K=5, spread over the target), unshifted
inputs, and optionally the full logits.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..batches import DFlashTargetBatch
from ..errors import InvalidArgument
from . import Algorithm, register
from . import check_layer_ints as _check_ints

__all__ = ["default_dflash_layer_ids", "validate_dflash_layer_ids", "ALGORITHM"]


def default_dflash_layer_ids(num_layers: int, num_target_layers: int = 5) -> list[int]:
    """K == 1 -> [N//2]; else round(1 + i*(N-4)/(K-1)) for i in range(K); InvalidArgument when
    these repeat a layer (shallow targets: N=6, K=5 gives [1, 2, 2, 2, 3])."""
    k = num_target_layers
    if k < 1:
        raise InvalidArgument(f"DFlash needs at least one target layer, got num_target_layers={k}")
    if k == 1:
        return [num_layers // 2]
    ids = [round(1 + i * (num_layers - 4) / (k - 1)) for i in range(k)]
    if len(set(ids)) != k or not all(0 <= i < num_layers for i in ids):
        raise InvalidArgument(
            f"DFlash's default {k} target layers round(1 + i*(N-4)/(K-1)) = {ids} are not {k} distinct "
            f"layers of a target with N={num_layers} decoder layers; pass {k} distinct target_layer_ids "
            f"in 0..{num_layers - 1}, or fewer target layers"
        )
    return ids


def validate_dflash_layer_ids(ids: Sequence[int], num_layers: int) -> list[int]:
    ids = _check_ints(ids, "DFlash target_layer_ids")
    if not ids:
        raise InvalidArgument(
            f"DFlash target_layer_ids must not be empty; pass ids in 0..{num_layers - 1} for a target with "
            f"{num_layers} decoder layers"
        )
    for i in ids:
        if not 0 <= i < num_layers:
            raise InvalidArgument(
                f"DFlash target layer id {i} is out of range: valid ids are 0..{num_layers - 1} "
                f"for a target with {num_layers} decoder layers"
            )
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidArgument(
            f"DFlash target_layer_ids must be distinct, got {ids} (id {dup} repeats); each layer is "
            f"captured once: pick different ids in 0..{num_layers - 1}"
        )
    return ids


ALGORITHM = register(
    Algorithm(
        name="dflash",
        batch=DFlashTargetBatch,
        field_kinds={"hidden_states": "hidden", "logits": "hidden"},
        default_layer_ids=default_dflash_layer_ids,
        validate_layer_ids=validate_dflash_layer_ids,
        info_default_field="dflash_default_layer_ids",
    )
)
