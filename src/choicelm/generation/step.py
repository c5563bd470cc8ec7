"""One decode step (one new token per row, written into the KV cache) for any choicelm decoder.

    step = decode_step(model)            # the model's fast step when it has one for this model, else ModuleStep
    logits_BV = step(tok_B, cache, pos)  # + attention_mask_BS, position_ids_B for left-padded rows

The fast step belongs to the model it mirrors (GPT's is models/gpt_decode.py): a model class may offer
fast_decode_step() -> a step, or None when it does not compute this model exactly. Wrappers (LoRA, compile)
do not define it on their own class, so they decode through their forward.
"""

from __future__ import annotations

import torch.nn as nn


class ModuleStep:
    """A decode step through the model's forward: any choicelm decoder."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, tok_B, cache, start_pos: int, attention_mask_BS=None, position_ids_B=None):
        kwargs = {}
        if attention_mask_BS is not None:
            kwargs = dict(attention_mask_BS=attention_mask_BS, position_ids_BT=position_ids_B[:, None])
        return self.model(tok_B[:, None], kv_cache=cache, start_pos=start_pos, **kwargs).logits[:, -1]


def decode_step(model: nn.Module):
    """The fastest exact decode step for this model: its class's fast_decode_step() when that gives one, else
    ModuleStep. Build one per generation call (a fast step holds the weights of that moment)."""
    fast = getattr(type(model), "fast_decode_step", None)
    step = fast(model) if fast is not None else None
    return step if step is not None else ModuleStep(model)
