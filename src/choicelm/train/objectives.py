"""Objectives: a batch in, (sum of per-token losses, number of valid tokens, model output) out.

The training loop divides the summed loss by the valid-token count of the whole global batch
(all micro-batches on all ranks), so every token weighs the same whatever the padding or the
accumulation. The model output carries auxiliary losses (MoE) and statistics to the loop.
A new objective (MLM, classification, SFT) is one more function here.
"""

from __future__ import annotations

import torch

from .runtime import autocast


def causal_lm(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Next-token prediction: targets are the inputs shifted by one; -100 marks ignored positions."""
    x_BT, y_BT = batch
    out = model(x_BT, y_BT, loss_reduction="sum", return_logits=False)
    n_valid = int((y_BT != -100).sum())
    return out.loss, n_valid, out


OBJECTIVES = {"causal_lm": causal_lm}


@torch.no_grad()
def summed_loss(objective, model: torch.nn.Module, batches, device: torch.device, bf16: bool) -> tuple[float, int]:
    """(sum of per-token losses, valid tokens) of `objective` over `batches`: for validation and evaluation."""
    loss_sum, count = 0.0, 0
    for batch in batches:
        batch = tuple(t.to(device) for t in batch)
        with autocast(device, bf16):
            batch_loss, n, _ = objective(model, batch)
        loss_sum += float(batch_loss)
        count += n
    return loss_sum, count
