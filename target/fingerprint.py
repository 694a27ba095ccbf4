"""Which target this is: its config as JSON and a fingerprint over config and weights, the same whether the
server computes it (sent in the model info) or an in-process trainer does (recorded with its draft)."""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["config_json", "fingerprint"]


def config_json(model: torch.nn.Module) -> str:
    """The target's config as JSON (`config.to_dict()`, keys sorted), as the fingerprint and the model info
    carry it."""
    return json.dumps(model.config.to_dict(), sort_keys=True, default=str)


@torch.inference_mode()
def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and, per parameter, its name, shape, dtype and two on-device sums.

    Cheap on a GPU (no host copy of the weights) and different for different weights or configs.
    """
    h = hashlib.sha256(config_json(model).encode())
    for name, p in model.state_dict().items():
        x = p.detach().double()
        stats = torch.stack(
            [x.sum(), (x * torch.arange(1, x.numel() + 1, device=x.device).view_as(x) % 7).sum()]
        )
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(stats.cpu().numpy().tobytes())
    return h.hexdigest()[:32]
