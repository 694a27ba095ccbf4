"""The draft algorithms a client knows, one module each, gathered in one plain-dict registry.

An `Algorithm` says what the client side needs to serve it over the wire: the batch dataclass a reply
becomes, the tensor kind of each reply field (how the session's encodings apply to it), the default
target-layer ids and their validation, and an optional rebuild of the reply's fields on the client (the
EAGLE-3 latent supervision). The remote client (`client/remote.py`) and the server's sessions
(`target/algorithms/`) read everything per algorithm from here; adding an algorithm is a new module
here and one in `target/algorithms/` that both call `register`, not an edit of either side.

Layer ids: N is the target's decoder-layer count; a layer id i means the output of decoder layer i (HF
`hidden_states[i + 1]`), except DSpark's -1 (input of the first layer) and N-1 (final-norm output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidArgument

__all__ = ["Algorithm", "ALGORITHMS", "register", "get_algorithm", "check_layer_ints", "INPUT_FIELD_KINDS"]

# the request's token fields, echoed in every reply that carries them
INPUT_FIELD_KINDS = {
    "input_ids": "ids",
    "attention_mask": "ids",
    "loss_mask": "ids",
    "position_ids": "ids",
    "seq_lens": "ids",
    "doc_remaining": "ids",
}


@dataclass(frozen=True)
class Algorithm:
    """One draft algorithm as the client sees it.

    `default_layer_ids(N)` (or `(N, K)` for a K-layer rule) gives the ids a session that names none gets
    and may raise InvalidArgument for a target too shallow for the rule; `validate_layer_ids(ids, N)`
    returns the checked ids or raises InvalidArgument. `field_kinds` maps each reply field that is not a
    token field to its tensor kind (hidden, final, probs, mask, ids). `rebuild(client, fields)`, when set,
    turns the decoded reply fields into the batch's fields on the client (after decoding, before `batch`).
    `latent_probs`: the session may ask for the 'latent' probs encoding. `info_default_field`: the
    ModelInfo field that carries the server's default layer ids for it (None: not in model info).
    """

    name: str
    batch: type
    field_kinds: dict[str, str]
    default_layer_ids: Callable[..., list[int]]
    validate_layer_ids: Callable[[Sequence[int], int], list[int]]
    rebuild: Callable[[object, dict], dict] | None = None
    latent_probs: bool = False
    info_default_field: str | None = None
    reply_fields: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "reply_fields", {**INPUT_FIELD_KINDS, **self.field_kinds})

    def layer_ids(self, ids: Sequence[int] | None, num_layers: int) -> list[int]:
        """The validated `ids`, or the default ones when none are given."""
        return self.validate_layer_ids(ids, num_layers) if ids else self.default_layer_ids(num_layers)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    """Add `algorithm` to the registry (a name registered again is replaced)."""
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise InvalidArgument(f"unknown algorithm {name!r}; supported: {', '.join(ALGORITHMS)}") from None


def check_layer_ints(ids: Sequence[int], what: str) -> list[int]:
    """`ids` as a list of ints; InvalidArgument naming `what` for an id that is not an integer."""
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


# the built-in algorithms register themselves, in this order (the order model info and messages list them)
# isort: off
from . import eagle3  # noqa: E402, F401
from . import dflash  # noqa: E402, F401
from . import dspark  # noqa: E402, F401
# isort: on
