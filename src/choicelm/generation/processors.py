"""Logits processors: small, validated-on-construction steps that reshape next-token scores.

They run in this fixed order (Hugging Face's order, so the same options give the same tokens):

    1. RepetitionPenalty   scores of tokens already in the sequence (prompt included): a positive
                           score is divided by the penalty, a negative one multiplied (CTRL paper)
    2. NoRepeatNGram       tokens that would repeat an n-gram already in the sequence get -inf
    3. Temperature         scores / temperature                  } sampling only: greedy decoding
    4. TopK                keep the k highest scores             } and beam search skip 3-6, which
    5. TopP                keep the smallest set of tokens whose } cannot change an argmax anyway
                           probability reaches p (nucleus)       }
    6. MinP                keep tokens with probability >= min_p * the top probability

Each processor is called as proc(ids_BT, scores_BV) -> scores_BV, where ids_BT is every token so far
(prompt + generated) and scores are fp32. Rows of ids may be left-padded: `n_pad_B` (a tensor, or
None) says how many leading entries of each row are padding, and processors that look at history
ignore them. A removed token gets -inf; at least one token always stays.
"""

from __future__ import annotations

import torch

from ..core.errors import ChoicelmError

NEG_INF = float("-inf")


class RepetitionPenalty:
    def __init__(self, penalty: float):
        if not penalty > 0:
            raise ChoicelmError(f"repetition_penalty={penalty} must be > 0 (1.0 = off, > 1 discourages repeats)")
        self.penalty = float(penalty)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
        if n_pad_B is not None:  # padding slots point at a real token of the row, which is penalized anyway
            real_BT = torch.arange(ids_BT.shape[1], device=ids_BT.device)[None, :] >= n_pad_B[:, None]
            ids_BT = torch.where(real_BT, ids_BT, ids_BT[:, -1:])
        seen_BT = scores_BV.gather(1, ids_BT)
        seen_BT = torch.where(seen_BT < 0, seen_BT * self.penalty, seen_BT / self.penalty)
        return scores_BV.scatter(1, ids_BT, seen_BT)


class NoRepeatNGram:
    def __init__(self, n: int):
        if not (isinstance(n, int) and n > 0):
            raise ChoicelmError(f"no_repeat_ngram_size={n} must be a positive integer (0 = off)")
        self.n = n

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
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


class Temperature:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ChoicelmError(f"temperature={temperature} must be > 0 to sample (temperature=0 means greedy)")
        self.temperature = float(temperature)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
        return scores_BV / self.temperature


class TopK:
    def __init__(self, k: int):
        if not (isinstance(k, int) and k > 0):
            raise ChoicelmError(f"top_k={k} must be a positive integer (0 or None = off)")
        self.k = k

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
        k = min(self.k, scores_BV.shape[-1])
        kth_B1 = torch.topk(scores_BV, k, dim=-1).values[:, -1:]
        return scores_BV.masked_fill(scores_BV < kth_B1, NEG_INF)


class TopP:
    def __init__(self, p: float):
        if not 0.0 < p <= 1.0:
            raise ChoicelmError(f"top_p={p} must be in (0, 1] (1 = off)")
        self.p = float(p)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
        # ascending sort: drop the low tail whose total probability stays <= 1 - p; the top token stays
        sorted_BV, order_BV = torch.sort(scores_BV, descending=False, dim=-1)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        drop_BV = cum_BV <= (1.0 - self.p)
        drop_BV[:, -1] = False
        return scores_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), NEG_INF)


class MinP:
    def __init__(self, min_p: float):
        if not 0.0 <= min_p <= 1.0:
            raise ChoicelmError(f"min_p={min_p} must be in [0, 1] (0 = off)")
        self.min_p = float(min_p)

    def __call__(self, ids_BT, scores_BV, n_pad_B=None):
        probs_BV = scores_BV.softmax(dim=-1)
        drop_BV = probs_BV < self.min_p * probs_BV.amax(dim=-1, keepdim=True)  # never the top token
        return scores_BV.masked_fill(drop_BV, NEG_INF)


def build_processors(*, repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, sampling: bool = True) -> list:
    """The processors for these options, in the documented order; options that are off add nothing.
    sampling=False (greedy, beam search) keeps only the history processors (1-2)."""
    procs: list = []
    if repetition_penalty is not None and RepetitionPenalty(repetition_penalty).penalty != 1.0:
        procs.append(RepetitionPenalty(repetition_penalty))
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGram(no_repeat_ngram_size))
    if sampling:
        if temperature is not None and temperature != 1.0:
            procs.append(Temperature(temperature))
        if top_k:
            procs.append(TopK(top_k))
        if top_p is not None and TopP(top_p).p < 1.0:  # constructed first: 1.5 is an error, not "off"
            procs.append(TopP(top_p))
        if min_p is not None and MinP(min_p).min_p > 0:
            procs.append(MinP(min_p))
    return procs


def apply_processors(procs: list, ids_BT: torch.Tensor, scores_BV: torch.Tensor,
                     n_pad_B: torch.Tensor | None = None) -> torch.Tensor:
    for proc in procs:
        scores_BV = proc(ids_BT, scores_BV, n_pad_B)
    return scores_BV
