"""The client package imports on a trainer box without transformers or server code."""

from __future__ import annotations

import subprocess
import sys

BLOCK = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'transformers' or name.startswith('draftfeed.server'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import draftfeed.client as c
for m in pkgutil.iter_modules(c.__path__):
    importlib.import_module('draftfeed.client.' + m.name)
bad = sorted(n for n in sys.modules if n.split('.')[0] == 'transformers' or n.startswith('draftfeed.server'))
assert not bad, bad
print('ok')
"""


def test_client_imports_without_transformers_or_server():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
