"""What the block drafts (DFlash, DSpark) share in the trainer: backends, layer ids, the anchor generator,
the zero-block step, reading an export back."""

from __future__ import annotations

from typing import ClassVar

import torch

from draftfeed.client.algorithms import get_algorithm

from . import DistContext, DraftAlgorithm, StepOutput

__all__ = ["BlockAlgorithm", "block_layer_ids"]


def block_layer_ids(algorithm: str, num_layers: int, k: int) -> list[int]:
    """Default target layers of a block draft for K = `k` layers: the client's default of `algorithm`
    (`client/algorithms/`), the same ids a server picks for a session opened without any.

    DFlash: K == 1 -> [N//2], else round(1 + i(N-4)/(K-1)). DSpark: the same ids kept inside 0..N-2 (an
    SGLang deployment cannot capture -1 or N-1), repeats dropped on shallow targets."""
    return get_algorithm(algorithm).default_layer_ids(num_layers, k)


class BlockAlgorithm(DraftAlgorithm):
    """What DFlash and DSpark share: backends, layer ids, the anchor generator, the zero-block step."""

    backends: ClassVar[tuple[str, str]]  # (in-process class in draftfeed.target.backends, remote class)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.block_size = cfg.block.resolved_block_size(self.name)
        self.gamma = cfg.block.gamma(self.name)
        # anchors: a CPU generator per rank (same draws on any device), checkpointed with the run
        self.generator = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + cfg.dist.rank)

    def _layer_ids(self, num_layers: int) -> list[int]:
        t = self.cfg.target
        return (
            list(t.layer_ids)
            if t.layer_ids
            else block_layer_ids(self.name, num_layers, self.cfg.block.num_target_layers)
        )

    def size_flags(self) -> str:
        b = self.cfg.block
        return f"--num-anchors {b.num_anchors}, --draft-layers {b.num_layers}"

    def open_backend(self, model, device):
        t = self.cfg.target
        local_name, remote_name = self.backends
        if model is not None:
            from draftfeed.target import backends
            from draftfeed.target.capture import discover

            ids = self._layer_ids(discover(model).num_layers)
            return getattr(backends, local_name)(model, target_layer_ids=ids)
        from draftfeed.client import remote

        cls = getattr(remote, remote_name)
        return cls.from_urls(
            t.url,
            device=device,
            # without --layer-ids: our default for the N the server's model info tells (no local config read)
            target_layer_ids=t.layer_ids if t.layer_ids is not None else self._layer_ids,
            max_in_flight=self.cfg.loop.prefetch,
            **t.client_kwargs(),
        )

    def _draft_fields(self, backend, target_config) -> dict:
        b = self.cfg.block
        return dict(
            target_layer_ids=list(backend.target_layer_ids),
            mask_token_id=b.mask_token_id,
            num_layers=b.num_layers,
            block_size=self.block_size,
        )

    def export(self, draft, out_dir, target_config, backend):
        return self.exporter(draft, out_dir)

    def state_dict(self):
        return {"anchor_generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if "anchor_generator" in state:
            self.generator.set_state(state["anchor_generator"])

    def _empty_step(self, draft, keys, dist: DistContext) -> StepOutput:
        """A batch without any valid anchor: a zero loss that still touches every trainable parameter (so
        DDP's gradient all-reduce sees them all), zero metrics, and this rank's part (0) of the loss
        denominator's all-reduce, which the other ranks' losses are waiting in."""
        loss = sum(p.sum() for p in draft.parameters() if p.requires_grad) * 0.0
        zero = torch.zeros((), device=loss.device)
        dist.all_reduce_sum(zero)
        return StepOutput(loss=loss, metrics={k: zero for k in keys})

    @classmethod
    def load_export(cls, path, target, *, device=None, dtype=None):
        draft = cls.loader(path, target, device)
        if dtype is not None:
            draft = draft.to(dtype)
        return draft.eval(), list(draft.config.target_layer_ids)

    @classmethod
    def drafter(cls, draft, confidence_threshold=0.0):
        from ..evaluate import BlockDrafter

        return BlockDrafter(draft, confidence_threshold)
