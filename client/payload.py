"""A batch's fields as reply tensors: each field encoded by its session's choice for its kind.

The server calls `encode_fields_on_device` right after the forward: device work only, no host
synchronisation, so the GPU worker moves on at once. It copies `PendingFields.device_tensors()`
(the parts, plus one small vector of check values) to the host, and the reply writer calls
`PendingFields.finish` on the copy: it verifies the checks (NaN/inf refused by the lossy codecs,
ids outside their known range), runs host stages (zstd) and packs the wire tensors. A failed check
is an InvalidArgument for that request alone. `encode_fields` does both at once. The wire moves
the parts; the client calls `decode_fields`. Both sides read a field's tensor kind from the algorithm
registry (`field_kind`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithms import ALGORITHMS, INPUT_FIELD_KINDS
from .encodings import (
    Check,
    Encoded,
    check_errors,
    decode,
    finish_encoded,
    get_encoding,
    pack_encoded,
    unpack_encoded,
)
from .errors import InvalidArgument

__all__ = [
    "field_kind",
    "DEFAULT_ENCODINGS",
    "CHECKS_TENSOR",
    "PendingFields",
    "resolve_encodings",
    "id_value_range",
    "encode_fields",
    "encode_fields_on_device",
    "decode_fields",
]


def field_kind(name: str) -> str:
    """The tensor kind of a reply field: a token field's, or the one the algorithm that sends it gives
    it (`client/algorithms/`, `Algorithm.field_kinds`)."""
    if name in INPUT_FIELD_KINDS:
        return INPUT_FIELD_KINDS[name]
    for algorithm in ALGORITHMS.values():
        if name in algorithm.field_kinds:
            return algorithm.field_kinds[name]
    raise InvalidArgument(f"reply field {name!r} belongs to no registered algorithm; it has no tensor kind")


DEFAULT_ENCODINGS = {"hidden": "raw", "final": "raw", "probs": "raw", "mask": "raw", "ids": "raw"}
# "final" (the final-norm state shipped for latent supervision) takes the hidden-state codecs but is
# chosen apart from the aux/feature states: fp8 aux with a bf16 or raw final state is the usual pick.
_CODEC_KIND = {"final": "hidden"}


def resolve_encodings(requested: dict[str, str] | None) -> dict[str, str]:
    """Validate a session's encodings per kind (unknown kinds/names are InvalidArgument) and fill defaults."""
    out = dict(DEFAULT_ENCODINGS)
    for kind, name in (requested or {}).items():
        if kind not in out:
            raise InvalidArgument(
                f"unknown tensor kind {kind!r} in encodings; expected one of {', '.join(out)}"
            )
        out[kind] = get_encoding(name, _CODEC_KIND.get(kind, kind)).name
    return out


CHECKS_TENSOR = "__checks__"  # name of the check-values vector among `PendingFields.device_tensors()`


def id_value_range(name: str, seq_len: int, vocab_size: int | None) -> tuple[int, int] | None:
    """The range an ids-kind field's values must lie in, known without looking at them: token ids
    in [0, V), masks 0/1, packing integers in [0, S]. None (the data decides) without a vocab size."""
    if name == "input_ids":
        return None if vocab_size is None else (0, max(vocab_size - 1, 0))
    if name in ("attention_mask", "loss_mask"):
        return (0, 1)
    return (0, seq_len)  # position_ids, seq_lens, doc_remaining


@dataclass
class PendingFields:
    """A reply's fields encoded on the device, checks not yet verified (see `encode_fields_on_device`)."""

    encoded: dict[str, Encoded]

    def device_tensors(self) -> dict[str, torch.Tensor]:
        """What to copy to the host: every part as `field.part`, and the values of every check as one
        int64 vector `CHECKS_TENSOR` (absent when there is none)."""
        tensors = {f"{name}.{part}": t for name, enc in self.encoded.items() for part, t in enc.parts.items()}
        values = [c.values.reshape(-1).to(torch.int64) for enc in self.encoded.values() for c in enc.checks]
        if values:
            tensors[CHECKS_TENSOR] = torch.cat(values)
        return tensors

    def rebind(self, host: dict[str, torch.Tensor]) -> PendingFields:
        """The same fields with their parts and check values pointing into `host` (where the copy of
        `device_tensors()` lands), so nothing keeps the device tensors alive."""
        values = host.get(CHECKS_TENSOR)
        at, out = 0, {}
        for name, enc in self.encoded.items():
            checks = []
            for c in enc.checks:
                n = c.values.numel()
                checks.append(Check(values[at : at + n], c.verify))
                at += n
            parts = {part: host[f"{name}.{part}"] for part in enc.parts}
            out[name] = Encoded(parts, enc.info, checks, enc.host_stage)
        return PendingFields(out)

    def finish(self) -> tuple[dict[str, torch.Tensor], dict]:
        """On the host, once the parts are there: verify the checks (InvalidArgument naming each
        failing field), run host stages, return (wire tensors, meta)."""
        errors = []
        for name, enc in self.encoded.items():
            values = [v for c in enc.checks for v in c.values.tolist()]
            errors += [f"field {name!r}: {m}" for m in check_errors(enc.checks, values)]
        if errors:
            raise InvalidArgument("this reply cannot be encoded as the session asked: " + "; ".join(errors))
        ready = {
            name: finish_encoded(Encoded(dict(enc.parts), dict(enc.info), host_stage=enc.host_stage), [])
            for name, enc in self.encoded.items()
        }
        return pack_encoded(ready)


def encode_fields_on_device(
    fields: dict[str, torch.Tensor],
    encodings: dict[str, str],
    hidden_size: int | None = None,
    *,
    vocab_size: int | None = None,
    allow_nonfinite: bool = False,
) -> PendingFields:
    """A batch's fields encoded on their device without any host synchronisation.

    Give `vocab_size` so `narrow` ids take their dtype from it (without it the data's range decides,
    which syncs). A hidden-state field that concatenates K layers ([..., K*H]) is encoded as
    [..., K, H] with a lossy codec, so fp8's per-row scale is per layer: one layer's massive
    activation (2.5e4 in Llama-class models) must not crush another layer's values (measured on
    SmolLM2: 4.8% max row error with one scale per token, 3.2% with one per layer, for 8 bytes
    more per token). Lossy codecs refuse NaN/inf (at `finish`) unless `allow_nonfinite`.
    """
    seq_len = fields["input_ids"].shape[-1] if "input_ids" in fields else 0
    encoded: dict[str, Encoded] = {}
    for name, t in fields.items():
        kind = field_kind(name)
        enc_name = encodings[kind]
        if kind == "probs" and enc_name == "latent":
            raise InvalidArgument("target_probs cannot travel as 'latent'; send final_hidden instead")
        codec = get_encoding(enc_name, _CODEC_KIND.get(kind, kind))
        value_range = id_value_range(name, seq_len, vocab_size) if kind == "ids" else None
        opts = dict(allow_nonfinite=allow_nonfinite, value_range=value_range)
        layers = t.shape[-1] // hidden_size if kind == "hidden" and hidden_size and not codec.exact else 1
        if layers > 1 and t.shape[-1] == layers * hidden_size:
            enc = codec.encode_on_device(t.unflatten(-1, (layers, hidden_size)), **opts)
            enc.info["layers"] = layers
        else:
            enc = codec.encode_on_device(t, **opts)
        encoded[name] = enc
    return PendingFields(encoded)


def encode_fields(
    fields: dict[str, torch.Tensor],
    encodings: dict[str, str],
    hidden_size: int | None = None,
    *,
    vocab_size: int | None = None,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(wire tensors named `field.part`, meta) for a batch's fields, encoded and checked now (one
    sync on a GPU); `encode_fields_on_device` then `PendingFields.finish` without the copy."""
    pending = encode_fields_on_device(
        fields, encodings, hidden_size, vocab_size=vocab_size, allow_nonfinite=allow_nonfinite
    )
    return pending.finish()


def decode_fields(tensors: dict[str, torch.Tensor], meta: dict, device=None) -> dict[str, torch.Tensor]:
    """The batch fields a reply carries, decoded onto `device`."""
    out = {}
    for name, enc in unpack_encoded(tensors, meta).items():
        t = decode(enc, device)
        out[name] = t.flatten(-2) if enc.info.get("layers", 1) > 1 else t
    return out
