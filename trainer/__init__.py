"""Draft training over any target backend: data, draft models, losses, the loop, evaluation, export, CLI.

Modules (imported on use, so `draftfeed` starts fast): `config` (TrainConfig / EvalConfig), `data`,
`regenerate`, `models` (eagle3, dflash, dspark, common), `losses`, `block_drafting`, `algorithms` (what the
loop needs per algorithm), `loop` (Trainer), `train` (one run: build, train, export, close), `evaluate`
(acceptance length), `export`, `demo`, `cli`.
"""

__all__ = [
    "algorithms",
    "block_drafting",
    "cli",
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
]
