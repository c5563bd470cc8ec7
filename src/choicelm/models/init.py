"""The weight initialisation GPT and BERT share (GPT-2's and BERT's: N(0, 0.02))."""

from __future__ import annotations

import torch.nn as nn

from .moe import MoE


def init_weights(model: nn.Module, residual_std: float, tied_head: nn.Linear | None = None) -> None:
    """N(0, 0.02) for linear and embedding weights, N(0, residual_std) for the residual-stream output projections
    (linear layers marked `is_residual_proj`, and MoE layers' w_out), zero biases, norms at 1. `tied_head` shares
    its weight with the embedding: only its bias (if any) is set. Deterministic given torch.manual_seed."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if module is tied_head:
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                continue  # its weight is the embedding's
            std = residual_std if getattr(module, "is_residual_proj", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.reset_parameters()
        elif isinstance(module, MoE):  # stacked expert weights are plain Parameters
            module.reset_parameters(0.02, residual_std)
