"""A batch's fields as reply tensors: each field encoded by its session's choice for its kind.

The server calls `encode_fields` (on the GPU, before the device-to-host copy); the wire moves the
parts; the client calls `decode_fields`. Both sides share this table of field -> tensor kind.
"""

from __future__ import annotations

import torch

from .encodings import Encoded, decode, get_encoding, pack_encoded, unpack_encoded
from .errors import InvalidArgument

__all__ = ["FIELD_KINDS", "DEFAULT_ENCODINGS", "resolve_encodings", "encode_fields", "decode_fields"]

FIELD_KINDS = {
    "aux_hidden_states": "hidden",
    "hidden_states": "hidden",
    "target_hidden_states": "hidden",
    "target_last_hidden_states": "hidden",
    "final_hidden": "hidden",  # latent EAGLE-3 supervision: shifted final-norm state
    "logits": "hidden",
    "target_probs": "probs",
    "position_mask": "mask",
    "input_ids": "ids",
    "attention_mask": "ids",
    "loss_mask": "ids",
    "position_ids": "ids",
    "seq_lens": "ids",
    "doc_remaining": "ids",
}
DEFAULT_ENCODINGS = {"hidden": "raw", "probs": "raw", "mask": "raw", "ids": "raw"}


def resolve_encodings(requested: dict[str, str] | None) -> dict[str, str]:
    """Validate a session's encodings per kind (unknown kinds/names are InvalidArgument) and fill defaults."""
    out = dict(DEFAULT_ENCODINGS)
    for kind, name in (requested or {}).items():
        if kind not in out:
            raise InvalidArgument(
                f"unknown tensor kind {kind!r} in encodings; expected one of {', '.join(out)}"
            )
        out[kind] = get_encoding(name, kind).name
    return out


def encode_fields(
    fields: dict[str, torch.Tensor], encodings: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """(wire tensors named `field.part`, meta) for a batch's fields, on the fields' device."""
    encoded: dict[str, Encoded] = {}
    for name, t in fields.items():
        kind = FIELD_KINDS[name]
        enc_name = encodings[kind]
        if kind == "probs" and enc_name == "latent":
            raise InvalidArgument("target_probs cannot travel as 'latent'; send final_hidden instead")
        encoded[name] = get_encoding(enc_name, kind).encode(t, allow_nonfinite=enc_name == "raw")
    return pack_encoded(encoded)


def decode_fields(tensors: dict[str, torch.Tensor], meta: dict, device=None) -> dict[str, torch.Tensor]:
    """The batch fields a reply carries, decoded onto `device`."""
    return {name: decode(enc, device) for name, enc in unpack_encoded(tensors, meta).items()}
