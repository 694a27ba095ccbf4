"""The DSpark registry: a target's `config.architectures` -> the DSpark draft class that fits it."""

from __future__ import annotations

import pytest

from draftfeed.client.errors import InvalidArgument
from draftfeed.trainer.algorithms.dspark import DSPARK_DRAFTS, dspark_draft_architecture


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_known_families(tiny_model, family):
    """The saved checkpoints of the tiny targets carry `architectures`; the registry resolves them."""
    archs = tiny_model(family).config.architectures
    assert dspark_draft_architecture(archs) == "Qwen3DSparkModel"


def test_first_registered_architecture_wins(monkeypatch):
    monkeypatch.setitem(DSPARK_DRAFTS, "MyNewForCausalLM", "MyDSparkModel")  # the one-line append
    assert dspark_draft_architecture(["Unknown", "MyNewForCausalLM"]) == "MyDSparkModel"


@pytest.mark.parametrize("archs", [["GPT2LMHeadModel"], [], None])
def test_unknown_family_names_the_known_ones_and_the_fix(archs):
    with pytest.raises(InvalidArgument) as err:
        dspark_draft_architecture(archs)
    msg = str(err.value)
    assert f"target architectures {archs}" in msg and "LlamaForCausalLM" in msg
    assert "draftfeed.trainer.algorithms.dspark.DSPARK_DRAFTS" in msg
