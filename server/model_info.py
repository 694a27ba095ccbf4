"""What a server tells clients about its target: shape, dtype, a fingerprint, limits, what it supports."""

from __future__ import annotations

import torch

from draftfeed.client.algorithms import get_algorithm
from draftfeed.client.encodings import supported_encodings
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.pb import draftfeed_pb2 as pb
from draftfeed.client.wire import dtype_name
from draftfeed.target.algorithms import ALGORITHMS
from draftfeed.target.capture import TargetLayout
from draftfeed.target.fingerprint import config_json

from .config import ServeConfig

__all__ = ["build_model_info", "SERVER_VERSION"]

SERVER_VERSION = "0.1.0"


def build_model_info(model: torch.nn.Module, layout: TargetLayout, cfg: ServeConfig, fp: str) -> pb.ModelInfo:
    n = layout.num_layers
    defaults = {}  # ModelInfo field -> the default layer ids of the algorithm it names
    for name in ALGORITHMS:
        algorithm = get_algorithm(name)
        if algorithm.info_default_field is None:
            continue
        try:
            defaults[algorithm.info_default_field] = algorithm.default_layer_ids(n)
        except InvalidArgument:  # a shallow target: the rule would repeat a layer
            defaults[algorithm.info_default_field] = []
    if cfg.aux_layer_ids:
        defaults["eagle3_default_layer_ids"] = list(cfg.aux_layer_ids)
    by_kind = supported_encodings()
    by_kind["final"] = by_kind["hidden"]  # the latent final-norm state takes the hidden-state codecs
    encodings = [f"{kind}/{name}" for kind, names in by_kind.items() for name in names]
    info = pb.ModelInfo(
        num_hidden_layers=n,
        hidden_size=layout.hidden_size,
        vocab_size=layout.vocab_size,
        dtype=dtype_name(model.dtype),
        architectures=list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        fingerprint=fp,
        limits=pb.Limits(
            max_batch_size=cfg.limits.max_batch_size,
            max_seq_len=cfg.limits.max_seq_len,
            max_request_tokens=cfg.limits.max_request_tokens,
            max_batch_tokens=cfg.limits.max_request_tokens,  # deprecated on the wire: older clients read it
            max_forward_tokens=cfg.max_forward_tokens,
            max_chunk_bytes=cfg.max_chunk_bytes,
        ),
        algorithms=list(ALGORITHMS),
        encodings=encodings,
        eagle3_default_layer_ids_from_server=bool(cfg.aux_layer_ids),
        **defaults,
        session_ttl_s=cfg.session_ttl_s,
        server_version=SERVER_VERSION,
        target_config_json=config_json(model),
    )
    if layout.final_logit_softcapping is not None:
        info.final_logit_softcapping = float(layout.final_logit_softcapping)
    return info
