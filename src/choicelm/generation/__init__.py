"""Text generation for any choicelm decoder, on one engine.

    config.py      GenerationConfig: every option declared once (type, default, range, help, CLI flag, API field)
                   and validated in one place; the CLI flags and the server's request fields are made from it
    processors.py  every logit rule, in order: presence/frequency penalties, repetition penalty,
                   no-repeat-n-gram, temperature, top-k, top-p, min-p
    sampling.py    the one sampler: processors, then argmax or a seeded draw
    engine.py      the engine: sequences in the rows of one cache (left padding, per-row stopping, rows that
                   join and leave); generate, stream, beam search, seq2seq and the server all drive it
    step.py        the decoder of each model kind (causal LM, n-gram) and decode_step(model): the model's fast
                   decode step (GPT: models/gpt_decode.py) or its forward
    generate.py    generate_ids / generate_text / stream_text
    beam.py        beam search over a `step` function, made from the engine
    seq2seq.py     encoder-decoders: their decoder and generate_seq2seq
    stopping.py    stop strings that span token boundaries
    streaming.py   token ids -> text deltas that never split a UTF-8 character
    chat.py        the chat template and a session with history (the `chat` verb)

Importing this package (and config.py) loads no torch: the CLI builds its flags from the config.
"""

from .config import GenerationConfig

__all__ = ["Completion", "GenerationConfig", "generate_ids", "generate_text", "stream_text"]


def __getattr__(name):
    if name in ("Completion", "generate_ids", "generate_text", "stream_text"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
