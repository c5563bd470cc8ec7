"""Text files -> token shards: `choicelm prepare`.

    manifest = prepare(["corpus/"], "tok/", "data/", val_fraction=0.1)

Every input file is one document: its ids, then `eot_id`. The documents are written, in input
order, as raw little-endian arrays (uint16 when the vocabulary fits, else uint32):

    data/train_000.bin, train_001.bin, ...   at most `shard_tokens` tokens each
    data/val_000.bin, ...                    only when a validation split was asked for
    data/tokenizer/                          a copy of the tokenizer (its sha256 is in the manifest)
    data/manifest.json                       written last; `read_manifest` documents its fields

The validation split is either named files (`val_files`), or a fraction: whole files when there
are enough of them (evenly spread over the sorted list, so deterministic), otherwise the last
`val_fraction` of the token stream. The output appears only when complete: it is built in a
temporary folder beside `out_dir` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..core import __version__
from ..core.errors import ChoicelmError, naming
from ..text import EOT, TextStats, Tokenizer, iter_text_files, list_text_files

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 2**26  # 128 MB of uint16 per shard
BATCH_BYTES = 16 << 20  # text encoded per batch call: bounds memory, keeps both cores busy


def prepare(inputs: list[str | os.PathLike], tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
            val_files: list[str] | None = None, val_fraction: float = 0.0, errors: str = "strict",
            overwrite: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Tokenize `inputs` (files or folders) into shards under `out_dir`; return the manifest."""
    started = time.perf_counter()
    out = Path(out_dir)
    if isinstance(val_files, (str, os.PathLike)):
        val_files = [str(val_files)]
    _check_options(val_files, val_fraction, shard_tokens)
    files = list_text_files(inputs)
    _check_out_dir(out, files, overwrite)
    tok = Tokenizer.load(tokenizer_dir)
    val_set, method = _choose_val(files, val_files, val_fraction)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # innermost first
    tmp.mkdir(parents=True)
    try:
        manifest = _write_all(tok, files, val_set, method, val_fraction, errors, shard_tokens, tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # a failed prepare leaves the disk as it found it
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    splits = manifest["splits"]
    log.info("prepared %s in %.1fs: %s", out, time.perf_counter() - started,
             ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in splits.items()))
    return manifest


# ----------------------------------------------------------------------------- checks

def _check_options(val_files, val_fraction, shard_tokens) -> None:
    if val_files and val_fraction:
        raise ChoicelmError("give either --val-files or --val-fraction, not both")
    if not (val_fraction == 0 or 0 < val_fraction <= 0.5):
        raise ChoicelmError(f"val_fraction={val_fraction} is out of range; use 0 (no validation split) "
                            f"or a number in (0, 0.5]")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ChoicelmError(f"shard_tokens={shard_tokens!r} must be a positive integer")


def _check_out_dir(out: Path, files: list[Path], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ChoicelmError(f"output {out} exists and is a file; choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ChoicelmError(f"output folder {out} exists and is not empty; nothing is overwritten. "
                            f"Choose another --out or pass --overwrite to replace it")
    root = out.resolve()
    inside = [f for f in files if root in f.resolve().parents]
    if inside:
        raise ChoicelmError(f"input file {inside[0]} lies inside the output folder {out}, which prepare "
                            f"replaces; move the inputs or choose another --out")


def _choose_val(files: list[Path], val_files: list[str] | None, val_fraction: float) -> tuple[set[Path], str]:
    """The files held out for validation and how they were chosen:
    "files" (named), "fraction-files" (every k-th file), "fraction-tokens" (stream tail), "none"."""
    if val_files:
        chosen = set()
        for name in val_files:
            matches = [f for f in files if _matches(f, name)]
            if not matches:
                some = ", ".join(f.name for f in files[:5]) + (", ..." if len(files) > 5 else "")
                raise ChoicelmError(f"validation file {name!r} is not among the inputs; name an input file "
                                    f"by its file name or path (inputs: {some})")
            chosen.update(matches)
        if len(chosen) == len(files):
            raise ChoicelmError("every input file is a validation file; leave at least one for training")
        return chosen, "files"
    if not val_fraction:
        return set(), "none"
    n_val = round(len(files) * val_fraction)
    if n_val >= 1 and len(files) - n_val >= 1:
        # Evenly spread picks (the middle of each of n_val equal runs of the list): deterministic,
        # and not all from one end of an alphabetical list.
        picks = {int((i + 0.5) * len(files) / n_val) for i in range(n_val)}
        return {files[i] for i in picks}, "fraction-files"
    return set(), "fraction-tokens"


def _matches(path: Path, name: str) -> bool:
    return path.name == name or str(path) == name or path.resolve() == Path(name).resolve()


# ----------------------------------------------------------------------------- writing

class ShardWriter:
    """Appends token arrays to `<split>_000.bin`, `<split>_001.bin`, ... of at most `shard_tokens`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            with naming(self.folder / self.shards[-1]["file"]):  # numpy's tofile names no file nor errno
                self._file.write(memoryview(np.ascontiguousarray(part, dtype=self.dtype)))
            self.shards[-1]["tokens"] += len(part)

    def close(self) -> list[dict]:
        self._close_file()
        return self.shards

    def abort(self) -> None:
        """Close the open shard without flushing it (after a failure; the folder is about to be deleted)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def _open_next(self) -> None:
        self._close_file()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            with naming(self.folder / self.shards[-1]["file"]):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            self._file = None


def _write_all(tok: Tokenizer, files: list[Path], val_set: set[Path], method: str, val_fraction: float,
               errors: str, shard_tokens: int, tmp: Path) -> dict:
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")
    stats = TextStats()
    writers = {"train": ShardWriter(tmp, "train", dtype, shard_tokens)}
    if method != "none":
        writers["val"] = ShardWriter(tmp, "val", dtype, shard_tokens)
    # With "fraction-tokens" every document goes to one unsharded stream first, which is cut in
    # two once its length is known.
    stream = ShardWriter(tmp, "all", dtype, 2**62) if method == "fraction-tokens" else None
    docs: dict[str, list[Doc]] = {name: [] for name in writers}

    try:
        for batch in _batches(iter_text_files(files, errors=errors, stats=stats)):
            encoded = tok.encode_documents([text for _, _, text in batch])
            for (path, n_bytes, _), ids in zip(batch, encoded):
                ids = np.asarray(ids + [tok.eot_id], dtype=np.int64)
                split = "val" if path in val_set else "train"
                (writers[split] if stream is None else stream).write(ids)
                docs[split].append(Doc(path, n_bytes, len(ids)))
            log.info("encoded %d files, %.1f MB of text", len(stats.files), stats.total_bytes / 1e6)

        if stream is not None:
            splits = _cut_stream(tok, stream, writers, docs["train"], val_fraction)
        else:
            splits = {name: (docs[name], sum(d.n_bytes for d in docs[name])) for name in writers}
        for name, (split_docs, _) in splits.items():
            if not split_docs:
                raise ChoicelmError(f"the {name} split is empty: all its files were skipped as not UTF-8 text; "
                                    f"fix those files or choose other validation files")

        tok.save(tmp / "tokenizer")
        manifest = {
            "format": "choicelm-tokens",
            "version": FORMAT_VERSION,
            "created_by": f"choicelm {__version__}",
            "dtype": dtype.name,
            "byteorder": "little",
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "tokenizer": {"dir": "tokenizer", "sha256": tok.sha256(), "kind": tok.kind},
            "val_method": method,
            "val_fraction": val_fraction,
            "skipped_files": [str(p) for p in stats.skipped],
            "splits": {name: {"tokens": writers[name].tokens,
                              "bytes": n_bytes,
                              "documents": len(split_docs),
                              "files": [str(d.path) for d in split_docs],
                              "shards": writers[name].close()}
                       for name, (split_docs, n_bytes) in splits.items()},
        }
    except BaseException:
        for writer in [*writers.values(), stream]:
            if writer is not None:
                writer.abort()  # close the open shard: a failed prepare keeps no descriptor into the folder
        raise
    _write_json(tmp / "manifest.json", manifest)
    return manifest


@dataclass
class Doc:
    path: Path
    n_bytes: int  # UTF-8 bytes of its text
    tokens: int  # its ids plus the eot after it


def _batches(texts: Iterator[tuple[Path, str]]) -> Iterator[list[tuple[Path, int, str]]]:
    """Group the texts into lists of (path, bytes, text) of about BATCH_BYTES of text each."""
    batch, size = [], 0
    for path, text in texts:
        n_bytes = len(text.encode("utf-8"))
        batch.append((path, n_bytes, text))
        size += n_bytes
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _cut_stream(tok: Tokenizer, stream: ShardWriter, writers: dict[str, ShardWriter], docs: list[Doc],
                val_fraction: float) -> dict[str, tuple[list[Doc], int]]:
    """Split the one-stream file: the last val_fraction of its tokens become the val split. A file
    cut in two is listed in both splits; bytes are counted per token (eot separators excluded)."""
    stream.close()
    path = stream.folder / stream.shards[0]["file"]
    total = stream.tokens
    cut = total - max(1, round(total * val_fraction))
    tokens = np.memmap(path, dtype=stream.dtype, mode="r", shape=(total,))
    byte_len = tok.token_byte_lengths()
    val_bytes = 0
    block = 1 << 24
    for start in range(0, total, block):
        part = np.asarray(tokens[start:start + block])
        if start + len(part) > cut:
            tail = part[max(0, cut - start):]
            writers["val"].write(tail)
            val_bytes += int(byte_len[tail].sum())
        if start < cut:
            writers["train"].write(part[:cut - start])
    del tokens
    path.unlink()

    ends = np.cumsum([d.tokens for d in docs])
    # The eot appended after each document is not text: take its bytes back out.
    val_bytes -= len(EOT.encode("utf-8")) * int((ends - 1 >= cut).sum())
    total_bytes = sum(d.n_bytes for d in docs)
    train_docs = [d for d, end in zip(docs, ends) if end - d.tokens < cut]
    val_docs = [d for d, end in zip(docs, ends) if end > cut]
    return {"train": (train_docs, total_bytes - val_bytes), "val": (val_docs, val_bytes)}


def _write_json(path: Path, obj: dict) -> None:
    with naming(path), open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` (allowed by the checks) goes only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
