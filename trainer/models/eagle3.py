"""The EAGLE-3 draft model and its training-time-test (TTT) unrolled forward. Math only.

Architecture (docs/architecture.md section 1): frozen `embed_tokens` [V,H] copied from the target;
`fc` (3H -> H) over the target's aux hidden states; one decoder layer `midlayer` whose attention
reads cat(input_layernorm(emb), hidden_norm(g)) [2H] and whose residual is the un-normed g; final
`norm`; `lm_head` (H -> Vd). Buffers `d2t` int64 [Vd] (target id = i + d2t[i]) and `t2d` bool [V].
State-dict keys are the export names SGLang / vLLM load (`fc.weight`, `midlayer.self_attn.q_proj.weight`, ...).

TTT unroll, K steps: g_0 = fc(A); at step k the layer runs at positions t+k on the ids shifted k
times, attending to the step-0 keys under the causal + padding (+ per-document) mask plus, at its own
slot t, the keys of steps 1..k (one softmax over S+k columns); logits_k = lm_head(norm(h));
g_{k+1} = h (or norm(h) with `norm_output`, EAGLE-3.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from draftfeed.client.packing import DocumentSpans, attention_allowed, right_padded
from draftfeed.client.supervision import shift_left

from .common import (
    ACTIVATIONS,
    RMSNorm,
    apply_rope,
    document_ids,
    gated_activation,
    rope_cos_sin,
    rope_inv_freq,
    text_config_dict,
    tokens_left_in_document,
)
from .sink_attention import sink_attention

__all__ = [
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "RMSNorm",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "shift_left",
    "document_ids",
    "tokens_left_in_document",
    "attention_allowed",
]


@dataclass
class Eagle3DraftConfig:
    """Dimensions of an EAGLE-3 draft; `from_target_config` copies them from the target's text config.

    `rope_scaling` is None (default RoPE) or a dict with `rope_type` "linear" (`factor`) or "llama3"
    (`factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    """

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    target_hidden_size: int | None = None
    num_aux_layers: int = 3
    norm_output: bool = False
    fc_norm: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size={self.draft_vocab_size} must be in [1, vocab_size={self.vocab_size}]"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type in (None, "default"):
                self.rope_scaling = None
            elif rope_type not in ("linear", "llama3"):
                raise ValueError(
                    f"rope_scaling rope_type={rope_type!r} is not supported by the EAGLE-3 draft; "
                    "expected 'default', 'linear' or 'llama3'"
                )

    @classmethod
    def from_target_config(
        cls, config, draft_vocab_size: int | None = None, **overrides
    ) -> Eagle3DraftConfig:
        """Build from a transformers config (the text config is used when the config nests one)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        dims = text_config_dict(config)  # GPT-2's n_inner / activation_function under the usual names
        rope_theta = getattr(text, "rope_theta", None)
        rope_scaling = getattr(text, "rope_scaling", None)
        params = getattr(text, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5 layout
            rope_theta = params["rope_theta"]
            rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        values = dict(
            hidden_size=text.hidden_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            intermediate_size=int(dims["intermediate_size"]),
            vocab_size=text.vocab_size,
            draft_vocab_size=draft_vocab_size,
            head_dim=head_dim,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=10000.0 if rope_theta is None else float(rope_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            attention_bias=bool(getattr(text, "attention_bias", False)),
            max_position_embeddings=getattr(text, "max_position_embeddings", 2048),
            hidden_act=str(dims.get("hidden_act") or "silu"),
        )
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown Eagle3DraftConfig fields: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)


class Eagle3Attention(nn.Module):
    """GQA attention over the [2H] input with the TTT cached-KV pattern.

    `impl` "sdpa" (default) runs step 0 as plain (causal) `scaled_dot_product_attention`, and step k >= 1
    as the fused attention kernel over the step-0 keys whose log-normaliser is merged with the k per-slot
    scores Q_k[t].K_i[t] (`sink_attention.py`): the same softmax over S+k columns as "reference" (explicit
    scores [B,h,S,S+k]), without materialising scores, probabilities or a [B,h,S,S+k] bias.
    """

    impl = "sdpa"

    def __init__(self, cfg: Eagle3DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor | _Documents | None,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """x [B,S,2H]; `cache` holds (K_i, V_i) of earlier steps (post-RoPE, heads expanded) and gets
        this step's appended. Step 0 is causal attention under `allowed` (a [B,1,S,S] mask; "sdpa" only:
        None = plainly causal, `_Documents` = packed documents, each plainly causal); step k adds, per
        slot t, the columns Q_k[t].K_i[t] for i = 1..k to the same softmax."""
        bsz, seq_len, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = self.q_proj(x).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        cache.append((k, v))
        if self.impl == "sdpa":
            out = _ttt_sdpa(q, cache, allowed, self.head_dim**-0.5)
            return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim))
        scale = self.head_dim**-0.5
        k0, v0 = cache[0]
        scores = torch.matmul(q, k0.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        if len(cache) > 1:
            diag = torch.stack([(q * ki).sum(-1) for ki, _ in cache[1:]], dim=-1) * scale  # [B,h,S,k]
            scores = torch.cat((scores, diag), dim=-1)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :seq_len], v0)
        for i, (_, vi) in enumerate(cache[1:]):
            out = out + probs[..., seq_len + i, None] * vi
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_k: torch.Tensor | None,
        past_v: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference with a KV cache: new rows x [B,m,2H] attend to every cached row and causally to each
        other. Returns (out [B,m,H], k, v) with k/v [B,heads,m,d] of the new rows (post-RoPE, expanded)."""
        bsz, m, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        q = self.q_proj(x).view(bsz, m, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        keys = k if past_k is None else torch.cat((past_k, k), dim=2)
        values = v if past_v is None else torch.cat((past_v, v), dim=2)
        past = keys.shape[2] - m
        allowed = torch.ones(m, keys.shape[2], dtype=torch.bool, device=x.device).tril(past)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(bsz, m, self.num_heads * self.head_dim)
        return self.o_proj(out), k, v


@dataclass
class _Documents:
    """Packed rows for the TTT attention, each document plainly causal: flash's variable-length layout on CUDA
    in fp16 / bf16 (`DocumentSpans`), else the block-causal mask; each built once per batch, at first use."""

    ids: torch.Tensor  # [B,S] document ids
    _spans: DocumentSpans | None = None
    _mask: torch.Tensor | None = None

    def layout(self, q: torch.Tensor) -> DocumentSpans | torch.Tensor:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            if self._spans is None:
                self._spans = DocumentSpans(self.ids)
            return self._spans
        if self._mask is None:  # a padding segment is a document: each of its slots sees itself at least
            self._mask = attention_allowed(doc_ids=self.ids)
        return self._mask


def _ttt_sdpa(
    q: torch.Tensor, cache: list, allowed: torch.Tensor | _Documents | None, scale: float
) -> torch.Tensor:
    """Attention of TTT step k = len(cache) - 1 (see `Eagle3Attention`). `allowed` None = plainly causal
    (right-padded rows, one document each); `_Documents` = packed rows, each document plainly causal (flash's
    variable-length kernel on CUDA). Step 0 runs `scaled_dot_product_attention` (is_causal: flash); step k >= 1
    runs the step-0 keys as one fused kernel and merges the k per-slot keys by log-sum-exp (`sink_attention`)."""
    if isinstance(allowed, _Documents):
        allowed = allowed.layout(q)
        if isinstance(allowed, DocumentSpans):
            return sink_attention(q, *cache[0], cache[1:], allowed, scale)
    k0, v0 = cache[0]
    extra = len(cache) - 1
    if extra == 0 and allowed is None:
        return F.scaled_dot_product_attention(q, k0, v0, is_causal=True, scale=scale)
    if allowed is None:
        return sink_attention(q, k0, v0, cache[1:], None, scale)
    neg = torch.finfo(q.dtype).min  # not -inf: a row with no allowed key is uniform, as in "reference"
    zero = q.new_zeros(())
    # A slot with no allowed step-0 key (left padding) averages all step-0 values at step 0, and its
    # scores get no gradient, as "reference"'s masked_fill gives: its query against the step-0 keys is
    # zeroed and, at step 0, its row left unmasked (a fully masked row is special-cased by some kernels).
    # At step k >= 1 its fully masked row gets no weight next to the sinks.
    if extra == 0:
        live = allowed.any(-1, keepdim=True)  # [B,1,S,1]
        mask0 = torch.where(allowed | ~live, zero, zero + neg)
        return F.scaled_dot_product_attention(q * live.to(q.dtype), k0, v0, attn_mask=mask0, scale=scale)
    return sink_attention(q, k0, v0, cache[1:], torch.where(allowed, zero, zero + neg), scale)


class Eagle3MLP(nn.Module):
    def __init__(self, cfg: Eagle3DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hidden_act = cfg.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_activation(self.hidden_act, self.gate_proj(x), self.up_proj(x)))


class Eagle3DecoderLayer(nn.Module):
    """The draft's single layer: attention over [input_layernorm(emb), hidden_norm(g)], residual on g."""

    def __init__(self, cfg: Eagle3DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Eagle3MLP(cfg)

    def forward(self, emb, g, cos, sin, allowed, cache) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(g)), dim=-1)
        h = g + self.self_attn(x, cos, sin, allowed, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, emb, g, cos, sin, past_k, past_v):
        """The layer over new rows with a KV cache (see `Eagle3Attention.decode`): (h, k, v)."""
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(g)), dim=-1)
        attn, k, v = self.self_attn.decode(x, cos, sin, past_k, past_v)
        h = g + attn
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class Eagle3DraftModel(nn.Module):
    """EAGLE-3 draft. `forward` returns the per-step draft-vocab logits of the TTT unroll."""

    def __init__(self, cfg: Eagle3DraftConfig, embed_weight: torch.Tensor | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList(
                RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(cfg.num_aux_layers)
            )
        self.fc = nn.Linear(cfg.num_aux_layers * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < cfg.draft_vocab_size)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        self.reset_parameters()
        if embed_weight is not None:
            self.load_embeddings(embed_weight)

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every linear layer, zero biases, ones for the norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @torch.no_grad()
    def load_embeddings(self, weight: torch.Tensor) -> None:
        """Copy the target's token embedding [V,H] into the frozen `embed_tokens`."""
        expected = tuple(self.embed_tokens.weight.shape)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"embedding weight has shape {tuple(weight.shape)}, expected {expected} (vocab, hidden)"
            )
        self.embed_tokens.weight.copy_(
            weight.to(self.embed_tokens.weight.device, self.embed_tokens.weight.dtype)
        )

    @torch.no_grad()
    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Set `d2t`/`t2d` from the token map (`selected_token_ids` int64 [Vd], `selected_token_mask` bool [V])."""
        vd, v = self.config.draft_vocab_size, self.config.vocab_size
        if tuple(selected_token_ids.shape) != (vd,):
            raise ValueError(
                f"selected_token_ids has shape {tuple(selected_token_ids.shape)}, expected ({vd},)"
            )
        if tuple(selected_token_mask.shape) != (v,):
            raise ValueError(
                f"selected_token_mask has shape {tuple(selected_token_mask.shape)}, expected ({v},)"
            )
        ids = selected_token_ids.long().cpu()
        mask = selected_token_mask.bool().cpu()
        if int(mask.sum()) != vd or not bool(mask[ids].all()):
            raise ValueError("selected_token_mask must be True exactly at the selected_token_ids")
        self.d2t.copy_(ids - torch.arange(vd))
        self.t2d.copy_(mask)

    def selected_token_ids(self) -> torch.Tensor:
        """Draft index -> target id, int64 [Vd]."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def project_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """g_0 = fc(A) for the aux hidden states A [B,S,3H] (per-chunk `fc_norm` first when enabled)."""
        x = hidden_states.to(self.fc.weight.dtype)
        if self.config.fc_norm:
            x = torch.cat(
                [norm(c) for norm, c in zip(self.fc_norm, x.chunk(len(self.fc_norm), -1), strict=True)], -1
            )
        return self.fc(x)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits [B,S,Vd] of a raw layer output h."""
        return self.lm_head(self.norm(h))

    def unroll(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ttt_steps: int,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield logits_k [B,S,Vd] for k = 0..ttt_steps-1 (lets a loss consume each step as it comes).

        `input_ids` are the service's already-shifted ids (slot t holds token t+1); `attention_mask`
        is unshifted and fixed across steps. With `position_ids` / `seq_lens` the batch is packed:
        RoPE uses position_ids + k and attention is block-causal per document.
        """
        if ttt_steps < 1:
            raise ValueError(f"ttt_steps={ttt_steps} must be >= 1")
        bsz, seq_len = input_ids.shape
        if position_ids is None:
            positions = torch.arange(seq_len, device=input_ids.device).expand(bsz, seq_len)
        else:
            positions = position_ids.long()
        docs = document_ids(seq_len, position_ids, seq_lens)
        sdpa = self.midlayer.self_attn.impl == "sdpa"
        allowed: torch.Tensor | _Documents | None
        if sdpa and right_padded(attention_mask, docs):
            # plainly causal (sdpa's is_causal: flash on CUDA); packed rows each document plainly causal. Exact
            # for every real slot of a right-padded row (document): the keys before it are all real. A padding
            # slot then also sees the padding keys before it, but no real slot ever reads a padding slot (its
            # keys come after) and no loss or metric does.
            allowed = None if docs is None else _Documents(docs)
        else:
            allowed = attention_allowed(attention_mask, docs)
        g = self.project_hidden_states(hidden_states)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        ids = input_ids
        for k in range(ttt_steps):
            cos, sin = rope_cos_sin(self.inv_freq, positions + k, g.dtype)
            emb = self.embed_tokens(ids).to(g.dtype)
            h = self.midlayer(emb, g, cos, sin, allowed, cache)
            normed = self.norm(h)
            yield self.lm_head(normed)
            if k + 1 < ttt_steps:
                g = normed if self.config.norm_output else h
                ids = shift_left(ids)

    def decode(
        self,
        input_ids: torch.Tensor,
        g: torch.Tensor,
        positions: torch.Tensor,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference rows with a KV cache (chain drafting, docs/architecture.md section 1 "Inference").

        Row i gets (g[:, i], embed(input_ids[:, i])) at `positions[:, i]`: g = fc(A_t) with the token
        x_{t+1} for a committed row t, or the previous raw layer output h (no fc) with the last draft for a
        chain row. It attends to every cached row and causally to the new ones. Returns the raw layer
        output h [B,m,H] and the new rows' k/v (to append to the cache when the rows are kept).
        """
        cos, sin = rope_cos_sin(self.inv_freq, positions, g.dtype)
        emb = self.embed_tokens(input_ids).to(g.dtype)
        return self.midlayer.decode(emb, g, cos, sin, past_k, past_v)

    def next_input(self, h: torch.Tensor) -> torch.Tensor:
        """g of the next chain step from a layer output h: h, or norm(h) with `norm_output`."""
        return self.norm(h) if self.config.norm_output else h

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        ttt_steps: int,
        position_ids: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The TTT unroll's per-step logits as a list (see `unroll`)."""
        return list(self.unroll(hidden_states, input_ids, attention_mask, ttt_steps, position_ids, seq_lens))
