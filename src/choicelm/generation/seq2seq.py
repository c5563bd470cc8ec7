"""Decoding for encoder-decoder models (models/seq2seq.py), on the engine (engine.py): greedy, sampling and
beam search.

EncoderDecoder is the engine's decoder for a list of sources: each source is encoded once (right-padded,
masked); the cross-attention keys/values of every decoder layer are computed once from the encoder output
(model.new_cache) and reused at every step; the decoder runs one token per step over its self-attention KV
cache. Every row's "prompt" is the start token (BOS, or Marian's pad); generated ids exclude it. The
processors see the decoder tokens so far, the start token included, as Hugging Face does for encoder-decoders
(the OpenAI penalties count generated tokens only). Beam search runs one source at a time; reordering rows
reorders both the self-attention cache and the cached cross-attention keys/values.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import ChoicelmError
from .beam import beam_step, run_beams
from .config import GenerationConfig
from .engine import Engine, decode, sequences
from .generate import Completion, beam_completions, completion


def pad_sources(sources: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded ids [B, S] and the mask (None when no row is padded)."""
    S = max(len(s) for s in sources)
    src_BS = torch.full((len(sources), S), pad_id, dtype=torch.long, device=device)
    mask_BS = torch.zeros(len(sources), S, dtype=torch.bool, device=device)
    for b, s in enumerate(sources):
        src_BS[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BS[b, :len(s)] = True
    return src_BS, (None if bool(mask_BS.all()) else mask_BS)


class EncoderDecoder:
    """The engine's decoder for an encoder-decoder model and these sources (row b decodes source b)."""

    def __init__(self, model, sources: list[list[int]], pad_id: int = 0):
        self.model, self.sources, self.pad_id = model, sources, pad_id
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not self.sources:
            raise ChoicelmError("no sources given; pass at least one source sequence")
        block = self.block_size
        for i, src in enumerate(self.sources):
            if not src:
                raise ChoicelmError(f"source {i} is empty; give at least one token")
            if len(src) > block:
                raise ChoicelmError(f"source {i} has {len(src)} tokens, more than the model's block size {block}; "
                                    f"shorten it")
        if max_new_tokens > block:
            raise ChoicelmError(f"max_new_tokens={max_new_tokens} exceeds the model's block size {block} "
                                f"(the decoder's positions); ask for at most {block}")

    def new_cache(self, rows: int, columns: int):
        src_BS, mask_BS = pad_sources(self.sources, self.pad_id, self.device)
        return self.model.new_cache(self.model.encode(src_BS, mask_BS), mask_BS, max_len=columns)

    def prefill(self, cache, ids_BT, mask_BS=None, pos_BT=None):
        return self.model.decode_step(ids_BT, cache, 0)

    def step(self, cache, tok_B, col: int, mask_BS=None, pos_B=None):
        return self.model.decode_step(tok_B[:, None], cache, col)


def seq2seq_step(model, src_ids: list[int], num_beams: int, max_new_tokens: int, start_id: int,
                 device=None) -> Callable:
    """The beam.py `step` for one source: encode it and compute the cross-attention K/V once, give them to every
    beam, then decode one token per beam per step, reordering the caches by parent."""
    engine = Engine(EncoderDecoder(model, [src_ids]), columns=max(max_new_tokens, 1))
    return beam_step(engine, [start_id], num_beams)


@torch.no_grad()
def generate_seq2seq(model, sources: list[list[int]], cfg: GenerationConfig, *, start_id: int, pad_id: int = 0,
                     tokenizer=None) -> list[Completion]:
    """Per source, cfg.num_return_sequences Completions (source order; beams best first). ids exclude the
    start token and the EOS; finish_reason is "eos", "length" or "stop" (a stop string, with a tokenizer).
    Call model.eval() first: dropout in train mode would make the outputs random."""
    if cfg.stop and tokenizer is None:
        raise ChoicelmError("stop strings need a tokenizer; pass tokenizer=... or drop stop")
    EncoderDecoder(model, sources).check([], cfg.max_new_tokens)
    if cfg.max_new_tokens == 0:
        n = cfg.num_return_sequences
        return [Completion("", [], "length", i) for i in range(len(sources)) for _ in range(n)]
    if cfg.num_beams > 1:
        out: list[Completion] = []
        for i, src in enumerate(sources):
            hyps = run_beams(seq2seq_step(model, src, cfg.num_beams, cfg.max_new_tokens, start_id), [start_id], cfg)
            out += beam_completions(hyps, [start_id], cfg, tokenizer, i)
        return out
    decoder = EncoderDecoder(model, sources, pad_id)
    groups = sequences([[start_id]] * len(sources), cfg, tokenizer, decoder.device)
    for _ in decode(decoder, groups):
        pass
    return [completion(seq) for group in groups for seq in group]
