"""Basic decoding: greedy or sampling with temperature, top-k and top-p, on a KV cache.

Processors apply in this order: temperature, top-k, top-p. temperature=0 means greedy decoding,
never a silent default.
"""

from __future__ import annotations

import torch

from ..errors import ChoicelmError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ChoicelmError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ChoicelmError(f"top_k={top_k} must be >= 0 (0 or None = off)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ChoicelmError(f"top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise ChoicelmError(f"max_new_tokens={max_new_tokens} must be >= 0")


def next_token(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from the last-position logits."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.size(-1)), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None) -> list[int]:
    """Prefill the prompt into a KV cache, then decode one token at a time. Returns the new ids."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    if not prompt_ids:
        raise ChoicelmError("the prompt is empty; give at least one token of text")
    block = model.config.block_size
    if len(prompt_ids) + max_new_tokens > block:
        raise ChoicelmError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                            f"model's block size {block}; shorten the prompt or ask for fewer tokens")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens, device=device)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = model(ids, kv_cache=cache, start_pos=0).logits[:, -1]
    out: list[int] = []
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        out.append(int(tok))
        if eos_id is not None and out[-1] == eos_id:
            break
        logits = model(tok.view(1, 1), kv_cache=cache, start_pos=pos).logits[:, -1]
        pos += 1
    return out
