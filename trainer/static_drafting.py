"""The drafters of `measure_speedup` (evaluate.py): draft steps of fixed shape on a static draft KV cache,
entirely on the device, each one CUDA graph (`fast_decode.Graphed`; on CPU the same functions run eagerly).

Both plug into `decode_speculative` the same way (`device_side`): after the target's verify step (a
`StaticTarget`), `commit` appends the K+1 rows of the verify pass at their columns (the rows past the
accepted a + 1 are never seen and get overwritten later), and `propose` writes the next drafts into the
target's verify input `vids[1:]` and their number into its `ndrafts` (the verify accepts at most that many).

`StaticEagle3Drafter`: the EAGLE-3 chain, the arithmetic of `Eagle3DraftModel.decode` (`Eagle3ChainDrafter`).

`StaticBlockDrafter`: DFlash / DSpark blocks. In every draft layer the block's keys / values come from [C; x]
through the same projections, with the context C = hidden_norm(fc(F)) of the target features F
(`models/dflash.py`): a context row's keys and values (k_norm, RoPE at its position, v_proj) depend on that
row's features and position alone, so they are computed once, when its token is committed, and kept per
layer in a preallocated buffer at the target's column of the token. A proposal runs the block's bs rows at
columns s..s+bs-1 (s = the committed count, x_s the anchor): their keys / values are written into the same
buffer there, and the queries attend to the columns < s + bs (a mask built on the device). Columns past
s + bs (rejected drafts, an earlier prompt) are never seen; the next commit overwrites the block's columns.
This is `run_block`'s arithmetic with the context keys / values cached instead of recomputed: the proposals
are the eager `BlockDrafter`'s. DSpark's confidence early stop (the first slot below the threshold) is
computed on the device and written as `ndrafts`.
"""

from __future__ import annotations

import torch

from .fast_decode import Graphed
from .models import dflash, dspark
from .models.common import apply_rope, rope_cos_sin
from .models.eagle3 import Eagle3DraftModel

__all__ = ["StaticEagle3Drafter", "StaticBlockDrafter", "block_max_drafts"]


class StaticEagle3Drafter:
    """EAGLE-3 chain drafting on a static draft KV cache, entirely on the device: `commit` appends the rows of
    the verify pass (all K+1; the rows past the accepted a + 1 are never seen and get overwritten), `propose`
    runs the K chain steps and writes the drafts into the target's verify input. Both are CUDA graphs.

    The same arithmetic as `Eagle3DraftModel.decode` (`Eagle3ChainDrafter`), with the keys / values written
    into preallocated buffers at their positions and a mask over the buffer instead of concatenation."""

    device_side = True

    def __init__(self, draft: Eagle3DraftModel, target, graphs: bool = True):
        self.draft, self.t = draft.eval(), target
        cfg = draft.config
        attn = draft.midlayer.self_attn
        p = draft.fc.weight
        shape = (1, attn.num_kv_heads, target.max_len, attn.head_dim)
        self.keys = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.values = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.last_h = torch.zeros(1, 1, cfg.hidden_size, dtype=p.dtype, device=p.device)
        self.ids = draft.selected_token_ids()
        self.cols = torch.arange(target.max_len, device=p.device)
        self.k = target.k
        self.commit = Graphed(self._commit, p.device, graphs, "EAGLE-3 commit").capture()
        self.propose = Graphed(self._propose, p.device, graphs, "EAGLE-3 chain").capture()
        self.graphed = self.commit.graph is not None and self.propose.graph is not None

    def _rows(self, ids: torch.Tensor, g: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rows (g[:, i], embed(ids[i])) at positions pos [m]; returns the raw layer output h [1,m,H]."""
        d = self.draft
        layer, attn = d.midlayer, d.midlayer.self_attn
        cos, sin = rope_cos_sin(d.inv_freq, pos[None], g.dtype)
        emb = d.embed_tokens(ids[None]).to(g.dtype)
        x = torch.cat((layer.input_layernorm(emb), layer.hidden_norm(g)), dim=-1)
        m = x.shape[1]
        q = attn.q_proj(x).view(1, m, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, m, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, m, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.keys.index_copy_(2, pos, k.to(self.keys.dtype))
        self.values.index_copy_(2, pos, v.to(self.values.dtype))
        groups = attn.num_heads // attn.num_kv_heads
        keys, values = self.keys, self.values
        if groups > 1:
            keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        allowed = self.cols[None, :] <= pos[:, None]
        scores = torch.matmul(q, keys.transpose(-1, -2)) * attn.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(1, m, attn.num_heads * attn.head_dim)
        h = g + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.no_grad()
    def prefill(self, aux: torch.Tensor, next_ids: torch.Tensor) -> None:
        """The prompt's rows 0..n-1 (eager), then the first proposal."""
        d = self.draft
        n = aux.shape[0]
        g = d.project_hidden_states(aux[None])
        h = self._rows(next_ids.to(g.device), g, torch.arange(n, device=g.device))
        self.last_h.copy_(h[:, -1:])
        self.propose()

    def _commit(self) -> None:
        t, d = self.t, self.draft
        h = self._rows(t.vpred, d.project_hidden_states(t.vaux[None]), t.vcols)
        self.last_h.copy_(h.index_select(1, t.accept.view(1)))

    def _propose(self) -> None:
        d, t = self.draft, self.t
        h = self.last_h
        t.ndrafts.fill_(self.k)
        for j in range(self.k):
            tok = self.ids.gather(0, d.compute_logits(h)[0, -1].argmax().view(1))  # no host sync
            t.vids[1 + j : 2 + j].copy_(tok)
            if j < self.k - 1:
                h = self._rows(tok, d.next_input(h), (t.start + j).view(1))


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
