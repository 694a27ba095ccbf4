"""The client package imports on a trainer box without transformers, server or target code."""

from __future__ import annotations

import subprocess
import sys

BLOCK = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'transformers' or name.startswith(('draftfeed.server', 'draftfeed.target')):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import draftfeed.client as c
names = [m.name for m in pkgutil.walk_packages(c.__path__, 'draftfeed.client.')]
assert {'draftfeed.client.remote', 'draftfeed.client.pb.draftfeed_pb2_grpc'} <= set(names), names
for name in names:
    importlib.import_module(name)
# and the trainer-side API works, not just imports
import torch
from draftfeed.client import Eagle3TargetBatch, TokenCounter, build_token_map, default_dspark_layer_ids
from draftfeed.client import RemoteEagle3TargetModel, RemoteDFlashTargetModel, RemoteDSparkTargetModel
assert default_dspark_layer_ids(30) == [1, 8, 14, 20, 27]
counter = TokenCounter(10)
counter.update(torch.tensor([[4, 4, 7]]), torch.tensor([[1, 1, 1]]))
assert build_token_map(counter.counts, 3, [1])[0].tolist() == [1, 4, 7]
t = torch.zeros(1, 2)
Eagle3TargetBatch(aux_hidden_states=t, input_ids=t, attention_mask=t, loss_mask=t, logits=t)
bad = sorted(n for n in sys.modules if n.split('.')[0] == 'transformers' or n.startswith(('draftfeed.server', 'draftfeed.target')))
assert not bad, bad
print('ok')
"""


def test_remote_backends_are_exported_from_the_package_lazily():
    code = (
        "import sys; import draftfeed.client as c; assert 'draftfeed.client.remote' not in sys.modules; "
        "from draftfeed.client import RemoteEagle3TargetModel, RemoteDFlashTargetModel, RemoteDSparkTargetModel; "
        "from draftfeed.client.remote import RemoteEagle3TargetModel as R; assert RemoteEagle3TargetModel is R; "
        "assert set(c.__all__) >= {'RemoteEagle3TargetModel', 'RemoteDFlashTargetModel', 'RemoteDSparkTargetModel'}; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_client_imports_without_transformers_or_server():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
