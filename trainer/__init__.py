"""Draft training over any target backend: data, draft models, losses, the loop, evaluation, export, CLI.

Modules (imported on use, so `draftfeed` starts fast): `config` (TrainConfig / EvalConfig), `data`,
`regenerate`, `models` (eagle3, dflash, dspark, common, sink_attention), `losses`, `block_drafting`,
`vocab_objective` (the block drafts' full-vocab objective), `compiling` (the `loop.compile` switch),
`algorithms` (what the loop needs per algorithm), `loop` (Trainer), `train` (one run: build, train, export,
close), `evaluate` (acceptance length), `export`, `demo`, `cli`.
"""

__all__ = [
    "algorithms",
    "block_drafting",
    "cli",
    "compiling",
    "config",
    "data",
    "demo",
    "evaluate",
    "export",
    "loop",
    "losses",
    "models",
    "regenerate",
    "train",
    "vocab_objective",
]
