"""choicelm: from raw text to a trained, served language model.

    import choicelm
    lm = choicelm.load("runs/shakespeare")
    print(lm.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=50))

Importing choicelm stays light: transformers, fastapi and matplotlib load only where used.
"""

from .core import __version__

__all__ = ["__version__", "load"]


def load(path, device: str = "auto", dtype: str | None = None):
    """Load a run directory (its newest complete checkpoint) or a step-XXXXXXXX folder: a LanguageModel with
    .model, .tokenizer, .generate, .stream (and .classify for a classifier). device: auto | cpu | cuda | cuda:N;
    dtype: None (as stored) | "fp32" | "bf16". See choicelm.api.load."""
    from .api import load as _load

    return _load(path, device, dtype)
