"""Beam search, written against a `step` function; beam_step(engine, ...) makes one from the engine (engine.py),
so every decoder (decoder-only, encoder-decoder) runs its beams on its rows.

    step(None, None)          -> logits_NV for the prompt (prefill), one row per beam (N = num_beams)
    step(tokens_N, parent_N)  -> logits_NV after appending tokens_N, where beam i continues the
                                 sequence previously held by beam parent_N[i] (reorder caches first)

The algorithm is Hugging Face's (transformers 5.x `_beam_search`), one prompt at a time, so the same
options give the same sequences:

  - scores are accumulated log-probabilities; processors (repetition penalty, no-repeat-n-gram) run
    on the log-probabilities, before they are added to the beam scores;
  - at each step the best 2 x num_beams (more with several EOS ids) continuations over all beams are
    taken; those ending in EOS (or reaching max_new_tokens) are finished, and only the ones ranked
    among the first num_beams may join the finished list, scored sum_logprobs / new_len ** length_penalty;
  - the best num_beams unfinished continuations keep running;
  - stop when every candidate hit max length, when early_stopping=True and num_beams hypotheses are
    finished, or when the best running beam cannot beat the worst finished one (early_stopping=False:
    judged at the current length; "never": at max length when length_penalty > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .engine import Engine
from .processors import apply_processors
from .sampling import sampler_for
from .step import decoder_for

NEG = -1.0e9  # "impossible" score, as in Hugging Face (not -inf: it must survive sums and topk)


@dataclass
class BeamHypothesis:
    ids: list[int]     # generated tokens only (an EOS that ended it included)
    score: float       # sum of log-probabilities / len(ids) ** length_penalty


@torch.no_grad()
def beam_search(step: Callable, prompt_ids: list[int], *, num_beams: int, max_new_tokens: int,
                eos_ids: list[int] | None = None, length_penalty: float = 1.0, early_stopping: bool | str = False,
                num_return_sequences: int = 1, processors: list | None = None,
                device: torch.device | str = "cpu") -> list[BeamHypothesis]:
    """The num_return_sequences best hypotheses, best first."""
    K, P = num_beams, len(prompt_ids)
    max_len = P + max_new_tokens
    eos_E = torch.tensor(eos_ids or [], dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos_E)) * K  # enough candidates that K stay unfinished
    top_K_of_keep = torch.arange(keep, device=device) < K

    running_KL = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(K, 1)
    running_KL = torch.cat([running_KL, torch.zeros(K, max_new_tokens, dtype=torch.long, device=device)], dim=1)
    running_score_K = torch.full((K,), NEG, device=device)
    running_score_K[0] = 0.0  # all beams start as the same prompt: only beam 0 may expand at first
    done_KL = running_KL.clone()
    done_score_K = torch.full((K,), NEG, device=device)
    done_len_K = torch.zeros(K, dtype=torch.long, device=device)
    done_K = torch.zeros(K, dtype=torch.bool, device=device)
    improvable = True

    if max_new_tokens == 0:
        return [BeamHypothesis([], 0.0) for _ in range(num_return_sequences)]
    cur = P
    logits_KV = step(None, None)
    while True:
        logp_KV = torch.log_softmax(logits_KV.float(), dim=-1)
        if processors:
            logp_KV = apply_processors(processors, running_KL[:, :cur], logp_KV, None,
                                       torch.full((K,), cur - P, device=device))
        V = logp_KV.shape[-1]
        total_KV = logp_KV + running_score_K[:, None]

        # the best `keep` continuations over all beams
        cand_score_C, flat_C = torch.topk(total_KV.reshape(-1), keep)
        parent_C, token_C = flat_C // V, flat_C % V
        cand_CL = running_KL[parent_C]
        cand_CL[:, cur] = token_C
        finished_C = torch.isin(token_C, eos_E) | (cur + 1 >= max_len)

        # the best K unfinished ones keep running
        live_score_C = cand_score_C + finished_C.float() * NEG
        nxt_K = torch.topk(live_score_C, K).indices
        running_KL, running_score_K, parent_K = cand_CL[nxt_K], live_score_C[nxt_K], parent_C[nxt_K]

        # finished candidates ranked in the first K may replace worse finished hypotheses
        new_len = cur + 1 - P
        fin_score_C = cand_score_C / (new_len ** length_penalty)
        if (early_stopping is True and bool(done_K.all())) or not improvable:
            fin_score_C = fin_score_C + NEG
        fin_score_C = fin_score_C + (~(finished_C & top_K_of_keep)).float() * NEG
        merged_score = torch.cat([done_score_K, fin_score_C])
        best_K = torch.topk(merged_score, K).indices
        done_KL = torch.cat([done_KL, cand_CL])[best_K]
        done_len_K = torch.cat([done_len_K, torch.full((keep,), new_len, device=device)])[best_K]
        done_K = torch.cat([done_K, finished_C & top_K_of_keep])[best_K]
        done_score_K = merged_score[best_K]

        cur += 1
        # can the best running beam still beat the worst finished hypothesis?
        best_len = (max_len - P) if (early_stopping == "never" and length_penalty > 0) else (cur - P)
        best_running = float(running_score_K[0]) / (best_len ** length_penalty)
        if bool(done_K.all()):
            improvable = improvable and best_running > float(done_score_K.min())
        if not improvable or (early_stopping is True and bool(done_K.all())) or bool(finished_C.all()):
            break
        logits_KV = step(running_KL[:, cur - 1], parent_K)

    return [BeamHypothesis(done_KL[i, P:P + int(done_len_K[i])].tolist(), float(done_score_K[i]))
            for i in range(num_return_sequences)]


def run_beams(step: Callable, prompt_ids: list[int], cfg) -> list[BeamHypothesis]:
    """beam_search with the options of a GenerationConfig (its history processors: the penalties)."""
    return beam_search(step, prompt_ids, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                       eos_ids=cfg.eos_token_id, length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
                       num_return_sequences=cfg.num_return_sequences, processors=sampler_for(cfg).processors,
                       device=step.device)


def beam_step(engine: Engine, prompt_ids: list[int], num_beams: int) -> Callable:
    """The `step` of beam search on an engine: prefill the prompt once and give it num_beams rows, then decode one
    token per beam per step, each beam's row first becoming a copy of its parent's."""

    def step(tokens_N, parent_N):
        if tokens_N is None:
            return engine.prefill([prompt_ids], num_beams)
        engine.reorder(parent_N)
        return engine.forward(tokens_N)

    step.device = engine.device
    return step


def decoder_only_step(model, prompt_ids: list[int], num_beams: int, max_new_tokens: int, device=None) -> Callable:
    """The `step` for a decoder-only choicelm model (or any decoder, step.py)."""
    engine = Engine(decoder_for(model), columns=len(prompt_ids) + max(max_new_tokens, 1) - 1)
    return beam_step(engine, prompt_ids, num_beams)
