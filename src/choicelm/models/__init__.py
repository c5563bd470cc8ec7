"""Model families. `build_model(config.model)` makes the one named by `config.kind`."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError
from .bert import BERT
from .gpt import GPT
from .layers import KVCache, ModelOutput
from .lstm import LSTMLM
from .seq2seq import Seq2Seq

__all__ = ["BERT", "GPT", "LSTMLM", "Seq2Seq", "KVCache", "ModelOutput", "build_model", "padding_mask"]


def build_model(config: ModelConfig, moe: MoEConfig | None = None) -> nn.Module:
    """A freshly initialised model for `config` (initialisation follows torch's global seed); `moe`
    (the run's moe section) turns MLPs into Mixture-of-Experts layers when moe.experts > 0."""
    if config.kind == "gpt":
        return GPT(config, moe)
    if config.kind == "lstm":
        if moe is not None and moe.experts:
            raise ChoicelmError("model.kind=lstm has no MLP to turn into experts; set --moe.experts=0")
        return LSTMLM(config)
    if config.kind == "seq2seq":
        if moe is not None and moe.experts:
            raise ChoicelmError("model.kind=seq2seq has no Mixture-of-Experts layers yet; set --moe.experts=0")
        return Seq2Seq(config)
    if config.kind == "bert":
        return BERT(config, moe)
    raise ChoicelmError(f"model.kind={config.kind!r} is not a known model family; choose gpt, bert, lstm or seq2seq")


def padding_mask(model: torch.nn.Module, mask_BT: torch.Tensor) -> dict:
    """The padding mask as the model's forward names it: an encoder's attention_mask_BT, a decoder's
    attention_mask_BS (its keys may run past the new tokens when it decodes)."""
    config = getattr(model, "module", model).config  # through DDP's wrapper
    return {"attention_mask_BT" if config.kind == "bert" else "attention_mask_BS": mask_BT}
