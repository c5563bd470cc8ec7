"""Logits processors: every rule that reshapes next-token scores, each a small step checked when it is built
(with the option's declaration in config.py, the one validator).

They run in this fixed order (Hugging Face's order for 2-7, so the same options give the same tokens):

    1. PresenceFrequencyPenalty  OpenAI's penalties over the generated tokens (not the prompt): a token seen
                                 c times loses presence_penalty * [c > 0] + frequency_penalty * c
    2. RepetitionPenalty   scores of tokens already in the sequence (prompt included): a positive
                           score is divided by the penalty, a negative one multiplied (CTRL paper)
    3. NoRepeatNGram       tokens that would repeat an n-gram already in the sequence get -inf
    4. Temperature         scores / temperature                  } sampling only: greedy decoding
    5. TopK                keep the k highest scores             } and beam search skip 4-7, which
    6. TopP                keep the smallest set of tokens whose } cannot change an argmax anyway
                           probability reaches p (nucleus)       }
    7. MinP                keep tokens with probability >= min_p * the top probability

Each processor is called as proc(ids_BT, scores_BV) -> scores_BV, where ids_BT is every token so far
(prompt + generated) and scores are fp32 (fp64 for an n-gram's table). Rows of ids may be left-padded:
`n_pad_B` (a tensor, or None) says how many leading entries of each row are padding, and processors that
look at history ignore them; `n_new_B` (a tensor, or None = every token) says how many trailing entries of
each row were generated. A removed token gets -inf; at least one token always stays. `key` tells processors
with the same rule apart from others, so the engine can run rows with the same rules together.
"""

from __future__ import annotations

import torch

from .config import OPTIONS, OptionError

NEG_INF = float("-inf")


def _setting(name: str, value):
    """A processor's value, checked by its option's declaration; the rule must be on (not at its off value, and a
    temperature > 0: 0 means greedy, which no processor implements)."""
    checked = OPTIONS[name].check(value)
    if not OPTIONS[name].is_set(checked) or (name == "temperature" and checked == 0):
        raise OptionError(f"{name}={value!r} turns this rule off; build no processor for it", name)
    return checked


class Processor:
    """A logit rule. Subclasses set their parameters in __init__ (checked by their option's declaration).
    counts_new: it reads n_new_B (which tokens were generated)."""

    counts_new = False

    @property
    def key(self) -> tuple:
        return (type(self).__name__, *vars(self).values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class PresenceFrequencyPenalty(Processor):
    """OpenAI's presence and frequency penalties: logits[j] -= presence * [c_j > 0] + frequency * c_j, where c_j
    counts token j among the generated tokens (the last n_new_B of each row; the prompt does not count)."""

    counts_new = True

    def __init__(self, presence: float | None = None, frequency: float | None = None):
        self.presence = OPTIONS["presence_penalty"].check(presence) or 0.0
        self.frequency = OPTIONS["frequency_penalty"].check(frequency) or 0.0

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        T = ids_BT.shape[1]
        if n_new_B is None:
            new_BT = torch.ones_like(ids_BT, dtype=scores_BV.dtype)
        else:
            new_BT = (torch.arange(T, device=ids_BT.device)[None, :] >= T - n_new_B[:, None]).to(scores_BV.dtype)
        counts_BV = torch.zeros_like(scores_BV).scatter_add_(1, ids_BT, new_BT)
        return scores_BV - (counts_BV * self.frequency + (counts_BV > 0) * self.presence)


class RepetitionPenalty(Processor):
    def __init__(self, penalty: float):
        self.penalty = _setting("repetition_penalty", penalty)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        if n_pad_B is not None:  # padding slots point at a real token of the row, which is penalized anyway
            real_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device)[None, :] >= n_pad_B[:, None]
            ids_BT = torch.where(real_BT, ids_BT, ids_BT[:, -1:])
        seen_BT = scores_BV.gather(1, ids_BT)
        seen_BT = torch.where(seen_BT < 0, seen_BT * self.penalty, seen_BT / self.penalty)
        return scores_BV.scatter(1, ids_BT, seen_BT)


class NoRepeatNGram(Processor):
    def __init__(self, n: int):
        self.n = _setting("no_repeat_ngram_size", n)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        n = self.n
        rows = ids_BT.tolist()
        pads = [0] * len(rows) if n_pad_B is None else n_pad_B.tolist()
        banned_rows, banned_ids = [], []
        for b, (row, pad) in enumerate(zip(rows, pads)):
            row = row[pad:]
            if len(row) + 1 < n:
                continue
            prefix = tuple(row[len(row) - n + 1:]) if n > 1 else ()
            for i in range(len(row) - n + 1):  # every earlier n-gram whose first n-1 tokens equal the tail
                if tuple(row[i:i + n - 1]) == prefix:
                    banned_rows.append(b)
                    banned_ids.append(row[i + n - 1])
        if banned_rows:
            scores_BV = scores_BV.clone()
            scores_BV[banned_rows, banned_ids] = NEG_INF
        return scores_BV


class Temperature(Processor):
    def __init__(self, temperature: float):
        self.temperature = _setting("temperature", temperature)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        out_BV = scores_BV / self.temperature
        if self.temperature < 1:  # a tiny temperature may overflow: those rows are scaled from their top score
            over_B = (torch.isposinf(out_BV) & ~torch.isposinf(scores_BV)).any(dim=-1)
            if bool(over_B.any()):
                top_B1 = scores_BV[over_B].amax(dim=-1, keepdim=True)
                out_BV[over_B] = (scores_BV[over_B] - top_B1) / self.temperature
        return out_BV


class TopK(Processor):
    def __init__(self, k: int):
        self.k = _setting("top_k", k)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        k = min(self.k, scores_BV.shape[-1])
        kth_B1 = torch.topk(scores_BV, k, dim=-1).values[:, -1:]
        return scores_BV.masked_fill(scores_BV < kth_B1, NEG_INF)


class TopP(Processor):
    def __init__(self, p: float):
        self.p = _setting("top_p", p)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        # ascending sort: drop the low tail whose total probability stays <= 1 - p; the top token stays
        sorted_BV, order_BV = torch.sort(scores_BV, descending=False, dim=-1)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cum_BV <= (1.0 - self.p)
        drop_BV[:, -1] = False
        return scores_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), NEG_INF)


class MinP(Processor):
    def __init__(self, min_p: float):
        self.min_p = _setting("min_p", min_p)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None, n_new_B=None):
        probs_BV = scores_BV.softmax(dim=-1)
        drop_BV = probs_BV < self.min_p * probs_BV.amax(dim=-1, keepdim=True)  # never the top token
        return scores_BV.masked_fill(drop_BV, NEG_INF)


def build_processors(*, presence_penalty: float | None = None, frequency_penalty: float | None = None,
                     repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, sampling: bool = True) -> list:
    """The processors for these options, in the documented order; options at their "off" value add nothing.
    sampling=False (greedy, beam search) keeps only the history processors (1-3)."""
    on = {name: OPTIONS[name].is_set(value) for name, value in (
        ("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty),
        ("repetition_penalty", repetition_penalty), ("no_repeat_ngram_size", no_repeat_ngram_size),
        ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))}
    procs: list = []
    if on["presence_penalty"] or on["frequency_penalty"]:
        procs.append(PresenceFrequencyPenalty(presence_penalty, frequency_penalty))
    if on["repetition_penalty"]:
        procs.append(RepetitionPenalty(repetition_penalty))
    if on["no_repeat_ngram_size"]:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if sampling:
        if temperature is not None and temperature != 1.0:
            procs.append(Temperature(temperature))
        for name, make, value in (("top_k", TopK, top_k), ("top_p", TopP, top_p), ("min_p", MinP, min_p)):
            if on[name]:
                procs.append(make(value))
    return procs


def apply_processors(procs: list, ids_BT: torch.Tensor, scores_BV: torch.Tensor,
                     n_pad_B: torch.Tensor | None = None, n_new_B: torch.Tensor | None = None) -> torch.Tensor:
    for proc in procs:
        scores_BV = proc(ids_BT, scores_BV, n_pad_B, n_new_B)
    return scores_BV
