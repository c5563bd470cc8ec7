"""The one sampler: logits -> the processor chain (processors.py) -> a token per row, greedy (argmax) or drawn.

    sampler = sampler_for(cfg)                       # cfg: a GenerationConfig
    toks = sampler.pick(logits_BV, ids_BT, n_pad_B, n_new_B, generators)

The engine (engine.py) calls it for every decoding path, the server's included; rows whose samplers have the
same `key` (the same rules) are processed as one batch. A draw uses each row's own torch.Generator when it has
one (seeded: choice i of a prompt draws with seed + i, so a row's tokens never depend on the other rows),
else torch's global RNG. `next_token` is one step as a plain function, for callers with their own loop.
"""

from __future__ import annotations

import torch

from ..core.errors import ChoicelmError
from .processors import apply_processors, build_processors

NEG_INF = float("-inf")


class Sampler:
    """The logit rules of one set of options, and how to pick: argmax (greedy) or a draw from softmax(scores)."""

    def __init__(self, processors: list, greedy: bool):
        self.processors, self.greedy = list(processors), greedy
        self.key = (greedy, tuple(getattr(p, "key", id(p)) for p in self.processors))
        self.counts_new = any(getattr(p, "counts_new", True) for p in self.processors)  # needs n_new_B

    def scores(self, logits_BV: torch.Tensor, ids_BT=None, n_pad_B=None, n_new_B=None) -> torch.Tensor:
        """The processed scores (fp32, or fp64 logits kept as they are)."""
        scores_BV = logits_BV if logits_BV.dtype in (torch.float32, torch.float64) else logits_BV.float()
        if self.processors:
            scores_BV = apply_processors(self.processors, ids_BT, scores_BV, n_pad_B, n_new_B)
        return scores_BV

    def pick(self, logits_BV: torch.Tensor, ids_BT=None, n_pad_B=None, n_new_B=None,
             generators: list | None = None) -> list[int]:
        """One token per row. ids_BT (every token so far), n_pad_B and n_new_B feed the processors (see
        processors.py); generators: one torch.Generator (or None) per row."""
        scores_BV = self.scores(logits_BV, ids_BT, n_pad_B, n_new_B)
        if self.greedy:
            return scores_BV.argmax(dim=-1).tolist()
        # a scale that overflowed keeps its order instead of turning softmax into NaN
        limit = torch.finfo(scores_BV.dtype).max
        probs_BV = torch.nan_to_num(scores_BV, nan=NEG_INF, posinf=limit, neginf=NEG_INF).softmax(dim=-1)
        if bool(probs_BV[:, 0].isnan().any()):  # a row of -inf scores is NaN throughout
            raise ChoicelmError("no token is left to sample from (every score is -inf or NaN)")
        # torch.multinomial's own draw of one sample, argmax(p / q) with q ~ Exp(1), each row's q from its generator:
        # the same tokens as torch.multinomial(p_row, 1, generator=g), without one call per row
        q_BV = torch.empty_like(probs_BV)
        if generators is None or all(g is None for g in generators):
            q_BV.exponential_(1)
        else:
            for b, g in enumerate(generators):
                q_BV[b].exponential_(1, generator=g)
        return (probs_BV / q_BV).argmax(dim=-1).tolist()


def sampler_for(cfg) -> Sampler:
    """The sampler of a GenerationConfig (its processors in the documented order; greedy when temperature=0)."""
    return Sampler(build_processors(presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty,
                                    repetition_penalty=cfg.repetition_penalty,
                                    no_repeat_ngram_size=cfg.no_repeat_ngram_size, temperature=cfg.temperature,
                                    top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, sampling=cfg.sampling),
                   greedy=cfg.greedy)


def seeded(seed: int | None, offset: int, device) -> torch.Generator | None:
    """The generator of choice `offset` under `seed`: seeded with seed + offset (None without a seed)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed((seed + offset) % 2**64)


def next_token(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None, *,
               min_p: float | None = None) -> torch.Tensor:
    """Pick one token per row from the last-position logits. temperature=0 is argmax (greedy)."""
    procs = [] if temperature == 0 else build_processors(temperature=temperature, top_k=top_k, top_p=top_p,
                                                         min_p=min_p)
    sampler = Sampler(procs, greedy=temperature == 0)
    generators = None if generator is None else [generator] * logits_BV.shape[0]
    return torch.tensor(sampler.pick(logits_BV, generators=generators), device=logits_BV.device)
