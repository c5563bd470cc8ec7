"""Generation from prompts of token ids, on the engine (engine.py): token ids (`generate_ids`) or text
(`generate_text`, `stream_text`), greedy, sampled or by beam search.

    prompts of different lengths are left-padded to the longest, with an attention mask that hides the
    padding and position ids that start at 0 at each row's first real token (Hugging Face's convention),
    so a row's output does not depend on the other rows in the batch (a seeded row draws from its own
    generator: choice i of a prompt with seed + i);
    the cache is allocated once for prompt + max_new_tokens; the prompts are prefilled in one forward pass
    (only the last position's logits are computed), then one token per row per step;
    each row stops on its own (EOS, a stop string, or max_new_tokens) and leaves the batch.

`model` is a choicelm decoder-only model (GPT, LSTM), a counted n-gram model, or a decoder (step.py).
Beyond the block size: an error before any work (see GenerationConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from ..core.errors import ChoicelmError
from .beam import beam_step, run_beams
from .config import GenerationConfig
from .engine import Engine, Sequence, decode, sequences
from .step import decoder_for


@dataclass
class Completion:
    """One generated sequence: its text (cut before any stop string), its new token ids, and why it ended:
    "eos", "stop" (a stop string), or "length" (max_new_tokens)."""

    text: str
    ids: list[int]
    finish_reason: str
    prompt_index: int = 0


def completion(seq: Sequence) -> Completion:
    return Completion(seq.output, seq.ids, seq.finish_reason, seq.tag)


def generate_ids(model, prompts: list[list[int]], cfg: GenerationConfig) -> list[Completion]:
    """Token-level generation (no stop strings: they need a tokenizer; see generate_text). Returns, per
    prompt, num_return_sequences Completions (text left empty), EOS excluded from ids."""
    if cfg.stop:
        raise ChoicelmError("stop strings need a tokenizer; use generate_text (or lm.generate)")
    return generate_text(model, None, prompts, cfg)


def generate_text(model, tokenizer, prompts: list[list[int]], cfg: GenerationConfig) -> list[Completion]:
    """Per prompt, num_return_sequences Completions, in prompt order."""
    decoder = decoder_for(model)
    if cfg.num_beams > 1:
        decoder.check(prompts, cfg.max_new_tokens)
        out = []
        for i, p in enumerate(prompts):
            engine = Engine(decoder, columns=len(p) + max(cfg.max_new_tokens, 1) - 1)
            out += beam_completions(run_beams(beam_step(engine, p, cfg.num_beams), p, cfg), p, cfg, tokenizer, i)
        return out
    groups = sequences(prompts, cfg, tokenizer, decoder.device)
    for _ in decode(decoder, groups):
        pass
    return [completion(seq) for group in groups for seq in group]


def stream_text(model, tokenizer, prompt: list[int], cfg: GenerationConfig) -> Iterator[str]:
    """Text deltas of one greedy/sampled sequence as they are generated: never half a UTF-8 character, never
    a stop string or any part of one; "".join(deltas) == generate_text(...)[0].text."""
    if cfg.num_beams > 1 or cfg.num_return_sequences > 1:
        raise ChoicelmError("streaming gives one sequence; use num_beams=1 and num_return_sequences=1 "
                            "(beam search only knows its best sequence at the end)")
    decoder = decoder_for(model)
    groups = sequences([prompt], cfg, tokenizer, decoder.device)
    for (seq,) in decode(decoder, groups):
        if seq.delta:
            yield seq.delta


def beam_completions(hyps, prompt: list[int], cfg: GenerationConfig, tokenizer, owner: int) -> list[Completion]:
    """Finished beam hypotheses as Completions: each read through a Sequence (EOS, stop strings, text)."""
    out = []
    for hyp in hyps:
        seq = Sequence(prompt, None, max_new_tokens=cfg.max_new_tokens, eos=cfg.eos_token_id, tokenizer=tokenizer,
                       stop=cfg.stop, tag=owner)
        for tok in hyp.ids:
            seq.accept(tok)
            if seq.done:
                break
        if not seq.done:
            seq.finish("length")
        out.append(completion(seq))
    return out
