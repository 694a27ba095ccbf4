"""Draft models (math only): EAGLE-3, DFlash, DSpark, and the pieces they share (`common`)."""

from .common import RMSNorm, apply_rope, document_ids, rope_cos_sin, rope_inv_freq, tokens_left_in_document
from .dflash import DFlashConfig, DFlashDraft, export_dflash, load_dflash
from .dspark import DSparkConfig, DSparkDraft, export_dspark, load_dspark
from .eagle3 import Eagle3DraftConfig, Eagle3DraftModel

__all__ = [
    "RMSNorm",
    "apply_rope",
    "document_ids",
    "rope_cos_sin",
    "rope_inv_freq",
    "tokens_left_in_document",
    "Eagle3DraftConfig",
    "Eagle3DraftModel",
    "DFlashConfig",
    "DFlashDraft",
    "export_dflash",
    "load_dflash",
    "DSparkConfig",
    "DSparkDraft",
    "export_dspark",
    "load_dspark",
]
