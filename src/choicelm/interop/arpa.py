"""`choicelm convert to-arpa`: an n-gram checkpoint as a standard ARPA file (KenLM, SRILM read it)."""

from __future__ import annotations

from pathlib import Path

from ..core import checkpoint as ckpt
from ..core.errors import ChoicelmError
from ..models.ngram import NGramLM


def to_arpa(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the n-gram model of `checkpoint` (a run or step folder) to the file `out` (never over an
    existing file unless overwrite). A token-id model's words are its tokenizer's ids as decimal numbers."""
    step_dir = ckpt.resolve_checkpoint(checkpoint)
    if not (step_dir / "ngram.json").is_file():
        raise ChoicelmError(f"{step_dir} is not an n-gram checkpoint (no ngram.json); only model.kind=ngram runs "
                            "have an ARPA form (convert to-hf exports neural models)")
    out = Path(out)
    if out.is_dir():
        raise ChoicelmError(f"{out} is a directory; give the ARPA file's path, e.g. {out / 'model.arpa'}")
    if out.exists() and not overwrite:
        raise ChoicelmError(f"{out} exists; pass --overwrite to replace it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    return NGramLM.load(step_dir).to_arpa(out)
