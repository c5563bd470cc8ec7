"""Model families. `build_model(config.model)` makes the one named by `config.kind`."""

from __future__ import annotations

import torch.nn as nn

from ..config import ModelConfig
from ..errors import ChoicelmError
from .gpt import GPT
from .layers import KVCache, ModelOutput

__all__ = ["GPT", "KVCache", "ModelOutput", "build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model for `config` (initialisation follows torch's global seed)."""
    if config.kind == "gpt":
        return GPT(config)
    raise ChoicelmError(f"model.kind={config.kind!r} is not a known model family; choose gpt")
