"""The decoding loop: batched greedy / sampled generation on a static KV cache, plus beam search,
returning token ids (`generate_ids`) or text (`generate_text`, `stream_text`).

    prompts of different lengths are left-padded to the longest, with an attention mask that hides
    the padding and position ids that start at 0 at each row's first real token (Hugging Face's
    convention), so a row's output does not depend on the other rows in the batch;
    the KV cache is allocated once for prompt + max_new_tokens; the prompt is prefilled in one
    forward pass (only its last position's logits are computed), then one token per row per step;
    each row stops on its own (EOS, a stop string, or max_new_tokens); the batch stops when all have,
    and finished rows are fed a dummy token whose output is ignored (the batch shape never changes).

Beyond the block size: an error before any work (see GenerationConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..core.errors import ChoicelmError
from .beam import beam_search, decoder_only_step
from .step import decode_step
from .options import GenerationConfig
from .processors import apply_processors
from .stopping import StopStrings
from .streaming import RowText


@dataclass
class Completion:
    """One generated sequence: its text (cut before any stop string), its new token ids, and why it ended:
    "eos", "stop" (a stop string), or "length" (max_new_tokens)."""

    text: str
    ids: list[int]
    finish_reason: str
    prompt_index: int = 0


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_prompts(model, prompts: list[list[int]], cfg: GenerationConfig) -> None:
    if not prompts:
        raise ChoicelmError("no prompts given; pass at least one prompt")
    block = model.config.block_size
    for i, p in enumerate(prompts):
        if not p:
            raise ChoicelmError(f"prompt {i} is empty; give at least one token of text")
    for p in prompts:
        if len(p) + cfg.max_new_tokens > block:
            raise ChoicelmError(f"prompt ({len(p)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                                f"model's block size {block}; shorten the prompt or ask for at most "
                                f"{max(block - len(p), 0)} new tokens")


@torch.no_grad()
def decode_steps(model, prompts: list[list[int]], cfg: GenerationConfig, done: list[bool]) -> Iterator[list[int]]:
    """Greedy or sampled decoding of a batch of prompts. Yields each step's new token per row; the caller
    marks finished rows in `done` (the loop returns once all are). Tokens of finished rows are junk."""
    check_prompts(model, prompts, cfg)
    device = _device(model)
    B, L = len(prompts), max(len(p) for p in prompts)
    total = L + cfg.max_new_tokens
    procs = cfg.processors()
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None

    n_pad_B = torch.tensor([L - len(p) for p in prompts], device=device)
    padded = bool(n_pad_B.any())
    ids_BS = torch.zeros(B, total, dtype=torch.long, device=device)  # every token so far, left-padded
    for b, p in enumerate(prompts):
        ids_BS[b, L - len(p):L] = torch.tensor(p, dtype=torch.long)
    cache = model.new_kv_cache(B, total, device=device)
    step = decode_step(model)
    if padded:
        mask_BS = torch.arange(total, device=device)[None, :] >= n_pad_B[:, None]
        pos_BL = (torch.arange(L, device=device)[None, :] - n_pad_B[:, None]).clamp(min=0)
        logits_BV = model(ids_BS[:, :L], kv_cache=cache, attention_mask_BS=mask_BS[:, :L],
                          position_ids_BT=pos_BL, logits_to_keep=1).logits[:, -1]
    else:
        logits_BV = model(ids_BS[:, :L], kv_cache=cache, logits_to_keep=1).logits[:, -1]

    for t in range(cfg.max_new_tokens):
        cur = L + t
        scores_BV = logits_BV.float()
        if procs:
            scores_BV = apply_processors(procs, ids_BS[:, :cur], scores_BV, n_pad_B if padded else None)
        if cfg.greedy:
            tok_B = scores_BV.argmax(dim=-1)
        else:
            tok_B = torch.multinomial(scores_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        ids_BS[:, cur] = tok_B
        yield tok_B.tolist()
        if all(done) or t == cfg.max_new_tokens - 1:
            return
        if padded:
            logits_BV = step(tok_B, cache, cur, mask_BS[:, :cur + 1], cur - n_pad_B)
        else:
            logits_BV = step(tok_B, cache, cur)


def _expand(prompts: list[list[int]], cfg: GenerationConfig) -> tuple[list[list[int]], list[int]]:
    """Sampling with num_return_sequences = n: each prompt becomes n rows (independent draws)."""
    n = cfg.num_return_sequences if cfg.sampling else 1
    rows = [p for p in prompts for _ in range(n)]
    owner = [i for i in range(len(prompts)) for _ in range(n)]
    return rows, owner


def generate_ids(model, prompts: list[list[int]], cfg: GenerationConfig) -> list[Completion]:
    """Token-level generation (no stop strings: they need a tokenizer; see generate_text). Returns, per
    prompt, num_return_sequences Completions (text left empty), EOS excluded from ids."""
    if cfg.stop:
        raise ChoicelmError("stop strings need a tokenizer; use generate_text (or lm.generate)")
    return generate_text(model, None, prompts, cfg)


def generate_text(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig) -> list[Completion]:
    """Per prompt, num_return_sequences Completions, in prompt order."""
    eos = set(cfg.eos_token_id or [])
    if cfg.num_beams > 1:
        check_prompts(model, prompts, cfg)
        out = []
        for i, p in enumerate(prompts):
            for hyp in _beams(model, p, cfg):
                reason = "eos" if hyp.ids and hyp.ids[-1] in eos else "length"
                ids = hyp.ids[:-1] if reason == "eos" else hyp.ids
                text, stopped = "", False
                if tokenizer is not None:
                    row = RowText(tokenizer, StopStrings(cfg.stop))
                    for tok in ids:
                        row.push(tok)
                    row.finish()
                    text, stopped = row.text, row.stopped
                out.append(Completion(text, ids, "stop" if stopped else reason, i))
        return out

    rows, owner = _expand(prompts, cfg)
    done = [False] * len(rows)
    ids: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    texts = [RowText(tokenizer, StopStrings(cfg.stop)) if tokenizer is not None else None for _ in rows]
    for toks in decode_steps(model, rows, cfg, done):
        for b, tok in enumerate(toks):
            if done[b]:
                continue
            if tok in eos:
                done[b], reasons[b] = True, "eos"
                continue
            ids[b].append(tok)
            if texts[b] is not None:
                texts[b].push(tok)
                if texts[b].stopped:
                    done[b], reasons[b] = True, "stop"
    out = []
    for b in range(len(rows)):
        text = ""
        if texts[b] is not None:
            texts[b].finish()
            text = texts[b].text
        out.append(Completion(text, ids[b], reasons[b], owner[b]))
    return out


def stream_text(model, tokenizer, prompt: list[int], cfg: GenerationConfig) -> Iterator[str]:
    """Text deltas of one greedy/sampled sequence as they are generated: never half a UTF-8 character, never
    a stop string or any part of one; "".join(deltas) == generate_text(...)[0].text."""
    if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
        raise ChoicelmError("streaming gives one sequence; use num_beams=1 and num_return_sequences=1 "
                            "(beam search only knows its best sequence at the end)")
    eos = set(cfg.eos_token_id or [])
    row = RowText(tokenizer, StopStrings(cfg.stop))
    done = [False]
    for (tok,) in decode_steps(model, [prompt], cfg, done):
        if tok in eos:
            done[0] = True
            break
        delta = row.push(tok)
        if delta:
            yield delta
        if row.stopped:
            done[0] = True
            break
    tail = row.finish()
    if tail:
        yield tail


def _beams(model, prompt: list[int], cfg: GenerationConfig):
    device = _device(model)
    step = decoder_only_step(model, prompt, cfg.num_beams, cfg.max_new_tokens, device)
    return beam_search(step, prompt, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                       eos_ids=cfg.eos_token_id, length_penalty=cfg.length_penalty,
                       early_stopping=cfg.early_stopping, num_return_sequences=cfg.num_return_sequences,
                       processors=cfg.processors(), device=device)
