"""Tensor parallel under torchrun: `draftfeed serve` with tp_plan="auto" on 2 CPU ranks (gloo), rank 0
serving and rank 1 following its batches; replies equal the single-process ones within fp32 reduction
order, the fingerprint and the fetched weights are the full model's. The GPU check (2 GPUs, NCCL, real
weights) is bench/tp_check.py, results in bench/results/tp_*.md."""

from __future__ import annotations

import re
import signal
import sys

import pytest
import torch
from test_backends import inputs, mapping
from test_lifecycle import Served
from test_nemo_http import Client, expected, unpack

from draftfeed.client.remote import RemoteDFlashTargetModel, RemoteDSparkTargetModel, RemoteEagle3TargetModel
from draftfeed.target.backends import HFDFlashTargetModel, HFDSparkTargetModel, HFEagle3TargetModel
from draftfeed.target.fingerprint import fingerprint


def test_uneven_shards_are_refused_before_loading():
    import transformers as tf

    from draftfeed.client.errors import InvalidArgument
    from draftfeed.server.tensor_parallel import check_shardable

    smollm2 = tf.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )
    with pytest.raises(InvalidArgument, match=r"num_attention_heads \(9\) to divide by 2"):
        check_shardable(smollm2, 2)
    check_shardable(smollm2, 3)
    check_shardable(tf.LlamaConfig(num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192), 2)


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def close(a, b, what):
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb), what
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, (what, k)
        if ta[k].is_floating_point():
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-5, msg=f"{what}.{k}")
        else:
            assert torch.equal(ta[k], tb[k]), (what, k)


@pytest.mark.slow
def test_tensor_parallel_serve_matches_one_process(tiny_dirs, tiny_model):
    model = tiny_model("llama")
    served = Served(
        tiny_dirs("llama"), "--grace-seconds", "10", "--nemo-http-port", "0", launcher=TORCHRUN, timeout=120
    )
    try:
        args = inputs(seed=3)
        sel, mask = mapping(160)
        with RemoteEagle3TargetModel.from_urls([served.url], cache_dir=None) as remote:
            assert remote.info.fingerprint == fingerprint(model)  # computed over the gathered shards
            remote.set_vocab_mapping(sel, mask)
            local = HFEagle3TargetModel(model)
            local.set_vocab_mapping(sel, mask)
            close(remote.generate_batch(*args), local.generate_batch(*args), "eagle3")
        with RemoteDFlashTargetModel.from_urls(
            [served.url], capture_logits=True, cache_dir=None, max_in_flight=3
        ) as remote:
            local = HFDFlashTargetModel(model, capture_logits=True)
            futures = [remote.generate_batch_async(*inputs(seed=s)) for s in range(3)]  # several forwards
            for s, fut in enumerate(futures):
                close(fut.result(timeout=60), local.generate_batch(*inputs(seed=s)), "dflash")
            assert torch.equal(remote.get_output_embeddings().weight, model.get_output_embeddings().weight)
            assert torch.equal(remote.get_input_embeddings().weight, model.get_input_embeddings().weight)
        with RemoteDSparkTargetModel.from_urls([served.url], cache_dir=None) as remote:
            close(remote.generate_batch(*args), HFDSparkTargetModel(model).generate_batch(*args), "dspark")
        # NeMo's HTTP protocol on the same sharded server: the full embedding weight (gathered over the
        # ranks, as StreamWeights does) and EAGLE-3 replies equal to one process's
        nemo = Client(re.search(r"NeMo HTTP on (http://[0-9.]+:[0-9]+)", served.banner).group(1))
        assert torch.equal(
            unpack(nemo.call("input_embeddings"))["weight"], model.get_input_embeddings().weight
        )
        nemo.set_vocab_mapping(sel, mask)
        got = nemo.generate(*args)
        for k, v in expected(model, (sel, mask), args).items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"nemo.{k}")
        nemo.call("disconnect", b"{}")
        served.proc.send_signal(signal.SIGTERM)  # torchrun forwards it; rank 0 drains and releases rank 1
        served.proc.wait(60)
        log = "".join(served.err)
        assert "drained and stopped" in log and "rank 1: released after" in log, log[-3000:]
    finally:
        served.kill()
