"""DSpark on the client: its batch, reply fields and target-layer ids.

DSpark takes the features of ids in {-1} u [0, N-1] (-1 = input of layer 0, N-1 = final-norm output) and the
final-norm output itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..batches import DSparkTargetBatch
from ..errors import InvalidArgument
from . import Algorithm, register
from . import check_layer_ints as _check_ints

__all__ = ["default_dspark_layer_ids", "validate_dspark_layer_ids", "ALGORITHM"]


def default_dspark_layer_ids(num_layers: int, num_target_layers: int = 5) -> list[int]:
    """DFlash's spacing: K == 1 -> [N//2]; else round(1 + i*(N-4)/(K-1)) for i in range(K), kept inside
    0..N-2 (an SGLang deployment captures neither the embedding output -1 nor the final-norm output N-1),
    repeats dropped on shallow targets. N=36 gives DeepSpec's [1, 9, 17, 25, 33]."""
    top = max(0, num_layers - 2)
    k = max(1, num_target_layers)
    if k == 1:
        return [min(num_layers // 2, top)]
    return sorted({min(top, max(0, round(1 + i * (num_layers - 4) / (k - 1)))) for i in range(k)})


def validate_dspark_layer_ids(ids: Sequence[int], num_layers: int) -> list[int]:
    ids = _check_ints(ids, "DSpark target_layer_ids")
    if not ids:
        raise InvalidArgument(
            f"DSpark target_layer_ids must not be empty; pass strictly increasing ids from -1 and "
            f"0..{num_layers - 1} for a target with {num_layers} decoder layers"
        )
    for i in ids:
        if not (i == -1 or 0 <= i <= num_layers - 1):
            raise InvalidArgument(
                f"DSpark target layer id {i} is out of range: valid ids are -1 (embedding output) and "
                f"0..{num_layers - 1} for a target with {num_layers} decoder layers"
            )
    for a, b in zip(ids, ids[1:], strict=False):
        if b <= a:
            raise InvalidArgument(
                f"DSpark target_layer_ids must be strictly increasing, got {ids} (id {b} after {a}); valid ids "
                f"are -1 and 0..{num_layers - 1}"
            )
    edge = [i for i in ids if i in (-1, num_layers - 1)]
    if edge:
        warnings.warn(
            f"DSpark target layer ids {edge} (embedding output / final-norm output) cannot be captured by an "
            f"SGLang deployment; a draft trained on them cannot be served there",
            stacklevel=2,
        )
    return ids


ALGORITHM = register(
    Algorithm(
        name="dspark",
        batch=DSparkTargetBatch,
        field_kinds={"target_hidden_states": "hidden", "target_last_hidden_states": "hidden"},
        default_layer_ids=default_dspark_layer_ids,
        validate_layer_ids=validate_dspark_layer_ids,
        info_default_field="dspark_default_layer_ids",
    )
)
