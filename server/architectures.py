"""Which DSpark draft class fits a target, by the target's `config.architectures` (one line per family)."""

from __future__ import annotations

from draftfeed.client.errors import InvalidArgument

__all__ = ["DSPARK_DRAFTS", "dspark_draft_architecture"]

# target architecture -> the `architectures` name of the DSpark draft exported for it
DSPARK_DRAFTS = {
    "Qwen3ForCausalLM": "Qwen3DSparkModel",
    "Qwen3MoeForCausalLM": "Qwen3DSparkModel",
    "Qwen2ForCausalLM": "Qwen3DSparkModel",
    "LlamaForCausalLM": "Qwen3DSparkModel",
    "MistralForCausalLM": "Qwen3DSparkModel",
}


def dspark_draft_architecture(architectures: list[str] | None) -> str:
    """The DSpark draft architecture for a target; an unknown family names the known ones and the fix."""
    for arch in architectures or ():
        if arch in DSPARK_DRAFTS:
            return DSPARK_DRAFTS[arch]
    known = ", ".join(sorted(DSPARK_DRAFTS))
    raise InvalidArgument(
        f"no DSpark draft is registered for target architectures {architectures}; known: {known}. "
        "Add a line to draftfeed.server.architectures.DSPARK_DRAFTS for this family (target architecture -> "
        "the DSpark draft class your serving engine loads for it), or train DFlash or EAGLE-3, which need none"
    )
