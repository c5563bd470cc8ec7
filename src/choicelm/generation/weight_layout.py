"""Kept so `choicelm.generation.weight_layout` still works: the decode-friendly weight layout lives beside the
model it serves, in choicelm.models.weight_layout (models/gpt_decode.py's fused step reads its packed weights)."""

from ..models.weight_layout import PackedLinear, prepare_for_decoding, restore_layout

__all__ = ["PackedLinear", "prepare_for_decoding", "restore_layout"]
