"""What decoding needs from each kind of model: a decoder, the engine's (engine.py) only view of the model.

    decoder = decoder_for(model)        # CausalDecoder (GPT, LSTM) or NGramDecoder; seq2seq.py has EncoderDecoder
    decoder.check(prompts, max_new_tokens)
    cache = decoder.new_cache(rows, columns)
    logits_BV = decoder.prefill(cache, ids_BT, mask_BS, pos_BT)         # the prompts, at columns 0..T-1
    logits_BV = decoder.step(cache, tok_B, col, mask_BS, pos_B)         # one token per row, at column col

mask_BS / pos_BT are None when no row is left-padded (the engine builds them, in one place). A cache may offer
reorder(rows) (keep these rows, in this order: a recurrent state, an encoder-decoder's caches, an n-gram's
contexts); a plain KVCache has none, and the engine moves its rows in place instead.

One decode step of a decoder-only model:

    step = decode_step(model)            # the model's fast step when it has one for this model, else ModuleStep
    logits_BV = step(tok_B, cache, pos)  # + attention_mask_BS, position_ids_B for left-padded rows

The fast step belongs to the model it mirrors (GPT's is models/gpt_decode.py): a model class may offer
fast_decode_step() -> a step, or None when it does not compute this model exactly. Wrappers (LoRA, compile)
do not define it on their own class, so they decode through their forward.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import ChoicelmError
from ..models import registry


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


def decoder_for(model):
    """The decoder of a model, as the registry describes its family: a counted n-gram reads its tables, a
    causal LM (GPT, LSTM, or any module with their forward and new_kv_cache) runs with a KV cache. An
    encoder-decoder needs its sources (seq2seq.EncoderDecoder); a decoder is returned as it is."""
    if hasattr(model, "prefill") and hasattr(model, "new_cache"):
        return model
    spec = registry.find(model)
    if spec is not None and spec.counted:
        return NGramDecoder(model)
    if spec is not None and spec.encoder_decoder:
        raise ChoicelmError("an encoder-decoder generates from sources: use generation.seq2seq.generate_seq2seq")
    if spec is not None and not spec.generates:
        raise ChoicelmError(f"a {spec.kind} model does not generate text")
    return CausalDecoder(model)


class CausalDecoder:
    """A decoder-only model (GPT dense or MoE, LSTM): forward(ids, kv_cache=, start_pos=, attention_mask_BS=,
    position_ids_BT=, logits_to_keep=) and new_kv_cache(). Its decode step is decode_step(model)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.decode = decode_step(model)  # built once: the weights do not change while decoding

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise ChoicelmError("no prompts given; pass at least one prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise ChoicelmError(f"prompt {i} is empty; give at least one token of text")
        block = self.block_size
        for p in prompts:
            if len(p) + max_new_tokens > block:
                fits = (f"ask for at most {block - len(p)} new tokens" if len(p) < block else
                        f"it already fills the {block} positions, so shorten it")
                raise ChoicelmError(f"prompt ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                    f"model's block size {block}; shorten the prompt or {fits}")

    def new_cache(self, rows: int, columns: int):
        return self.model.new_kv_cache(rows, columns, device=self.device)

    def prefill(self, cache, ids_BT, mask_BS=None, pos_BT=None):
        kwargs = {} if mask_BS is None else dict(attention_mask_BS=mask_BS, position_ids_BT=pos_BT)
        return self.model(ids_BT, kv_cache=cache, logits_to_keep=1, **kwargs).logits[:, -1]

    def step(self, cache, tok_B, col: int, mask_BS=None, pos_B=None):
        return self.decode(tok_B, cache, col, mask_BS, pos_B)


class NGramContexts:
    """An n-gram's decoding state: the tokens of each row so far (its "cache")."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def reorder(self, rows_N: torch.Tensor) -> None:
        self.rows = [list(self.rows[r]) for r in rows_N.tolist()]


class NGramDecoder:
    """A counted n-gram model (models/ngram.py): the next token's log-probabilities from its tables (fp64), with
    the ids that have no text never drawn (<s>, and <unk> of a token-id model) and, with allow_eos=False, no
    </s> either."""

    def __init__(self, lm, allow_eos: bool = True):
        self.lm, self.device, self.block_size = lm, torch.device("cpu"), None
        self.banned = [lm.bos_id] + ([lm.unk_id] if lm.kind == "ids" else []) + ([] if allow_eos else [lm.eos_id])

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise ChoicelmError("no prompts given; pass at least one prompt")

    def new_cache(self, rows: int, columns: int) -> NGramContexts:
        return NGramContexts([[] for _ in range(rows)])

    def _logits(self, cache: NGramContexts) -> torch.Tensor:
        lp_BV = torch.from_numpy(np.stack([self.lm.next_token_logprobs(ctx) for ctx in cache.rows]))
        lp_BV[:, self.banned] = float("-inf")
        return lp_BV

    def prefill(self, cache: NGramContexts, ids_BT, mask_BS=None, pos_BT=None) -> torch.Tensor:
        T = ids_BT.shape[1]
        real_BT = torch.ones_like(ids_BT, dtype=torch.bool) if mask_BS is None else mask_BS[:, :T]
        cache.rows = [row[real].tolist() for row, real in zip(ids_BT, real_BT)]
        return self._logits(cache)

    def step(self, cache: NGramContexts, tok_B, col: int, mask_BS=None, pos_B=None) -> torch.Tensor:
        for row, tok in zip(cache.rows, tok_B.tolist()):
            row.append(tok)
        return self._logits(cache)
