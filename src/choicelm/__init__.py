"""choicelm: from raw text to a trained, served language model.

    import choicelm
    lm = choicelm.load("runs/shakespeare")
    print(lm.generate("ROMEO:", max_new_tokens=50, temperature=0.8, top_k=50))

Importing choicelm stays light: transformers, fastapi and matplotlib load only where used.
"""

from .core import __version__

__all__ = ["__version__", "load"]


def load(path, device: str = "auto"):
    """Load a run directory or checkpoint; see choicelm.api.load."""
    from .api import load as _load

    return _load(path, device)
