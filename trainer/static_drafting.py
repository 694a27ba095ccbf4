"""Block drafting (DFlash, DSpark) on a static draft KV cache, entirely on the device, for `measure_speedup`.

In every draft layer the block's keys / values come from [C; x] through the same projections, with the
context C = hidden_norm(fc(F)) of the target features F (`models/dflash.py`): a context row's keys and
values (k_norm, RoPE at its position, v_proj) depend on that row's features and position alone, so they are
computed once, when its token is committed, and kept per layer in a preallocated buffer at the target's
column of the token. A proposal runs the block's bs rows at columns s..s+bs-1 (s = the committed count,
x_s the anchor): their keys / values are written into the same buffer there, and the queries attend to the
columns < s + bs (a mask built on the device). Columns past s + bs (rejected drafts, an earlier prompt) are
never seen; the next commit overwrites the block's columns. This is `run_block`'s arithmetic with the
context keys / values cached instead of recomputed; proposals match the eager `BlockDrafter`.

Both steps have fixed shapes and no host sync, so each is one CUDA graph (`fast_decode.Graphed`); on CPU the
same functions run eagerly. `commit` appends the K+1 rows of the verify pass (the rows past the accepted
a + 1 are masked and overwritten later); `propose` writes the drafts into the target's verify input and the
number to verify into its `ndrafts` (DSpark's confidence early stop: the first slot below the threshold,
computed on the device; the verify accepts at most that many).
"""

from __future__ import annotations

import torch

from .fast_decode import Graphed
from .models import dflash, dspark
from .models.common import apply_rope

__all__ = ["StaticBlockDrafter", "block_max_drafts"]


def block_max_drafts(draft) -> int:
    """Drafts per block: DFlash's slot 0 is the anchor (bs - 1), DSpark's slot k predicts x_{s+k+1} (bs)."""
    bs = draft.config.block_size
    return bs if isinstance(draft, dspark.DSparkDraft) else bs - 1


class StaticBlockDrafter:
    """A DFlash or DSpark draft proposing blocks for a `StaticTarget` (evaluate.py) without the host."""

    device_side = True

    def __init__(self, draft, target, confidence_threshold: float = 0.0, graphs: bool = True):
        self.draft, self.t = draft.eval(), target
        self.is_dspark = isinstance(draft, dspark.DSparkDraft)
        self.confidence_threshold = confidence_threshold
        cfg = draft.config
        self.bs = bs = cfg.block_size
        self.max_drafts = block_max_drafts(draft)
        self.n = min(self.max_drafts, target.k)  # drafts written into the verify input
        p = draft.fc.weight
        length = target.max_len + bs  # a block at the last columns the target can verify still fits
        shape = (1, cfg.num_key_value_heads, length, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in draft.layers]
        self.values = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in draft.layers]
        self.cols = torch.arange(length, device=p.device)
        self.offsets = torch.arange(bs, device=p.device)
        self.masks = torch.full((bs,), cfg.mask_token_id, dtype=torch.long, device=p.device)
        self.tokens = torch.zeros(bs, dtype=torch.long, device=p.device)  # the last proposal's block
        self.confidence = torch.zeros(bs, device=p.device)  # DSpark: sigmoid(c_k) of the last proposal
        self.commit = Graphed(self._commit, p.device, graphs, f"{cfg.algorithm} commit").capture()
        self.propose = Graphed(self._propose, p.device, graphs, f"{cfg.algorithm} block").capture()
        self.graphed = self.commit.graph is not None and self.propose.graph is not None

    def _context(self, features: torch.Tensor, cols: torch.Tensor) -> None:
        """Cache the per-layer context keys / values of feature rows [m,K*H] at columns (= positions) [m]."""
        d = self.draft
        c = d.context(features[None])
        cos, sin = d.rope(cols[None], c.dtype)
        for layer, keys, values in zip(d.layers, self.keys, self.values, strict=True):
            k, v = layer.self_attn.keys_values(c)
            keys.index_copy_(2, cols, apply_rope(k, cos, sin).to(keys.dtype))
            values.index_copy_(2, cols, v.to(values.dtype))

    @torch.no_grad()
    def prefill(self, aux: torch.Tensor, next_ids: torch.Tensor | None = None) -> None:
        """The prompt's context rows 0..n-1 (eager), then the first proposal (the target's prefill has set
        the anchor and the committed count)."""
        self._context(aux, torch.arange(aux.shape[0], device=aux.device))
        self.propose()

    @torch.no_grad()
    def _commit(self) -> None:
        self._context(self.t.vaux, self.t.vcols)

    @torch.no_grad()
    def _propose(self) -> None:
        d, t = self.draft, self.t
        anchor = t.vids[:1]
        cols = t.start + self.offsets  # the block at positions s..s+bs-1
        ids = torch.cat((anchor, self.masks[1:]))
        x = d.embed(ids[None]).to(d.fc.weight.dtype)
        cos, sin = d.rope(cols[None], x.dtype)
        seen = (self.cols < t.start + self.bs).view(1, 1, 1, -1).expand(1, 1, self.bs, -1)
        for layer, keys, values in zip(d.layers, self.keys, self.values, strict=True):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            k, v = attn.keys_values(h)
            keys.index_copy_(2, cols, apply_rope(k, cos, sin).to(keys.dtype))
            values.index_copy_(2, cols, v.to(values.dtype))
            q = apply_rope(attn.queries(h), cos, sin)
            x = x + attn.attend(q, keys, values, seen)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = d.norm(x)
        n = self.n
        if self.is_dspark:
            prop = dspark.block_proposal(d, hidden, anchor, confidence_threshold=self.confidence_threshold)
            self.tokens.copy_(prop.tokens[0])
            if prop.confidence is not None:
                self.confidence.copy_(prop.confidence[0])
            t.ndrafts.copy_(prop.lengths[0].clamp_max(n))
        else:
            self.tokens[1:].copy_(dflash.block_drafts(d, hidden)[0])
            t.ndrafts.fill_(n)
        drafts = self.tokens if self.is_dspark else self.tokens[1:]
        t.vids[1 : 1 + n].copy_(drafts[:n])
