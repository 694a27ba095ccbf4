"""Default target-layer ids and their validation, per draft algorithm (DESIGN.md).

N is the target's decoder-layer count. A layer id i means the output of decoder layer i (HF
`hidden_states[i + 1]`), except DSpark's -1 (input of the first layer) and N-1 (final-norm output).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .errors import InvalidArgument

__all__ = [
    "default_eagle3_layer_ids",
    "default_dflash_layer_ids",
    "default_dspark_layer_ids",
    "validate_eagle3_layer_ids",
    "validate_dflash_layer_ids",
    "validate_dspark_layer_ids",
    "LAYER_IDS",
]


def _check_ints(ids: Sequence[int], what: str) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                if int(i) != i:
                    raise ValueError
                i = int(i)
            except (TypeError, ValueError):
                raise InvalidArgument(f"{what}: layer id {i!r} is not an integer") from None
        out.append(i)
    return out


def default_eagle3_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's aux layers: [1, N//2 - 1, N - 4]; InvalidArgument when they are not 3 distinct
    layers (N < 7: N=6 gives [1, 2, 2])."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if len(set(ids)) != 3 or min(ids) < 0:
        raise InvalidArgument(
            f"EAGLE-3's default aux layers [1, N//2-1, N-4] = {ids} are not 3 distinct layers for a target "
            f"with N={num_layers} decoder layers; pass 3 distinct aux_layer_ids in 0..{num_layers - 1} "
            "(a server sets a default for clients that cannot choose with `draftfeed serve --aux-layer-ids`)"
        )
    return ids


def validate_eagle3_layer_ids(ids: Sequence[int], num_layers: int) -> list[int]:
    ids = _check_ints(ids, "EAGLE-3 aux_layer_ids")
    if len(ids) != 3:
        raise InvalidArgument(
            f"EAGLE-3 needs exactly 3 aux_layer_ids, got {len(ids)}: {ids}; valid ids are 0..{num_layers - 1} "
            f"for a target with {num_layers} decoder layers"
        )
    for i in ids:
        if not 0 <= i < num_layers:
            raise InvalidArgument(
                f"EAGLE-3 aux layer id {i} is out of range: valid ids are 0..{num_layers - 1} "
                f"for a target with {num_layers} decoder layers"
            )
    if len(set(ids)) != 3:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidArgument(
            f"EAGLE-3 aux_layer_ids must be distinct, got {ids} (id {dup} repeats); pick 3 different ids in "
            f"0..{num_layers - 1}"
        )
    return ids


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


# algorithm -> (default builder, validator)
LAYER_IDS = {
    "eagle3": (lambda n, k=3: default_eagle3_layer_ids(n), validate_eagle3_layer_ids),
    "dflash": (default_dflash_layer_ids, validate_dflash_layer_ids),
    "dspark": (default_dspark_layer_ids, validate_dspark_layer_ids),
}
