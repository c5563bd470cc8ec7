"""Model families. `build_model(config.model)` makes the one named by `config.kind`; `registry` says what each
family is and can do (models/registry.py)."""

from __future__ import annotations

import torch

from . import registry
from .bert import BERT
from .gpt import GPT
from .layers import KVCache, ModelOutput
from .lstm import LSTMLM
from .registry import build_model, spec_of
from .seq2seq import Seq2Seq

__all__ = ["BERT", "GPT", "LSTMLM", "Seq2Seq", "KVCache", "ModelOutput", "build_model", "padding_mask", "registry",
           "spec_of"]


def padding_mask(model: torch.nn.Module, mask_BT: torch.Tensor) -> dict:
    """The padding mask as the model's forward names it: an encoder's attention_mask_BT, a decoder's
    attention_mask_BS (its keys may run past the new tokens when it decodes)."""
    return {"attention_mask_BT" if spec_of(model).encodes else "attention_mask_BS": mask_BT}
