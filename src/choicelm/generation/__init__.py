"""Text generation for any choicelm decoder.

    options.py     GenerationConfig: every option, validated in one place
    processors.py  logits processors, in order: repetition penalty, no-repeat-n-gram, temperature,
                   top-k, top-p, min-p
    sampling.py    one sampling step
    beam.py        beam search over a `step` function (decoder-only or encoder-decoder)
    stopping.py    stop strings that span token boundaries
    streaming.py   token ids -> text deltas that never split a UTF-8 character
    generate.py    the batched decoding loop on a static KV cache (left padding, per-row stopping)
    step.py        decode_step(model): the model's fast decode step (GPT: models/gpt_decode.py) or its forward
    chat.py        the chat template and a session with history (the `chat` verb)
"""

from .generate import Completion, generate_ids, generate_text, stream_text
from .options import GenerationConfig

__all__ = ["Completion", "GenerationConfig", "generate_ids", "generate_text", "stream_text"]
