"""EAGLE-3 on the client: its batch, reply fields, aux-layer ids and the latent supervision rebuild.

EAGLE-3 takes 3 aux layers (default [1, N//2 - 1, N - 4]) and shifted supervision: full logits, or draft-vocab
`target_probs` + `position_mask` once a vocab mapping is set. With the 'latent' probs encoding the server
ships the shifted final-norm state and the client rebuilds `target_probs` (`rebuild_latent`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..batches import Eagle3TargetBatch
from ..errors import InvalidArgument
from . import Algorithm, register
from . import check_layer_ints as _check_ints

__all__ = ["default_eagle3_layer_ids", "validate_eagle3_layer_ids", "rebuild_latent", "ALGORITHM"]


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


def rebuild_latent(client, fields: dict) -> dict:
    """Latent supervision: `target_probs` rebuilt from the shipped `final_hidden` with the client's
    `lm_head` rows of the draft vocab (`client._lm_head_rows()`) and the target's softcapping."""
    if "final_hidden" in fields:
        from ..encodings import latent_target_probs  # numpy and the codecs: loaded by a remote client only

        h = fields.pop("final_hidden")
        fields["target_probs"] = latent_target_probs(
            h, client._lm_head_rows().to(client.device), final_logit_softcapping=client._softcap()
        )
    return fields


ALGORITHM = register(
    Algorithm(
        name="eagle3",
        batch=Eagle3TargetBatch,
        field_kinds={
            "aux_hidden_states": "hidden",
            "final_hidden": "final",  # latent supervision: the shifted final-norm state
            "logits": "hidden",
            "target_probs": "probs",
            "position_mask": "mask",
        },
        default_layer_ids=lambda n, k=3: default_eagle3_layer_ids(n),
        validate_layer_ids=validate_eagle3_layer_ids,
        rebuild=rebuild_latent,
        latent_probs=True,
        info_default_field="eagle3_default_layer_ids",
    )
)
