"""No device->host synchronisation after the forward (issue 5): the server's post-forward path
(features -> encode_fields_on_device -> the copy step) never makes the GPU worker wait.

Two proofs, both on CPU:
1. The whole post-forward path runs on `meta` tensors for every algorithm and every encoding the
   server offers. A meta tensor has no data: `.item()`, `.tolist()`, `bool()`, `nonzero`, a
   data-dependent dtype or shape, a copy to the host, or a CPU tensor mixed in (an implicit
   host-to-device copy on a GPU) all raise. `HostSyncGuard` also refuses `torch.tensor(...)` from
   host data (a synchronous copy to a GPU).
2. The real scheduler serves every algorithm and encoding with a `HostSyncGuard` armed on each of
   its two threads: the forward stage (all but the target's own forward; on a GPU the request copies
   are non-blocking from pinned memory) and the post stage (all but the designated copy step,
   `_to_host`); the guard records sync-making aten ops (`_local_scalar_dense`, `nonzero`, ...),
   Python-level reads (`item`, `tolist`, `__bool__`, `cpu`, `numpy`) and `torch.cuda` syncs.
   Every answer equals the eager encode bit for bit. Negative controls show the guard and the
   meta run catch each kind of sync, so these tests cannot pass with a sync left in the path.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import threading
import traceback

import pytest
import torch
from test_backends import inputs, mapping
from test_packing import packed_inputs
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from draftfeed.client.encodings import get_encoding
from draftfeed.client.errors import InvalidArgument
from draftfeed.client.payload import decode_fields, encode_fields, encode_fields_on_device
from draftfeed.server.scheduler import BatchScheduler
from draftfeed.server.sessions import SessionTable
from draftfeed.target.algorithms.dflash import DFlashFeatures
from draftfeed.target.algorithms.dspark import DSparkFeatures
from draftfeed.target.algorithms.eagle3 import Eagle3Features
from draftfeed.target.backends import forward_for
from draftfeed.target.capture import Captured, discover
from draftfeed.target.features import TokenBatch, VocabMapping

aten = torch.ops.aten
HAS_ZSTD = importlib.util.find_spec("zstandard") is not None

# aten ops that read device data on the host, or whose output shape depends on the data
SYNC_OPS = {
    aten._local_scalar_dense,  # item(), bool(), int(), float()
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.repeat_interleave,
    aten.lift_fresh,  # torch.tensor(python data): a synchronous host-to-device copy on a GPU
}
PY_SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.tensor,
    torch.as_tensor,
    torch.Tensor.new_tensor,
}


_ACTIVE: dict[threading.Thread, HostSyncGuard] = {}  # the guard of each thread inside one
_PATCHED: list = []
_SPIES_LOCK = threading.Lock()


def _install_spies() -> None:
    for owner, name in (
        (torch.cuda, "synchronize"),
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Stream, "synchronize"),
    ):
        original = getattr(owner, name)
        _PATCHED.append((owner, name, original))

        def spy(*a, _original=original, _name=name, **k):
            guard = _ACTIVE.get(threading.current_thread())
            if guard is not None and guard.armed:
                guard.record(f"torch.cuda {_name}")
            return _original(*a, **k)

        setattr(owner, name, spy)


class HostSyncGuard:
    """Records every host synchronisation made on this thread while `armed`."""

    def __init__(self, armed: bool = True):
        self.armed = armed
        self.found: list[str] = []
        guard = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if guard.armed:
                    pkt = func.overloadpacket
                    if pkt in SYNC_OPS:
                        guard.record(f"aten.{pkt.__name__}")
                    elif pkt in (aten._to_copy, aten.copy_) and _crosses_devices(func, args, kwargs):
                        guard.record(f"aten.{pkt.__name__} across devices")
                    elif pkt is aten.index and any(i is not None and i.dtype == torch.bool for i in args[1]):
                        guard.record("boolean-mask indexing")
                return func(*args, **kwargs)

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if guard.armed and func in PY_SYNCS:
                    guard.record(getattr(func, "__qualname__", str(func)))
                return func(*args, **(kwargs or {}))

        self._modes = (Function(), Dispatch())

    def record(self, what: str) -> None:
        here = [
            f for f in traceback.extract_stack()[:-2] if "draftfeed" in f.filename or "/work/" in f.filename
        ]
        where = f"{here[-1].filename.rsplit('/', 1)[-1]}:{here[-1].lineno}" if here else "?"
        self.armed = False  # no recursion while formatting
        self.found.append(f"{what} at {where}")
        self.armed = True

    def __enter__(self):
        with _SPIES_LOCK:  # torch.cuda's sync calls are patched once, for every thread with a guard
            if not _ACTIVE:
                _install_spies()
            _ACTIVE[threading.current_thread()] = self
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):  # modes are per thread
            mode.__exit__(*exc)
        with _SPIES_LOCK:
            del _ACTIVE[threading.current_thread()]
            if not _ACTIVE:
                for owner, name, original in reversed(_PATCHED):
                    setattr(owner, name, original)
                _PATCHED.clear()

    def disarmed(self, fn):
        def call(*a, **k):
            was, self.armed = self.armed, False
            try:
                return fn(*a, **k)
            finally:
                self.armed = was

        return call


def _crosses_devices(func, args, kwargs) -> bool:
    """A copy between devices that makes the host wait: any but a non-blocking one from pinned memory."""
    if func.overloadpacket is aten.copy_:
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor) or src.device == dst.device:
            return False
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return not (non_blocking and src.device.type == "cpu" and src.is_pinned())
    src = args[0]
    dst = kwargs.get("device")
    if not isinstance(src, torch.Tensor) or dst is None or torch.device(dst) == src.device:
        return False
    return not (kwargs.get("non_blocking", False) and src.device.type == "cpu" and src.is_pinned())


# ---- sessions: every algorithm, every encoding the server offers for each kind ----

EAGLE3_ENCODINGS = [
    {},
    {"hidden": "fp8", "probs": "bf16", "mask": "bits", "ids": "narrow"},
    {"hidden": "bf16", "probs": "topk:8", "mask": "bits", "ids": "narrow"},
    {"hidden": "fp8", "final": "bf16", "probs": "latent", "mask": "bits", "ids": "narrow"},
    {"hidden": "bf16", "final": "fp8", "probs": "latent", "mask": "raw", "ids": "raw"},
]
if HAS_ZSTD:
    EAGLE3_ENCODINGS += [
        {"hidden": "zstd", "probs": "zstd:3", "mask": "bits", "ids": "narrow"},
        {"hidden": "fp8", "final": "zstd", "probs": "latent", "mask": "bits", "ids": "narrow"},
    ]
SPECS = [("eagle3", [1, 3, 4], False, enc) for enc in EAGLE3_ENCODINGS] + [
    ("dflash", [2, 6], True, {"hidden": "fp8", "ids": "narrow"}),
    ("dflash", [2, 6], True, {"hidden": "bf16", "ids": "raw"}),
    ("dspark", [-1, 2, 7], False, {"hidden": "fp8", "ids": "narrow"}),
    ("dspark", [-1, 2, 7], False, {"hidden": "zstd" if HAS_ZSTD else "bf16", "ids": "narrow"}),
]
SPEC_IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in e.items()) or 'raw'}" for a, _, _, e in SPECS]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


def _features(algorithm, layer_ids, capture_logits, encodings, num_layers, device):
    if algorithm == "eagle3":
        sel, mask = mapping(160)
        return Eagle3Features(
            layer_ids, VocabMapping(sel, mask).to(device), True, encodings.get("probs") == "latent"
        )
    if algorithm == "dflash":
        return DFlashFeatures(layer_ids, capture_logits)
    return DSparkFeatures(layer_ids, num_layers)


def _to(cap: Captured, device) -> Captured:
    return cap.map(lambda t: t.to(device))


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_post_forward_path_runs_on_meta_tensors(model, spec, packed):
    """features -> encode_fields_on_device -> the tensors to copy, with no data to read."""
    algorithm, layer_ids, capture_logits, enc = spec
    layout = discover(model)
    full = {**{"hidden": "raw", "final": "raw", "probs": "raw", "mask": "raw", "ids": "raw"}, **enc}
    features = _features(algorithm, layer_ids, capture_logits, enc, layout.num_layers, "meta")
    tb = TokenBatch(*(packed_inputs(seed=1) if packed else inputs(seed=1)))
    cap = forward_for(model, layout, tb, features.needs)
    meta_tb = tb.to("meta")
    with HostSyncGuard() as guard:
        fields = features.fields(_to(cap, "meta"), meta_tb)
        pending = encode_fields_on_device(fields, full, layout.hidden_size, vocab_size=layout.vocab_size)
        tensors = pending.device_tensors()
    assert guard.found == []
    assert tensors and all(t.device.type == "meta" for t in tensors.values())


def test_the_meta_run_and_the_guard_catch_each_kind_of_sync():
    """Negative controls: the two harnesses above are not blind."""
    ids = torch.randint(0, 160, (2, 12)).to("meta")
    narrow = get_encoding("narrow", "ids")
    with pytest.raises((RuntimeError, NotImplementedError)):  # min/max read back to pick the dtype
        narrow.encode_on_device(ids)
    narrow.encode_on_device(ids, value_range=(0, 159))  # the dtype from the vocab: fine
    with pytest.raises((RuntimeError, NotImplementedError)):  # checking on the host before the copy
        get_encoding("fp8", "hidden").encode(torch.randn(2, 3, 8).to("meta"))
    with pytest.raises(RuntimeError):  # a host tensor mixed into device work
        torch.ones(3, device="meta") * torch.tensor([1, 2, 3]).reshape(3)
    x = torch.randn(4, 8)
    for sync in (
        lambda: x.sum().item(),
        lambda: bool(x.isfinite().all()),
        lambda: x.amax().tolist(),
        lambda: x[x > 0],
        lambda: x.nonzero(),
        lambda: x.cpu(),
        lambda: torch.tensor([1, 2, 4], device=x.device),
        lambda: int(x.argmax()),
    ):
        with HostSyncGuard() as guard:
            sync()
        assert guard.found, "the guard missed a sync"
    with HostSyncGuard() as guard:  # device-only work passes
        (x * 2).softmax(-1).to(torch.bfloat16).isfinite().sum()
    assert guard.found == []


class Recorder:
    """The scheduler's forward: disarms the guard while the target runs (HF's own code is not ours)."""

    def __init__(self):
        self.guard: HostSyncGuard | None = None

    def __call__(self, model, layout, batch, needs):
        return self.guard.disarmed(forward_for)(model, layout, batch, needs)


def _guarded_scheduler(model, layout, **kw):
    """A scheduler with a guard on each stage: the forward stage armed except inside the forward,
    the post stage armed except in the designated copy step."""
    recorder = Recorder()
    sched = BatchScheduler(model, layout, forward=recorder, **kw)
    guards: list[HostSyncGuard] = []
    serve, post, to_host = sched._serve, sched._post, sched._to_host
    here = threading.local()

    def guarded_serve(works):
        with HostSyncGuard(armed=False) as guard:
            guards.append(guard)
            recorder.guard = guard
            guard.armed = True
            serve(works)

    def guarded_post(item):
        with HostSyncGuard() as guard:
            guards.append(guard)
            here.guard = guard
            post(item)

    def guarded_to_host(*a):  # the designated copy step
        return here.guard.disarmed(to_host)(*a)

    sched._serve, sched._post, sched._to_host = guarded_serve, guarded_post, guarded_to_host
    return sched, guards


def test_the_scheduler_guards_catch_a_sync_in_either_stage(model):
    """Negative control for the scheduler test below: an `.item()` after the forward (post stage, its
    own thread) or before it (forward stage) is recorded, and the answers are still right."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    for stage in ("post", "forward"):
        sched, guards = _guarded_scheduler(model, layout)
        session = table.open("dflash", [2, 6], "x")
        features = session.features

        class Syncing:
            needs = features.needs

            def fields(self, cap, tb, _features=features):
                cap.layers[2].sum().item()
                return _features.fields(cap, tb)

        if stage == "post":
            session.features = Syncing()
        else:
            forward = sched._forward

            def syncing_forward(*a, _forward=forward):
                out = _forward(*a)
                out.layers[2].sum().item()
                return out

            sched._forward = syncing_forward
        fut = sched.submit(session, TokenBatch(*inputs(seed=3)))
        fut.result(timeout=60).wait()
        sched.stop()
        found = [f for g in guards for f in g.found]
        assert any("item" in f for f in found), (stage, found)


def test_scheduler_serves_every_encoding_without_a_host_sync(model):
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    sched, guards = _guarded_scheduler(model, layout, max_forward_tokens=100_000)
    sel, mask = mapping(160)
    runs = []
    for algorithm, layer_ids, capture_logits, enc in SPECS:
        session = table.open(
            algorithm,
            layer_ids,
            algorithm,
            capture_logits=capture_logits,
            encodings=enc,
            mapping=(sel, mask) if algorithm == "eagle3" else None,
        )
        for args in (inputs(seed=3), packed_inputs(seed=4)):
            runs.append((session, args, sched.submit(session, TokenBatch(*args))))
    sched.stop(drain=True, timeout=120)
    assert guards and all(g.found == [] for g in guards), [f for g in guards for f in g.found]
    for session, args, fut in runs:
        reply = fut.result(timeout=60)
        got = decode_fields(reply.tensors, reply.meta)
        tb = TokenBatch(*args)
        cap = forward_for(model, layout, tb, session.features.needs)
        want_t, want_m = encode_fields(
            session.features.fields(cap, tb),
            session.encodings,
            layout.hidden_size,
            vocab_size=layout.vocab_size,
        )
        want = decode_fields(want_t, want_m)
        assert set(got) == set(want) and reply.meta == want_m, session.algorithm
        for k in want:  # bit for bit what an eager encode of the in-process answer gives
            assert got[k].dtype == want[k].dtype and torch.equal(
                got[k].view(-1).view(torch.uint8) if got[k].dtype.is_floating_point else got[k],
                want[k].view(-1).view(torch.uint8) if want[k].dtype.is_floating_point else want[k],
            ), (session.algorithm, session.encodings, k)


def test_nonfinite_values_fail_only_their_request_after_the_copy(model):
    """A NaN/inf in a lossy-encoded field is refused (InvalidArgument naming field, count and the
    way out) when the reply is read, not by a sync in the worker; its batch-mates are served."""
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size)
    gate, entered = threading.Event(), threading.Event()

    def forward(model_, layout_, batch, needs):
        entered.set()
        gate.wait(300)  # only bounds a test that never opens it
        cap = forward_for(model_, layout_, batch, needs)
        if batch.input_ids.shape[0] == 6:  # the three requests below, stacked in the scheduler's order
            poisoned = [r for r in range(6) if torch.equal(batch.input_ids[r].cpu(), poison[r % 2])]
            with torch.inference_mode():
                for t in cap.layers.values():
                    t[poisoned, 2, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        return cap

    sched = BatchScheduler(model, layout, max_forward_tokens=100_000, forward=forward)
    bad = table.open("dflash", [2, 6], "bad", encodings={"hidden": "fp8"})
    good = table.open("dflash", [2, 6], "good", encodings={"hidden": "fp8"})
    raw = table.open("dflash", [2, 6], "raw")  # raw passes NaN/inf through unchanged
    blocker = sched.submit(raw, TokenBatch(*inputs(seed=9, s=5)))  # holds the worker at the gate
    assert entered.wait(300)
    poison = inputs(seed=5)[0]  # `bad` and `raw` send these ids; `good` sends others
    futures = [sched.submit(s, TokenBatch(*inputs(seed=seed))) for s, seed in ((bad, 5), (good, 6), (raw, 5))]
    gate.set()
    blocker.result(timeout=60).wait()
    replies = [f.result(timeout=60) for f in futures]
    sched.stop()
    # the three ran in one forward; only `bad` fails
    with pytest.raises(InvalidArgument) as err:
        replies[0].wait()
    msg = str(err.value)
    assert "'hidden_states'" in msg and "fp8" in msg and "12 NaN/inf" in msg and "allow_nonfinite=True" in msg
    with pytest.raises(InvalidArgument):  # the same error on every read
        _ = replies[0].tensors
    assert sched.metrics.requests_failed == 1
    got = decode_fields(replies[1].tensors, replies[1].meta)["hidden_states"]
    assert got.isfinite().all()
    raw_hidden = decode_fields(replies[2].tensors, replies[2].meta)["hidden_states"]
    assert raw_hidden[:, 2].isnan().sum() == 4 and raw_hidden[:, 2].isinf().sum() == 8  # passed through


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scheduler_on_gpu_never_syncs_after_the_forward(tiny_model):
    """The same guards on a GPU, plus PyTorch's own sync detector (`set_sync_debug_mode('error')`)
    armed over both stages except inside the forward and the copy step. The request copies into the
    forward stage are non-blocking from pinned memory: no sync, and the guard lets them pass."""
    model = copy.deepcopy(tiny_model("llama")).cuda()
    layout = discover(model)
    table = SessionTable(layout.num_layers, layout.vocab_size, "cuda")

    class Detecting(Recorder):
        def __call__(self, model_, layout_, batch, needs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return super().__call__(model_, layout_, batch, needs)
            finally:
                torch.cuda.set_sync_debug_mode("error")

    recorder = Detecting()
    # the forward stage never waits for the post stage here: it could while holding `one_stage`
    sched = BatchScheduler(model, layout, forward=recorder, max_forward_tokens=100_000, max_forwarded=0)
    guards, serve, post, to_host = [], sched._serve, sched._post, sched._to_host
    here = threading.local()

    one_stage = threading.Lock()  # the sync detector's mode is process-wide: one stage at a time

    def guarded(stage, armed):
        def run(arg):
            with one_stage, HostSyncGuard(armed=armed) as guard:
                guards.append(guard)
                here.guard = guard
                if not armed:  # the forward stage: armed from the pinned request copies on
                    recorder.guard, guard.armed = guard, True
                torch.cuda.set_sync_debug_mode("error")
                try:
                    stage(arg)
                finally:
                    torch.cuda.set_sync_debug_mode(0)

        return run

    def guarded_to_host(*a):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return here.guard.disarmed(to_host)(*a)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    sched._serve, sched._post, sched._to_host = guarded(serve, False), guarded(post, True), guarded_to_host
    sel, mask = mapping(160)
    runs = []
    for algorithm, layer_ids, capture_logits, enc in SPECS:
        session = table.open(
            algorithm, layer_ids, algorithm, capture_logits=capture_logits, encodings=enc,
            mapping=(sel, mask) if algorithm == "eagle3" else None,
        )  # fmt: skip
        for args in (inputs(seed=3), packed_inputs(seed=4)):
            runs.append(sched.submit(session, TokenBatch(*args)))
    sched.stop(drain=True, timeout=120)
    failed = [f.exception() for f in runs if f.exception() is not None]
    assert failed == [] and all(g.found == [] for g in guards), (failed, [g.found for g in guards])
    for fut in runs:
        fut.result().wait()
    assert 0 < sched.metrics.busy_fraction <= 1
