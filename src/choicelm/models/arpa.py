"""ARPA back-off files, the n-gram interchange format KenLM, SRILM and others read and write.

    \\data\\
    ngram 1=4
    ngram 2=3

    \\1-grams:
    -99	<s>	-0.30103          log10 P(w), the words, log10 backoff weight (absent = 0)
    -0.69897	</s>
    ...

    \\2-grams:
    -0.47712	<s> a
    ...

    \\end\\

Conventions followed (KenLM's): <s> has log10 probability -99 (it is never predicted); a
probability or backoff weight of 0 is written as -99 and -99 reads back as 0. Every prefix of a
listed n-gram must be listed (it carries the backoff weight).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ..core.errors import ChoicelmError

MAX_ORDER = 6  # the highest n-gram order choicelm counts, reads and writes
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ARPA's special words, which NGramLM uses as its own

LN10 = math.log(10.0)
MINUS_INF_LOG10 = -99.0
_COUNT = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)$")
_SECTION = re.compile(r"\\(\d+)-grams:$")


def _fmt(x: float) -> str:
    return "-99" if x <= MINUS_INF_LOG10 else f"{x:.8g}"


def write_arpa(lm, path: str | os.PathLike) -> Path:
    """Write `lm` (an NGramLM in backoff form) to `path`, atomically."""
    path = Path(path)
    R = lm.n_vocab
    vocab = np.array(lm.vocab, dtype=object)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n, keys in enumerate(lm.keys, start=1):
            f.write(f"ngram {n}={len(keys)}\n")
        words = None
        for n in range(1, lm.order + 1):
            keys = lm.keys[n - 1]
            # the words of every n-gram, rebuilt from the trie: prefix words, then the last word
            words = keys[:, None] if n == 1 else np.concatenate([words[keys // R], (keys % R)[:, None]], axis=1)
            text = vocab[words[:, 0]]
            for j in range(1, n):
                text = text + " " + vocab[words[:, j]]
            logp = lm.logp[n - 1] / LN10
            f.write(f"\n\\{n}-grams:\n")
            if n < lm.order:
                bow = lm.bow[n - 1] / LN10
                f.writelines(f"{_fmt(p)}\t{t}\t{_fmt(b)}\n" for p, t, b in zip(logp.tolist(), text, bow.tolist()))
            else:
                f.writelines(f"{_fmt(p)}\t{t}\n" for p, t in zip(logp.tolist(), text))
        f.write("\n\\end\\\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class _Lines:
    """Numbered lines of a file, for error messages that say where."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, encoding="utf-8")
        self.number = 0

    def next(self, expecting: str) -> str:
        try:
            line = next(self.file)
        except StopIteration:
            raise self.error(f"the file ends early (truncated?) while expecting {expecting}", self.number + 1) from None
        except UnicodeDecodeError:
            raise self.error("is not UTF-8 text", self.number + 1) from None
        self.number += 1
        return line.strip()

    def next_nonblank(self, expecting: str) -> str:
        line = ""
        while not line:
            line = self.next(expecting)
        return line

    def error(self, what: str, number: int | None = None) -> ChoicelmError:
        return ChoicelmError(f"{self.path} line {number or self.number}: {what}; "
                             f"it is not a valid ARPA file (re-create it, e.g. with `choicelm convert to-arpa`)")


def read_arpa(cls, path: str | os.PathLike, kind: str | None = None):
    """An NGramLM (smoothing "arpa", backoff form) with the probabilities of the ARPA file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise ChoicelmError(f"no ARPA file at {path}; write one with `choicelm convert to-arpa MODEL OUT.arpa`")
    if kind not in (None, "words", "ids"):
        raise ChoicelmError(f"kind={kind!r} is not known; choose words, ids, or None to guess")
    lines = _Lines(path)
    try:
        return _read(cls, lines, kind, BOS, EOS, UNK, MAX_ORDER)
    finally:
        lines.file.close()


def _read(cls, lines: _Lines, kind, BOS, EOS, UNK, MAX_ORDER):
    if lines.next_nonblank("\\data\\") != "\\data\\":
        raise lines.error("expected the header \\data\\")
    sizes = []
    line = lines.next_nonblank("'ngram 1=...'")
    while (m := _COUNT.match(line)) is not None:
        if int(m[1]) != len(sizes) + 1:
            raise lines.error(f"expected 'ngram {len(sizes) + 1}=...', got {line!r}")
        sizes.append(int(m[2]))
        line = lines.next("an n-gram section")
    if not sizes:
        raise lines.error(f"expected 'ngram 1=COUNT', got {line!r}")
    order = len(sizes)
    if order > MAX_ORDER:
        raise lines.error(f"order {order} is above the maximum {MAX_ORDER}")

    tables = []   # per order: (word lists, log10 p, log10 bow, line numbers)
    for n in range(1, order + 1):
        header = lines.next_nonblank(f"\\{n}-grams:")
        if header != f"\\{n}-grams:":
            raise lines.error(f"expected \\{n}-grams:, got {header[:60]!r}")
        grams, logp, bow, where = [], np.empty(sizes[n - 1]), np.zeros(sizes[n - 1]), np.empty(sizes[n - 1], np.int64)
        for i in range(sizes[n - 1]):
            line = lines.next(f"{sizes[n - 1]} {n}-grams (the header's count)")
            parts = line.split()
            if len(parts) not in (n + 1, n + 2) or (len(parts) == n + 2 and n == order):
                raise lines.error(f"expected log10-probability, {n} word(s)"
                                  f"{', optional backoff' if n < order else ''}; got {line[:80]!r}")
            try:
                logp[i] = float(parts[0])
                bow[i] = float(parts[n + 1]) if len(parts) == n + 2 else 0.0
            except ValueError:
                raise lines.error(f"a probability or backoff weight is not a number in {line[:80]!r}") from None
            grams.append(parts[1:n + 1])
            where[i] = lines.number
        tables.append((grams, logp, bow, where))
    if lines.next_nonblank("\\end\\") != "\\end\\":
        raise lines.error(f"expected \\end\\ after {sizes[-1]} {order}-grams (the header's count)")

    # the vocabulary, from the unigrams
    unigrams = [g[0] for g in tables[0][0]]
    plain = [w for w in unigrams if w not in (BOS, EOS, UNK)]
    for special in (BOS, EOS):
        if special not in unigrams:
            raise lines.error(f"the unigrams have no {special}", 1)
    if kind is None:
        kind = "ids" if plain and all(w.isdecimal() and w.isascii() for w in plain) else "words"
    if kind == "ids":
        if not all(w.isdecimal() and w.isascii() for w in plain):
            raise lines.error("kind='ids' needs every unigram to be a token id (or <s>, </s>, <unk>)", 1)
        V = 1 + max((int(w) for w in plain), default=-1)
        vocab = [str(i) for i in range(V)] + [BOS, EOS, UNK]
    else:
        vocab = [UNK, BOS, EOS] + plain
    index = {w: i for i, w in enumerate(vocab)}
    R = len(vocab)

    keys, logps, bows = [], [], []
    for n, (grams, logp10, bow10, where) in enumerate(tables, start=1):
        try:
            W = np.array([[index[w] for w in g] for g in grams], dtype=np.int64).reshape(len(grams), n)
        except KeyError as e:
            bad = next(i for i, g in enumerate(grams) if any(w not in index for w in g))
            raise lines.error(f"the word {e.args[0]!r} is not among the unigrams", int(where[bad])) from None
        logp = np.where(logp10 <= MINUS_INF_LOG10, -np.inf, logp10 * LN10)
        bow = np.where(bow10 <= MINUS_INF_LOG10, -np.inf, bow10 * LN10)
        if n == 1:
            if len(np.unique(W[:, 0])) != len(W):
                dup = np.flatnonzero(np.bincount(W[:, 0], minlength=R) > 1)[0]
                raise lines.error(f"the unigram {vocab[dup]!r} is listed twice", int(where[W[:, 0] == dup][1]))
            keys.append(np.arange(R, dtype=np.int64))
            lp, bw = np.full(R, -np.inf), np.zeros(R)
            lp[W[:, 0]], bw[W[:, 0]] = logp, bow
            logps.append(lp)
            bows.append(bw)
            continue
        idx = W[:, 0]                        # walk the trie along each n-gram's prefix
        for j in range(1, n - 1):
            q = idx * R + W[:, j]
            t = np.minimum(np.searchsorted(keys[j], q), len(keys[j]) - 1)
            found = keys[j][t] == q
            if not found.all():
                bad = int(np.flatnonzero(~found)[0])
                raise lines.error(f"the {n}-gram {' '.join(grams[bad])!r} has no entry for its prefix "
                                  f"{' '.join(grams[bad][:j + 1])!r}", int(where[bad]))
            idx = t
        key = idx * R + W[:, n - 1]
        perm = np.argsort(key, kind="stable")
        key = key[perm]
        dup = np.flatnonzero(key[1:] == key[:-1])
        if len(dup):
            raise lines.error(f"the {n}-gram {' '.join(grams[perm[dup[0] + 1]])!r} is listed twice",
                              int(where[perm[dup[0] + 1]]))
        keys.append(key)
        logps.append(logp[perm])
        bows.append(bow[perm])
    return cls(order, "arpa", vocab, index[BOS], index[EOS], index[UNK], keys, logps, bows[:order - 1] or None,
               kind=kind)
