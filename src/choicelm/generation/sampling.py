"""One sampling step: processed scores -> a token per row (greedy when temperature is 0).

The decoding loop (generate.py) inlines this; `next_token` is the same step as a function, for callers
that run their own loop (the server, tests).
"""

from __future__ import annotations

import torch

from .processors import apply_processors, build_processors


def next_token(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None, *,
               min_p: float | None = None) -> torch.Tensor:
    """Pick one token per row from the last-position logits. temperature=0 is argmax (greedy)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    procs = build_processors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    scores_BV = apply_processors(procs, None, logits_BV.float())
    return torch.multinomial(scores_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)
