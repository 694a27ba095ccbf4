"""The target forward through CUDA graphs, for batch shapes that repeat.

A forward of a small target is launch-bound: SmolLM2-135M issues about 30 kernels per decoder
layer, 30 layers, and Python issues them more slowly than an H100 runs them at S=1024. Training
jobs send the same shapes over and over (B rows of S tokens), so the worker captures the forward
of a shape the second time it sees it and from then on replays it: one launch instead of hundreds.

What a graph is keyed by: the shapes and dtypes of the forward's inputs (input_ids, the mask or the
per-layer-type masks of packed rows, position_ids), whether the rows are unpadded, and the captures
asked for (the union of the batched sessions' layers). Inputs are copied into the graph's static
buffers before each replay; the captured outputs are copied out right after it on the same stream,
so the post stage may read them while the next replay runs. All graphs share one memory pool (they
run one at a time on one stream, and their outputs are never read after the next replay).

Memory: a graph keeps its static inputs and outputs (for a raw-probs EAGLE-3 session the [B,S,V] logits:
4.2 GB for a 1B-class target at 4x4096 tokens in bf16; for a latent session, the default, their [B,S]
argmax instead, which is also all a replay copies out), and its intermediates live in the shared pool,
bounded by the largest graph. Once the static bytes of all graphs reach `max_graph_bytes` (default an eighth
of the device's memory), or `max_graphs` shapes are held, new shapes run eagerly.

A forward that cannot be captured (a host sync inside the model, an op CUDA graphs refuse) runs
eagerly for that key from then on, with one warning; so does an unpadded batch whose mask HF would
not let sdpa skip under capture (the graph's attention would differ from the eager forward's).
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from draftfeed.target.backends import forward_inputs, run_needs
from draftfeed.target.capture import Captured, TargetLayout
from draftfeed.target.causal_mask import no_padding
from draftfeed.target.features import Needs, TokenBatch

__all__ = ["GraphedForward"]

log = logging.getLogger("draftfeed.graphs")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static buffers, in `_flat` order
    out: Captured  # static outputs


def _flat(ids, mask, pos) -> list[torch.Tensor]:
    masks = [mask[k] for k in sorted(mask)] if isinstance(mask, dict) else [mask]
    return [ids, *masks, pos]


def _unflat(flat: list[torch.Tensor], mask) -> tuple:
    ids, *masks, pos = flat
    return ids, (dict(zip(sorted(mask), masks, strict=True)) if isinstance(mask, dict) else masks[0]), pos


def _signature(flat: list) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype) for t in flat)


class GraphedForward:
    """A drop-in for `forward_for` on a CUDA device (the scheduler's `forward`): eager the first
    time a key is seen, captured the second, replayed after. CPU batches run eagerly.

    max_graphs and max_graph_bytes (static inputs and outputs of all graphs; default an eighth of the
    device's memory) bound what graphs hold; shapes beyond them run eagerly. Counters: `captures`,
    `replays`, `eager`, `failed` (keys that could not be captured), `graph_bytes`.
    """

    def __init__(self, *, capture_after: int = 1, max_graphs: int = 32, max_graph_bytes: int | None = None):
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.max_graph_bytes = max_graph_bytes
        self.graph_bytes = 0
        self._told_full = False
        self._graphs: dict[tuple, _Graph | None] = {}  # None: this key runs eagerly for good
        self._seen: Counter = Counter()
        self._pool = None
        self.replays = self.eager = 0

    @property
    def captures(self) -> int:
        return sum(g is not None for g in self._graphs.values())

    @property
    def failed(self) -> int:
        """Shapes that could not be captured (they run eagerly)."""
        return sum(g is None for g in self._graphs.values())

    def __call__(self, model: nn.Module, layout: TargetLayout, tb: TokenBatch, needs: Needs) -> Captured:
        with torch.inference_mode():
            unpadded = not tb.packed and tb.attention_mask is None
            ids, mask, pos = forward_inputs(model, tb)
            flat = _flat(ids, mask, pos)
            key = (_signature(flat), unpadded, needs)
            graph = self._graphs.get(key, False)
            if graph is False and ids.is_cuda:
                self._seen[key] += 1
                if self._seen[key] > self.capture_after and self._room(flat, ids.device):
                    graph = self._graphs[key] = self._capture(model, layout, flat, mask, needs, unpadded)
            if not graph:
                self.eager += 1
                with no_padding() if unpadded else nullcontext():
                    return run_needs(model, layout, ids, mask, pos, needs)
            for static, t in zip(graph.inputs, flat, strict=True):
                if static is not None:
                    static.copy_(t)
            graph.graph.replay()
            self.replays += 1
            return graph.out.map(torch.clone)

    def _room(self, flat: list, device: torch.device) -> bool:
        """Whether one more graph fits the bounds (its outputs are estimated no smaller than its inputs)."""
        if self.max_graph_bytes is None:
            self.max_graph_bytes = torch.cuda.get_device_properties(device).total_memory // 8
        need = sum(t.nbytes for t in flat if t is not None)
        fits = len(self._graphs) < self.max_graphs and self.graph_bytes + need <= self.max_graph_bytes
        if not fits and not self._told_full:
            self._told_full = True
            log.warning(
                "CUDA graphs hold %d shapes, %.1f GB (limits %d shapes, %.1f GB): new shapes run eagerly",
                len(self._graphs), self.graph_bytes / 1e9, self.max_graphs, self.max_graph_bytes / 1e9,
            )  # fmt: skip
        return fits

    def _record(self, graph: torch.cuda.CUDAGraph, device: torch.device, fn) -> Captured:
        """Capture `fn` on a side stream into the shared pool. Unlike `torch.cuda.graph`, without a device
        sync and without emptying the device and pinned-host caches: the worker keeps running, and the
        post stage keeps its pinned buffers."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        return out

    def _capture(self, model, layout, flat, mask, needs: Needs, unpadded: bool) -> _Graph | None:
        static = [None if t is None else t.clone() for t in flat]
        graph = torch.cuda.CUDAGraph()
        b, s = flat[0].shape
        device = flat[0].device
        try:
            with no_padding() if unpadded else nullcontext() as skipped:
                out = self._record(
                    graph, device, lambda: run_needs(model, layout, *_unflat(static, mask), needs)
                )
                if unpadded and skipped() == 0:
                    raise RuntimeError(
                        "HF built an explicit attention mask under capture, not sdpa's is_causal"
                    )
        except Exception as err:  # noqa: BLE001 - this shape runs eagerly instead
            log.warning(
                "CUDA graph capture of a %dx%d forward failed (%s); this shape runs eagerly", b, s, err
            )
            return None
        self._pool = graph.pool()
        self.graph_bytes += sum(t.nbytes for t in static if t is not None) + sum(
            t.nbytes for t in out.tensors()
        )
        log.info("captured a CUDA graph of the %dx%d forward (%d graphs)", b, s, self.captures + 1)
        return _Graph(graph, static, out)
