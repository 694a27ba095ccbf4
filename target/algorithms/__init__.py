"""The draft algorithms a server serves, one module each, gathered in one plain-dict registry.

A `ServerAlgorithm` builds a session's features object (`target/features.py` says what one holds) from the
session's checked layer ids, the target's layer count N, and the session's `capture_logits` and `latent`
choices. The layer ids are defaulted and validated by the client-side entry of the same name
(`draftfeed.client.algorithms`), which also says how the reply's fields are encoded and rebuilt; the
sessions, the model info and the in-process `HFTargetModel` read both registries. Adding an algorithm is a
module here and one in `client/algorithms/` that register themselves, not an edit of the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from draftfeed.client.algorithms import ALGORITHMS as CLIENT_ALGORITHMS
from draftfeed.client.errors import InvalidArgument

__all__ = ["ServerAlgorithm", "ALGORITHMS", "register", "get_server_algorithm"]


@dataclass(frozen=True)
class ServerAlgorithm:
    """`features(layer_ids, num_layers, capture_logits, latent)` -> the session's features object."""

    name: str
    features: Callable[[list[int], int, bool, bool], object]


ALGORITHMS: dict[str, ServerAlgorithm] = {}


def register(algorithm: ServerAlgorithm) -> ServerAlgorithm:
    """Add `algorithm` (its client-side entry must be registered first: the two share the name)."""
    if algorithm.name not in CLIENT_ALGORITHMS:
        raise ValueError(
            f"server algorithm {algorithm.name!r} has no client-side entry; register its "
            "draftfeed.client.algorithms.Algorithm first"
        )
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_server_algorithm(name: str) -> ServerAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise InvalidArgument(f"unknown algorithm {name!r}; supported: {', '.join(ALGORITHMS)}") from None


# the built-in algorithms register themselves, in this order (the order model info and messages list them)
# isort: off
from . import eagle3  # noqa: E402, F401
from . import dflash  # noqa: E402, F401
from . import dspark  # noqa: E402, F401
# isort: on
