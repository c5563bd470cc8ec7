"""Reading a corpus: folders expanded into files, UTF-8 insisted on, and the file and byte named when
it is not. Shared by `Tokenizer.train` and `choicelm prepare`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..core.errors import ChoicelmError

log = logging.getLogger(__name__)

ERRORS = ("strict", "skip")


@dataclass
class TextStats:
    """What `iter_text_files` read: filled in as it goes, complete once it is exhausted."""

    files: list[Path] = field(default_factory=list)    # files read (in order)
    n_bytes: list[int] = field(default_factory=list)   # UTF-8 bytes of each file read
    skipped: list[Path] = field(default_factory=list)  # files skipped as not UTF-8 text (errors="skip")

    @property
    def total_bytes(self) -> int:
        return sum(self.n_bytes)


def list_text_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand `paths` into files: a file stays, a folder gives all its regular files, recursively,
    sorted by path, skipping hidden files and folders (names starting with '.'). Order is kept
    across arguments; duplicates are dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ChoicelmError(f"folder {path} holds no (non-hidden) files; point --input at text files")
            out.extend(found)
        else:
            raise ChoicelmError(f"input path {path} does not exist; check the spelling or pass an existing file or folder")
    if not out:
        raise ChoicelmError("no input files given; pass at least one text file or folder")
    unique: dict[Path, Path] = {}  # resolved path -> path as given; keeps the first occurrence
    for p in out:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def read_text_file(path: Path) -> str:
    """The file's text, exactly (no newline translation). Not UTF-8 or binary -> ChoicelmError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ChoicelmError(f"cannot read {path}: {e.strerror}; check that the file is readable") from None
    nul = data.find(b"\0")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if nul < 0 or e.start < nul:
            raise ChoicelmError(f"{path} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at byte offset "
                                f"{e.start}; convert it to UTF-8 (e.g. iconv -t utf-8) or pass --errors=skip "
                                f"to leave such files out") from None
    if nul >= 0:
        raise ChoicelmError(f"{path} looks binary: NUL byte at byte offset {nul}; remove it from the inputs "
                            f"or pass --errors=skip to leave such files out")
    return text


def iter_text_files(paths: Iterable[str | os.PathLike], errors: str = "strict",
                    stats: TextStats | None = None) -> Iterator[tuple[Path, str]]:
    """Yield (path, text) for every file `list_text_files(paths)` finds.

    errors="strict": a file that is not UTF-8 text raises ChoicelmError naming the file and byte.
    errors="skip": such files are left out, logged, and listed in `stats.skipped`.
    Raises ChoicelmError at the end if the files held no text at all.
    """
    if errors not in ERRORS:
        raise ChoicelmError(f"errors={errors!r} is not allowed; choose strict or skip")
    stats = stats if stats is not None else TextStats()
    for path in list_text_files(paths):
        try:
            text = read_text_file(path)
        except ChoicelmError as e:
            if errors == "strict":
                raise
            stats.skipped.append(path)
            log.warning("skipping %s", e)
            continue
        stats.files.append(path)
        stats.n_bytes.append(len(text.encode("utf-8")))
        yield path, text
    if stats.skipped:
        log.warning("skipped %d file(s) that are not UTF-8 text", len(stats.skipped))
    if stats.total_bytes == 0:
        detail = f" ({len(stats.skipped)} skipped as not UTF-8 text)" if stats.skipped else ""
        raise ChoicelmError(f"the input files hold no text{detail}; pass files with some UTF-8 text in them")
