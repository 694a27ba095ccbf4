"""The fast DFlash / DSpark step (the full-vocab objective with its gradient written out, `vocab_objective.py`)
against the reference step (autograd over checkpointed chunks): same losses, metrics and gradients of every
trainable parameter on CPU in fp32, for plain and packed batches; and the compile switch (`compiling.py`):
`loop.compile` resolves per device, a function the compiler cannot take runs eagerly after one warning, and
(slow) the compiled kernels give the eager values."""

from __future__ import annotations

import warnings

import pytest
import torch

from draftfeed.client.batches import DFlashTargetBatch, DSparkTargetBatch
from draftfeed.trainer import compiling
from draftfeed.trainer.block_drafting import dflash_loss, dspark_loss
from draftfeed.trainer.models.dflash import DFlashConfig, DFlashDraft
from draftfeed.trainer.models.dspark import DSparkConfig, DSparkDraft

B, S, V, H = 2, 40, 97, 32
TARGET = dict(
    hidden_size=H, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=V,
    num_hidden_layers=8, model_type="llama",
)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _draft(algorithm: str, cap: float | None = None):
    torch.manual_seed(0)
    fields = dict(target_layer_ids=[1, 3, 5], num_layers=2, architecture="LlamaForCausalLM")
    if algorithm == "dflash":
        fields.pop("architecture")
        embed, head = torch.nn.Embedding(V, H), torch.nn.Linear(H, V, bias=False)
        with torch.no_grad():
            head.weight.normal_(0, 0.3)
        return DFlashDraft(DFlashConfig.from_target_config(TARGET, block_size=4, **fields), embed, head)
    cfg = DSparkConfig.from_target_config(
        TARGET, block_size=3, num_anchors=6, markov_rank=8, final_logit_softcapping=cap, **fields
    )
    draft = DSparkDraft(cfg)
    with torch.no_grad():
        draft.lm_head.weight.normal_(0, 0.3)
    return draft


def _batch(algorithm: str, packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, S), generator=g)
    loss_mask = torch.ones(B, S, dtype=torch.long)
    loss_mask[:, :5] = 0
    extra = {}
    if packed:
        extra = dict(seq_lens=torch.tensor([[15, S - 15]] * B))
    features = torch.randn(B, S, 3 * H, generator=g)
    if algorithm == "dflash":
        return DFlashTargetBatch(
            hidden_states=features, input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=loss_mask,
            **extra,
        )  # fmt: skip
    return DSparkTargetBatch(
        target_hidden_states=features, target_last_hidden_states=torch.randn(B, S, H, generator=g) * 3,
        input_ids=ids, loss_mask=loss_mask, **extra,
    )  # fmt: skip


def _step(algorithm, draft, batch, fused):
    draft.zero_grad()
    fn = dflash_loss if algorithm == "dflash" else dspark_loss
    out = fn(
        draft, batch, num_anchors=6, generator=torch.Generator().manual_seed(2), chunk_rows=7, fused=fused
    )
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("algorithm,cap", [("dflash", None), ("dspark", None), ("dspark", 4.0)])
def test_fast_block_step_matches_the_reference_step(algorithm, cap, packed):
    draft, batch = _draft(algorithm, cap), _batch(algorithm, packed)
    ref, ref_grads = _step(algorithm, draft, batch, fused=False)
    got, got_grads = _step(algorithm, draft, batch, fused=True)
    assert torch.allclose(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name in ref.parts:
        assert torch.allclose(got.parts[name], ref.parts[name], rtol=1e-5, atol=1e-6), name
    for name in ref.metrics:
        assert torch.allclose(got.metrics[name], ref.metrics[name], rtol=1e-5, atol=1e-6), name
    assert set(got_grads) == set(ref_grads) and ref_grads
    for name, g in ref_grads.items():
        assert torch.allclose(got_grads[name], g, rtol=1e-4, atol=1e-6), name


def test_compile_mode_resolves_per_device():
    assert compiling.resolve_compile("auto", "cuda:0") and not compiling.resolve_compile("auto", "cpu")
    assert compiling.resolve_compile("on", "cpu") and not compiling.resolve_compile("off", "cuda")
    with pytest.raises(ValueError, match="expected one of auto, on, off"):
        compiling.resolve_compile("yes", "cpu")


def test_a_function_the_compiler_cannot_take_runs_eagerly_after_one_warning():
    def data_dependent(x):
        if x.sum() > 0:  # a graph break: fullgraph compilation refuses it
            return x * 2
        return x

    fn = compiling.Compiled(data_dependent)
    compiling.set_compile(True)
    try:
        with pytest.warns(RuntimeWarning, match="running it eagerly"):
            assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(fn(-torch.ones(3)), -torch.ones(3))  # no second warning
    finally:
        compiling.set_compile(False)
    assert fn.failed


@pytest.mark.slow
def test_compiled_kernels_give_the_eager_values():
    """torch.compile (inductor, CPU) of the soft cross-entropy, the DSpark objective, RMSNorm, RoPE and the
    gated activation: the same losses and gradients as eager, and no kernel fell back."""
    from draftfeed.trainer import losses, vocab_objective
    from draftfeed.trainer.losses import fused_soft_cross_entropy
    from draftfeed.trainer.models import common

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 33, generator=g).requires_grad_()
    probs = torch.softmax(torch.randn(2, 6, 33, generator=g), -1)
    draft, batch = _draft("dspark", 4.0), _batch("dspark", False)
    results = []
    for on in (False, True):
        compiling.set_compile(on)
        try:
            logits.grad = None
            sce = fused_soft_cross_entropy(logits, probs)
            sce.sum().backward()
            out, grads = _step("dspark", draft, batch, fused=True)
        finally:
            compiling.set_compile(False)
        results.append((sce.detach(), logits.grad.clone(), out.loss.detach(), grads))
    (e_sce, e_grad, e_loss, e_grads), (c_sce, c_grad, c_loss, c_grads) = results
    assert torch.allclose(c_sce, e_sce, rtol=1e-5, atol=1e-6) and torch.allclose(c_grad, e_grad, atol=1e-6)
    assert torch.allclose(c_loss, e_loss, rtol=1e-5, atol=1e-6)
    for name, grad in e_grads.items():
        assert torch.allclose(c_grads[name], grad, rtol=1e-4, atol=1e-6), name
    kernels = (losses._sce_forward_kernel, losses._sce_backward_kernel)
    kernels += (vocab_objective._forward_kernel, vocab_objective._backward_kernel)
    kernels += (common._rms_forward_kernel, common._rms_backward_kernel, common._rope_kernel)
    kernels += (common._rope_backward_kernel, common._silu_mul_kernel, common._silu_mul_backward_kernel)
    assert all(k.compiled is not None and not k.failed for k in kernels)


@pytest.mark.parametrize("algorithm,cap", [("dflash", None), ("dspark", 4.0)])
def test_fast_block_step_under_bf16_autocast_matches_the_reference(algorithm, cap):
    """As on the GPU: products in bf16 under autocast (the lm_head cast once); losses equal to bf16 rounding,
    every gradient within 2% (relative norm) of the reference step's."""
    draft, batch = _draft(algorithm, cap), _batch(algorithm, True)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            draft.zero_grad()
            fn = dflash_loss if algorithm == "dflash" else dspark_loss
            out = fn(draft, batch, num_anchors=6, generator=torch.Generator().manual_seed(2), chunk_rows=7,
                     fused=fused)  # fmt: skip
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (got, got_grads) = results
    assert torch.allclose(got.loss, ref.loss, rtol=1e-3)
    for name, g in ref_grads.items():
        assert (got_grads[name] - g).norm() <= 0.02 * g.norm() + 1e-9, name
