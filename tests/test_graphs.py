"""Unpadded forwards without a host sync (target/causal_mask.py) and CUDA graphs of the target
forward (server/graphs.py).

CPU: a batch the scheduler found unpadded on the host runs with `attention_mask=None` and gives
bit for bit the answer of the all-ones mask, for every family (sdpa and eager attention, a sliding
window, a mixture of experts), with no host sync left in the whole forward; the skip is confined to
its thread and to the plain causal mask. GPU: replayed graphs give bit for bit the eager forward's
captures for unpadded, padded and packed batches of new inputs; a forward that cannot be captured
runs eagerly and stays right; a server with graphs answers like one without.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_backends import inputs, mapping
from test_host_syncs import HostSyncGuard
from test_packing import packed_inputs

from conftest import FAMILIES
from draftfeed.target.backends import forward_for
from draftfeed.target.capture import discover
from draftfeed.target.causal_mask import no_padding
from draftfeed.target.features import Needs, TokenBatch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# syncs a family's own forward makes, whatever the mask: Gemma3's multimodal wrapper zeroes image
# tokens with a boolean-mask assignment (`llm_input_ids[special_image_mask] = 0`)
OWN_SYNCS = {"gemma3": ("aten.lift_fresh",)}


def _unpadded(seed=0, b=2, s=12):
    ids, attn, loss = inputs(seed=seed, b=b, s=s)
    return ids, torch.ones_like(attn), loss


def _needs(layout) -> Needs:
    n = layout.num_layers
    return Needs(frozenset({0, n // 2, n - 1}), first_input=True, final=True)


def _assert_same(got, want):
    assert set(got.layers) == set(want.layers)
    for i in want.layers:
        assert torch.equal(got.layers[i], want.layers[i]), f"layer {i}"
    for name in ("first_input", "final", "logits"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_forward_equals_the_all_ones_mask_without_a_host_sync(tiny_model, family):
    model = tiny_model(family)
    layout = discover(model)
    needs = _needs(layout)
    ids, ones, loss = _unpadded(seed=3, s=12)  # gemma3's sliding window (6) is shorter than S
    want = forward_for(model, layout, TokenBatch(ids, ones, loss), needs)
    with HostSyncGuard() as guard:
        got = forward_for(model, layout, TokenBatch(ids, None, loss), needs)
    _assert_same(got, want)
    own = [f for f in guard.found if not f.startswith(tuple(OWN_SYNCS.get(family, ())))]
    assert own == [], own


def test_the_all_ones_mask_alone_makes_a_host_sync_and_no_padding_skips_it(tiny_model):
    """Negative control: HF reads an all-ones mask on the device (a sync per forward on a GPU);
    `no_padding` answers the plain causal mask build instead, and counts it."""
    model = tiny_model("llama")
    layout = discover(model)
    ids, ones, loss = _unpadded()
    with HostSyncGuard() as guard:
        forward_for(model, layout, TokenBatch(ids, ones, loss), _needs(layout))
    assert guard.found, "HF's sdpa mask check should read the mask"
    with no_padding() as skipped:
        forward_for(model, layout, TokenBatch(ids, None, loss), _needs(layout))
        assert skipped() == 1  # one mask build for the model, answered with sdpa's is_causal


def test_no_padding_is_confined_to_its_thread_and_to_the_plain_causal_mask(tiny_model):
    """Inside `no_padding` on one thread, a padded forward on another thread keeps its padding,
    and a packed batch (a prepared block-causal mask) is untouched on the same thread."""
    model = tiny_model("llama")
    layout = discover(model)
    needs = _needs(layout)
    padded = TokenBatch(*inputs(seed=5, b=2, s=12))
    want = forward_for(model, layout, padded, needs)
    packed = TokenBatch(*packed_inputs(seed=4))
    want_packed = forward_for(model, layout, packed, needs)
    got = {}
    with no_padding() as skipped:
        t = threading.Thread(target=lambda: got.update(padded=forward_for(model, layout, padded, needs)))
        t.start()
        t.join()
        got["packed"] = forward_for(model, layout, packed, needs)
        assert skipped() == 0
    _assert_same(got["padded"], want)
    _assert_same(got["packed"], want_packed)


def test_the_scheduler_marks_only_unpadded_batches(tiny_model):
    """Requests whose mask is all ones reach the forward with `attention_mask=None`; a batch with
    one padded request keeps the stacked mask; every answer equals the in-process forward."""
    from draftfeed.server.scheduler import BatchScheduler
    from draftfeed.server.sessions import SessionTable

    model = tiny_model("llama")
    layout = discover(model)
    seen = []

    def recording(model_, layout_, tb, needs):
        seen.append((tb.input_ids.shape[0], tb.attention_mask is None))
        return forward_for(model_, layout_, tb, needs)

    gate = threading.Event()

    def gated(*a):
        gate.wait(30)
        return recording(*a)

    table = SessionTable(layout.num_layers, layout.vocab_size)
    one, two = table.open("dflash", [1, 2], "one"), table.open("dflash", [1, 2], "two")
    sched = BatchScheduler(model, layout, max_forward_tokens=10_000, forward=gated)
    first = sched.submit(one, TokenBatch(*_unpadded(seed=1)))  # alone: the worker waits at the gate
    threading.Event().wait(0.2)
    rest = [
        sched.submit(one, TokenBatch(*_unpadded(seed=2))),
        sched.submit(two, TokenBatch(*_unpadded(seed=3))),
    ]
    gate.set()
    for f in [first, *rest]:
        f.result(timeout=60).wait()
    sched._forward = recording
    mixed = [
        sched.submit(one, TokenBatch(*_unpadded(seed=4))),
        sched.submit(two, TokenBatch(*inputs(seed=5, b=2, s=12))),
    ]
    for f in mixed:
        f.result(timeout=60).wait()
    sched.stop()
    assert seen[0] == (2, True) and seen[1] == (4, True), seen  # the two queued ones ran together
    assert seen[2:] in ([(4, False)], [(2, True), (2, False)]), seen  # together, or each as it came


def test_metrics_show_how_forwards_ran_when_the_server_has_graphs(tiny_model):
    """/metrics reports the graph counters of a server whose forward is a GraphedForward (on CPU every
    forward runs eagerly: replays 0, eager counted); a server without graphs shows none of them."""
    import urllib.request

    from draftfeed.client.remote import RemoteDFlashTargetModel
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig
    from draftfeed.server.graphs import GraphedForward

    model = tiny_model("llama")
    server = TargetServer(ServeConfig(port=0, admin_port=0), model=model)
    assert server.graphs is None  # CPU: no graphs by default
    server.graphs = server.scheduler._forward = GraphedForward()
    server.start()
    try:
        with RemoteDFlashTargetModel.from_urls([server.url]) as job:
            for seed in (1, 2, 3):
                job.generate_batch(*_unpadded(seed=seed))
        text = urllib.request.urlopen(f"{server.admin.url}/metrics", timeout=10).read().decode()
    finally:
        server.stop(grace=1)
    assert server.graphs.eager == 3 and server.graphs.replays == 0
    assert "draftfeed_cuda_graph_replays_total 0" in text and "draftfeed_cuda_graphs 0" in text
    assert "draftfeed_cuda_graph_failures_total 0" in text


# -- CUDA graphs (GPU) -----------------------------------------------------------------------------


@pytest.fixture
def cuda_llama(tiny_model):
    """(model, layout, needs) of the tiny llama on the GPU, fp32."""
    model = copy.deepcopy(tiny_model("llama")).cuda()
    layout = discover(model)
    return model, layout, _needs(layout)


def _cases(layout, device):
    """(name, TokenBatch) cases of three kinds, two of each with different tokens."""
    out = []
    for seed in (11, 12, 13):
        out.append(("unpadded", TokenBatch(*_unpadded(seed=seed)).to(device)))
        out[-1][1].attention_mask = None  # what the scheduler hands the forward for unpadded rows
        out.append(("padded", TokenBatch(*inputs(seed=seed, b=2, s=12)).to(device)))
        out.append(("packed", TokenBatch(*packed_inputs(seed=seed)).to(device)))
    return out


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "gemma3"])
def test_replayed_graphs_equal_the_eager_forward(tiny_model, family, dtype):
    """Every family answers like the eager forward; llama and qwen3 run from graphs. (A MoE's routing
    or Gemma3's image-token masking may sync inside the forward: those shapes run eagerly.)"""
    from draftfeed.server.graphs import GraphedForward

    model = copy.deepcopy(tiny_model(family)).to("cuda", dtype)
    layout = discover(model)
    needs = _needs(layout)
    graphed = GraphedForward()
    for name, tb in _cases(layout, "cuda"):  # each kind: eager, captured, then replayed
        got = graphed(model, layout, tb, needs)
        want = forward_for(model, layout, tb, needs)
        torch.cuda.synchronize()
        try:
            _assert_same(got, want)
        except AssertionError as err:
            raise AssertionError(f"{family} {name}: {err}") from None
    print(
        f"{family} {dtype}: captures {graphed.captures}, failed {graphed.failed}, replays {graphed.replays}"
    )
    assert graphed.captures + graphed.failed == 3
    assert graphed.replays == 2 * graphed.captures and graphed.eager == 9 - graphed.replays
    if family in ("llama", "qwen3"):
        assert graphed.captures == 3


@pytest.mark.gpu
@gpu
def test_a_graph_of_a_latent_sessions_forward_keeps_no_logits(cuda_llama):
    """`top1` alone (a latent EAGLE-3 session): the graph's output is the [B,S] argmax, the same as the eager
    forward's logits give, and no [B,S,V] logits buffer (nor a per-replay copy of one)."""
    from draftfeed.server.graphs import GraphedForward

    model, layout, _ = cuda_llama
    top1 = Needs(frozenset({0, layout.num_layers - 1}), final=True, top1=True)
    with_logits = Needs(frozenset({0, layout.num_layers - 1}), final=True, logits=True)
    graphed = GraphedForward()
    for seed in (1, 2, 3):  # eager, captured, replayed
        tb = TokenBatch(*_unpadded(seed=seed)).to("cuda")
        got = graphed(model, layout, tb, top1)
        want = forward_for(model, layout, tb, with_logits)
        assert got.logits is None and torch.equal(got.top1, want.logits.argmax(-1))
    (graph,) = [g for g in graphed._graphs.values() if g]
    # the capture replays once, then the third call: 2 replays of the one graph
    assert graph.out.logits is None and graph.out.top1 is not None
    assert graphed.captures == 1 and graphed.replays == 2


@pytest.mark.gpu
@gpu
def test_a_forward_that_cannot_be_captured_runs_eagerly(cuda_llama):
    from draftfeed.server.graphs import GraphedForward

    model, layout, needs = cuda_llama
    syncs = []
    handle = layout.layers[0].register_forward_hook(lambda _m, _a, out: syncs.append(out[0].sum().item()))
    try:
        graphed = GraphedForward()
        for _name, tb in _cases(layout, "cuda")[::3]:  # unpadded only
            got = graphed(model, layout, tb, needs)
            _assert_same(got, forward_for(model, layout, tb, needs))
    finally:
        handle.remove()
    assert graphed.failed == 1 and graphed.captures == 0 and graphed.eager == 3
    tb = _cases(layout, "cuda")[0][1]  # the device is still usable, and graphs work without the sync
    for _ in range(3):
        got = GraphedForward()(model, layout, tb, needs)
    _assert_same(got, forward_for(model, layout, tb, needs))


@pytest.mark.gpu
@gpu
def test_graphs_stay_within_their_shape_and_byte_bounds(cuda_llama):
    from draftfeed.server.graphs import GraphedForward

    model, layout, needs = cuda_llama
    cases = _cases(layout, "cuda")
    one_shape = GraphedForward(max_graphs=1)
    no_bytes = GraphedForward(max_graph_bytes=1)
    for _name, tb in cases:
        want = forward_for(model, layout, tb, needs)
        for graphed in (one_shape, no_bytes):
            _assert_same(graphed(model, layout, tb, needs), want)
    assert one_shape.captures == 1 and one_shape.replays == 2 and one_shape.eager == 7
    assert no_bytes.captures == 0 and no_bytes.eager == 9 and no_bytes.graph_bytes == 0
    assert one_shape.graph_bytes > 0


@pytest.mark.gpu
@gpu
def test_a_server_with_graphs_answers_like_one_without(cuda_llama):
    from draftfeed.client.remote import RemoteEagle3TargetModel
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig

    model = cuda_llama[0]
    answers = {}
    for graphs in (True, False):
        server = TargetServer(ServeConfig(port=0, cuda_graphs=graphs), model=model).start()
        try:
            remote = RemoteEagle3TargetModel(server.url)
            remote.set_vocab_mapping(*mapping(model.config.vocab_size))
            got = [remote.generate_batch(*_unpadded(seed=s)) for s in (1, 2, 3, 4)]
            got += [remote.generate_batch(*inputs(seed=s, b=2, s=12)) for s in (1, 2, 3)]
            remote.close()
            if graphs:
                from draftfeed.server.admin import prometheus_text

                assert server.graphs.replays >= 4 and server.graphs.failed == 0
                # each forward's time is its GPU time, recorded once it has run: inside the busy time
                busy = server.metrics.busy_s  # accounts the finished CUDA spans
                assert server.metrics.forwards >= 7 and 0 < server.metrics.forward_s <= busy + 1e-6
                text = prometheus_text(server)
                assert f"draftfeed_cuda_graph_replays_total {server.graphs.replays}" in text
                assert f"draftfeed_cuda_graphs {server.graphs.captures}" in text
            else:
                assert server.graphs is None
            answers[graphs] = got
        finally:
            server.stop(grace=1)
    for a, b in zip(answers[True], answers[False], strict=True):
        a, b = a.tensors(), b.tensors()
        assert set(a) == set(b)
        for k in b:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
@gpu
def test_a_cuda_client_decodes_off_the_trainers_stream_and_gets_what_a_cpu_client_gets(cuda_llama):
    """A CUDA client reads frames into page-locked buffers and decodes them on its own stream while the
    trainer's stream is busy: its batches equal those it decodes on an idle GPU (and a CPU client's, the
    rebuilt fp32 probabilities to rounding), and stay intact while the trainer's stream that reads them
    runs behind the client's next decodes (record_stream)."""
    from draftfeed.client.remote import RemoteEagle3TargetModel
    from draftfeed.server.app import TargetServer
    from draftfeed.server.config import ServeConfig

    model = cuda_llama[0]
    server = TargetServer(ServeConfig(port=0), model=model).start()
    try:
        cpu = RemoteEagle3TargetModel(server.url)
        gpu_client = RemoteEagle3TargetModel(server.url, device="cuda")
        for c in (cpu, gpu_client):
            c.set_vocab_mapping(*mapping(model.config.vocab_size))
        assert gpu_client.servers[0].data is not None and gpu_client.servers[0].data.pin_memory
        assert cpu.servers[0].data is not None and not cpu.servers[0].data.pin_memory
        batches = [inputs(seed=s, b=2, s=12) for s in range(8)]
        want = [gpu_client.generate_batch(*b) for b in batches]
        for w, c in zip(want, (cpu.generate_batch(*b) for b in batches), strict=True):
            for k, v in c.tensors().items():
                if k == "target_probs":
                    torch.testing.assert_close(w.target_probs.cpu(), v, rtol=0, atol=1e-5)
                else:
                    assert torch.equal(w.tensors()[k].cpu(), v), k
        want = [{k: v.double().sum() for k, v in w.tensors().items()} for w in want]
        busy = torch.randn(2048, 2048, device="cuda")
        sums = []
        futures = [gpu_client.generate_batch_async(*b) for b in batches[:2]]
        for i in range(len(batches)):
            for _ in range(20):  # the trainer's stream runs well behind the host
                busy = torch.tanh(busy @ busy)
            got = futures[i].result(timeout=60)
            if i + 2 < len(batches):
                futures.append(gpu_client.generate_batch_async(*batches[i + 2]))
            sums.append({k: v.double().sum() for k, v in got.tensors().items()})  # queued behind the matmuls
            del got  # freed while the kernels that read it are still queued
        torch.cuda.synchronize()
        for s, w in zip(sums, want, strict=True):
            assert set(s) == set(w)
            for k, v in w.items():
                assert torch.equal(s[k], v), k
        cpu.close()
        gpu_client.close()
    finally:
        server.stop(grace=1)
