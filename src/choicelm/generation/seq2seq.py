"""Decoding for encoder-decoder models (models/seq2seq.py): greedy, sampling and beam search.

Each source is encoded once; the cross-attention keys/values of every decoder layer are computed once from
the encoder output (model.new_cache) and reused at every step; the decoder runs one token per step over its
self-attention KV cache. The decoder starts from `start_id` (BOS, or Marian's pad); generated ids exclude it.

    greedy / sampling   all sources in one batch (right-padded, masked), per-row EOS, the processors of
                        generation/processors.py in their documented order (history = decoder tokens so far,
                        the start token included, as Hugging Face does for encoder-decoders)
    beam search         generation/beam.py, one source at a time; the step reorders both the self-attention
                        cache and the cached cross-attention keys/values by parent beam
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import ChoicelmError
from .beam import beam_search, reorder_cache
from .generate import Completion
from .options import GenerationConfig
from .processors import apply_processors
from .stopping import StopStrings
from .streaming import RowText


def _device(model) -> torch.device:
    return next(model.parameters()).device


def check_sources(model, sources: list[list[int]], cfg: GenerationConfig) -> None:
    if not sources:
        raise ChoicelmError("no sources given; pass at least one source sequence")
    block = model.config.block_size
    for i, src in enumerate(sources):
        if not src:
            raise ChoicelmError(f"source {i} is empty; give at least one token")
        if len(src) > block:
            raise ChoicelmError(f"source {i} has {len(src)} tokens, more than the model's block size {block}; "
                                f"shorten it")
    if cfg.max_new_tokens > block:
        raise ChoicelmError(f"max_new_tokens={cfg.max_new_tokens} exceeds the model's block size {block} "
                            f"(the decoder's positions); ask for at most {block}")


def pad_sources(sources: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded ids [B, S] and the mask (None when no row is padded)."""
    S = max(len(s) for s in sources)
    src_BS = torch.full((len(sources), S), pad_id, dtype=torch.long, device=device)
    mask_BS = torch.zeros(len(sources), S, dtype=torch.bool, device=device)
    for b, s in enumerate(sources):
        src_BS[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BS[b, :len(s)] = True
    return src_BS, (None if bool(mask_BS.all()) else mask_BS)


def seq2seq_step(model, src_ids: list[int], num_beams: int, max_new_tokens: int, start_id: int,
                 device) -> Callable:
    """The beam.py `step` for one source: encode it and compute the cross-attention K/V once (batch 1), copy
    the caches to every beam, then decode one token per beam per step, reordering the caches by parent."""
    state: dict = {"pos": 0}

    def step(tokens_N, parent_N):
        if tokens_N is None:
            enc_1SD = model.encode(torch.tensor([src_ids], dtype=torch.long, device=device))
            cache = model.new_cache(enc_1SD, max_len=max(max_new_tokens, 1))
            start_11 = torch.full((1, 1), start_id, dtype=torch.long, device=device)
            logits_1V = model.decode_step(start_11, cache, 0)
            reorder_cache(cache, torch.zeros(num_beams, dtype=torch.long, device=device))  # one copy per beam
            state.update(cache=cache, pos=1)
            return logits_1V.expand(num_beams, -1)
        cache = state["cache"]
        reorder_cache(cache, parent_N)
        logits_NV = model.decode_step(tokens_N[:, None], cache, state["pos"])
        state["pos"] += 1
        return logits_NV

    return step


@torch.no_grad()
def decode_steps(model, sources: list[list[int]], cfg: GenerationConfig, start_id: int, pad_id: int,
                 done: list[bool]):
    """Greedy or sampled decoding of a batch of sources; yields each step's token per row. The caller marks
    finished rows in `done` (the loop returns once all are); tokens of finished rows are junk."""
    device = _device(model)
    B = len(sources)
    procs = cfg.processors()
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    src_BS, mask_BS = pad_sources(sources, pad_id, device)
    cache = model.new_cache(model.encode(src_BS, mask_BS), mask_BS, max_len=max(cfg.max_new_tokens, 1))
    ids_BT = torch.full((B, cfg.max_new_tokens + 1), start_id, dtype=torch.long, device=device)
    logits_BV = model.decode_step(ids_BT[:, :1], cache, 0)
    for t in range(cfg.max_new_tokens):
        scores_BV = logits_BV.float()
        if procs:
            scores_BV = apply_processors(procs, ids_BT[:, :t + 1], scores_BV)
        if cfg.greedy:
            tok_B = scores_BV.argmax(dim=-1)
        else:
            tok_B = torch.multinomial(scores_BV.softmax(dim=-1), 1, generator=generator).squeeze(-1)
        ids_BT[:, t + 1] = tok_B
        yield tok_B.tolist()
        if all(done) or t == cfg.max_new_tokens - 1:
            return
        logits_BV = model.decode_step(tok_B[:, None], cache, t + 1)


def generate_seq2seq(model, sources: list[list[int]], cfg: GenerationConfig, *, start_id: int, pad_id: int = 0,
                     tokenizer=None) -> list[Completion]:
    """Per source, cfg.num_return_sequences Completions (source order; beams best first). ids exclude the
    start token and the EOS; finish_reason is "eos", "length" or "stop" (a stop string, with a tokenizer).
    Call model.eval() first: dropout in train mode would make the outputs random."""
    if cfg.stop and tokenizer is None:
        raise ChoicelmError("stop strings need a tokenizer; pass tokenizer=... or drop stop")
    check_sources(model, sources, cfg)
    eos = set(cfg.eos_token_id or [])

    def finish(ids: list[int], reason: str, owner: int) -> Completion:
        if tokenizer is None:
            return Completion("", ids, reason, owner)
        row = RowText(tokenizer, StopStrings(cfg.stop))
        for tok in ids:
            row.push(tok)
            if row.stopped:
                break
        row.finish()
        return Completion(row.text, ids, "stop" if row.stopped else reason, owner)

    out: list[Completion] = []
    if cfg.max_new_tokens == 0:
        n = cfg.num_return_sequences
        return [Completion("", [], "length", i) for i in range(len(sources)) for _ in range(n)]
    if cfg.num_beams > 1:
        device = _device(model)
        for i, src in enumerate(sources):
            step = seq2seq_step(model, src, cfg.num_beams, cfg.max_new_tokens, start_id, device)
            hyps = beam_search(step, [start_id], num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                               eos_ids=cfg.eos_token_id, length_penalty=cfg.length_penalty,
                               early_stopping=cfg.early_stopping, num_return_sequences=cfg.num_return_sequences,
                               processors=cfg.processors(), device=device)
            for hyp in hyps:
                ended = bool(hyp.ids) and hyp.ids[-1] in eos
                out.append(finish(hyp.ids[:-1] if ended else hyp.ids, "eos" if ended else "length", i))
        return out

    n = cfg.num_return_sequences if cfg.sampling else 1
    rows = [s for s in sources for _ in range(n)]
    owner = [i for i in range(len(sources)) for _ in range(n)]
    done = [False] * len(rows)
    ids: list[list[int]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    for toks in decode_steps(model, rows, cfg, start_id, pad_id, done):
        for b, tok in enumerate(toks):
            if done[b]:
                continue
            if tok in eos:
                done[b], reasons[b] = True, "eos"
            else:
                ids[b].append(tok)
    return [finish(ids[b], reasons[b], owner[b]) for b in range(len(rows))]
