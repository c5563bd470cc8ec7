"""Counted n-gram language model: interpolated modified Kneser-Ney, plain MLE and add-k.

    lm = NGramLM.fit(docs_of_token_ids, order=5, vocab_size=tok.vocab_size, tokenizer=tok)
    lm = NGramLM.fit_words(lines, order=3)               # whitespace words, one sentence per line
    lm.logprob(ids)                                      # natural-log P of each token, then of </s>
    lm.perplexity(docs)                                  # per predicted token (</s> included, as KenLM)
    lm.next_token_logprobs(context)                      # [n_vocab], sums to 1, for generation
    lm.save("dir/"); NGramLM.load("dir/")                # ngram.npz + ngram.json
    lm.to_arpa("lm.arpa"); NGramLM.from_arpa("lm.arpa")  # standard ARPA; KenLM reads it

Vocabulary. Every model id has a string (`lm.vocab`, used in ARPA files). Three specials exist in
every model: <unk>, <s>, </s>. Word models (`fit_words`) number them 0, 1, 2 and the words after
them (`WordVocab`). Token-id models (`fit`) keep the tokenizer's ids 0..V-1 as they are and append
<s> = V, </s> = V + 1, <unk> = V + 2, so `lm.next_token_logprobs(ctx)[:V]` lines up with the
tokenizer and `lm.eos_id` is where a document ends. <s> is only ever a context: P(<s>) = 0.

Boundaries follow KenLM: each sequence (a document, or a line in word mode) is scored as
`<s> w1 .. wn </s>`; n-grams never cross from one sequence into the next.

Smoothing (Chen & Goodman 1998, "An empirical study of smoothing techniques", section 3;
the same estimate as KenLM's lmplz):
- "kneser_ney": interpolated modified Kneser-Ney. Highest order and n-grams that start with <s>
  use raw counts; lower orders use continuation counts a(g) = N1+(. g), the number of distinct
  words seen before g. Per order, three discounts from the count-of-counts t1..t4 of a:
  Y = t1 / (t1 + 2 t2), D1 = 1 - 2Y t2/t1, D2 = 2 - 3Y t3/t2, D3+ = 3 - 4Y t4/t3, and
      p(w | h) = max(a(hw) - D(a(hw)), 0) / sum_x a(hx)  +  gamma(h) p(w | h'),
      gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / sum_x a(hx),
  where h' drops the oldest word of h; below unigrams is the uniform distribution over every
  word but <s>. A context never seen at this order passes straight to h'.
- "mle": the seed's formula, C(hw) / C(h.), in the longest context h seen in training (so unseen
  words after a seen context get probability 0: useful for teaching, not for evaluation).
- "add_k": (C(hw) + k) / (C(h.) + k |V|) in the longest context seen, |V| = words but <s>.

Kneser-Ney and MLE are stored the way ARPA files are: for every n-gram its full interpolated
log-probability, for every context its backoff weight gamma(h). A query takes the longest n-gram
found and adds the backoff weights of the longer contexts that were found. Pruning singletons
(orders >= 3) drops those n-grams and recomputes the backoff weights so that every context
still sums to 1. Add-k keeps counts instead (it has no ARPA form).

Storage is a trie flattened into sorted int64 keys, one array per order: the n-gram (h, w) has
key = index_of_h_in_order_n-1 * n_vocab + w. Counting is np.unique over those keys for every
position of the corpus (no Python object per n-gram). Queries walk the trie for every position of
a token array at once, one order at a time, through a vectorised hash table (`KeyIndex`, built on
first use: several times faster than np.searchsorted on large tables). Memory is a few arrays the
size of the number of distinct n-grams (the hash tables: 2-4 int64 slots per n-gram).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..core.errors import ChoicelmError
from .arpa import BOS, EOS, MAX_ORDER, UNK, read_arpa, write_arpa

log = logging.getLogger(__name__)

SMOOTHINGS = ("kneser_ney", "mle", "add_k")
KENLM_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback values
NPZ, META = "ngram.npz", "ngram.json"
FORMAT_VERSION = 1
SCORE_CHUNK = 1 << 20  # tokens scored per vectorised pass in score()


# ----------------------------------------------------------------------------- word vocabulary

class WordVocab:
    """Whitespace words, as KenLM and SRILM count them: <unk> = 0, <s> = 1, </s> = 2, then the
    training words by falling frequency (ties alphabetical). A word not in the list encodes to <unk>."""

    def __init__(self, words: Sequence[str]):
        if list(words[:3]) != [UNK, BOS, EOS]:
            raise ChoicelmError(f"a word vocabulary starts with {UNK}, {BOS}, {EOS}; got {list(words[:3])}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ChoicelmError("the word vocabulary lists a word twice; rebuild it with WordVocab.build")

    @classmethod
    def build(cls, lines: Iterable[str], min_count: int = 1, max_size: int | None = None) -> "WordVocab":
        """Words seen at least `min_count` times, the `max_size` most frequent (specials not counted)."""
        counts = Counter()
        for line in lines:
            counts.update(line.split())
        _check_no_specials(counts)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([UNK, BOS, EOS] + ranked[:max_size])

    def encode(self, line: str) -> np.ndarray:
        """Word ids of one line (no <s> or </s> added); unknown words become <unk>."""
        words = line.split()
        _check_no_specials(words)
        return np.fromiter((self.index.get(w, 0) for w in words), dtype=np.int64, count=len(words))

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.words).encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.words)


def _check_no_specials(words: Iterable[str]) -> None:
    for special in (BOS, EOS):
        if special in words:
            raise ChoicelmError(f"the text contains the word {special!r}, which marks sentence boundaries; "
                                f"remove it (every line is already a sentence)")


# ----------------------------------------------------------------------------- the model

class NGramLM:
    """A counted n-gram LM over model ids 0..n_vocab-1 (see the module docstring for the layout)."""

    def __init__(self, order: int, smoothing: str, vocab: list[str], bos_id: int, eos_id: int, unk_id: int,
                 keys: list[np.ndarray], logp: list[np.ndarray] | None = None, bow: list[np.ndarray] | None = None,
                 counts: list[np.ndarray] | None = None, ctx_total: list[np.ndarray] | None = None,
                 k: float | None = None, discounts: list[list[float]] | None = None, kind: str = "words",
                 tokenizer_sha256: str | None = None):
        self.order = order
        self.smoothing = smoothing    # kneser_ney, mle, add_k, or arpa (read from a file)
        self.vocab = vocab            # string of every model id
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.keys = keys              # keys[n-1]: sorted int64 keys of the order-n table
        self.logp = logp              # logp[n-1]: natural-log P of each n-gram (backoff form)
        self.bow = bow                # bow[n-1]: natural-log backoff weight of each n-gram as a context (n < order)
        self.counts = counts          # counts[n-1]: raw count of each n-gram (None when read from ARPA)
        self.ctx_total = ctx_total    # add_k: ctx_total[n-1][i] = sum of counts after context i of order n-1
        self.k = k
        self.discounts = discounts    # kneser_ney: [D1, D2, D3+] per order
        self.kind = kind              # "words" (whitespace words) or "ids" (a choicelm tokenizer's ids)
        self.tokenizer_sha256 = tokenizer_sha256
        self.words = WordVocab(vocab) if kind == "words" else None
        self._key_index: list[KeyIndex | None] | None = None

    # --- facts

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        """Ids a caller may pass: the tokenizer's vocabulary (ids mode) or every word id (words mode)."""
        return self.n_vocab - 3 if self.kind == "ids" else self.n_vocab

    def num_ngrams(self) -> list[int]:
        return [len(k) for k in self.keys]

    def __repr__(self) -> str:
        return (f"NGramLM(order={self.order}, smoothing={self.smoothing!r}, kind={self.kind!r}, "
                f"n_vocab={self.n_vocab}, ngrams={self.num_ngrams()})")

    # --- building

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], order: int, vocab_size: int | None = None,
            smoothing: str = "kneser_ney", prune_singletons: bool = False, k: float = 1.0,
            discount_fallback: bool = False, discounts: Sequence[Sequence[float]] | None = None,
            tokenizer=None) -> "NGramLM":
        """Count `sequences` (documents of token ids in 0..vocab_size-1) and estimate the model.

        tokenizer: the choicelm Tokenizer the ids come from (its vocab_size and hash are kept, so
        scoring with another tokenizer is refused). discount_fallback: when the count-of-counts
        give no valid Kneser-Ney discounts (tiny corpora), use KenLM's 0.5, 1, 1.5 instead of failing.
        discounts: fixed [D1, D2, D3+] for every order (a list of `order` triples) instead of estimating them.
        """
        _check_options(order, smoothing, prune_singletons, k)
        seqs = _as_sequences(sequences)
        if tokenizer is not None:
            vocab_size = tokenizer.vocab_size if vocab_size is None else vocab_size
        if vocab_size is None:
            vocab_size = 1 + max((int(s.max()) for s in seqs if len(s)), default=-1)
        if vocab_size < 1:
            raise ChoicelmError("the training text is empty: there are no tokens to count; pass some text")
        _check_ids(np.concatenate(seqs) if seqs else np.zeros(0, np.int64), vocab_size, "training")
        vocab = [str(i) for i in range(vocab_size)] + [BOS, EOS, UNK]
        sha = tokenizer.sha256() if tokenizer is not None else None
        return cls._estimate(seqs, order, vocab, vocab_size, vocab_size + 1, vocab_size + 2, "ids", sha,
                             smoothing, prune_singletons, k, discount_fallback, discounts)

    @classmethod
    def fit_words(cls, lines: Iterable[str], order: int, smoothing: str = "kneser_ney",
                  prune_singletons: bool = False, k: float = 1.0, discount_fallback: bool = False,
                  discounts: Sequence[Sequence[float]] | None = None, min_count: int = 1,
                  max_vocab: int | None = None) -> "NGramLM":
        """Count whitespace words, one sentence per line (blank lines are skipped), as KenLM does.
        Words seen fewer than `min_count` times (or beyond the `max_vocab` most frequent) become <unk>."""
        _check_options(order, smoothing, prune_singletons, k)
        lines = [line for line in lines if line.strip()]
        words = WordVocab.build(lines, min_count, max_vocab)
        seqs = [words.encode(line) for line in lines]
        return cls._estimate(seqs, order, words.words, 1, 2, 0, "words", words.sha256(),
                             smoothing, prune_singletons, k, discount_fallback, discounts)

    @classmethod
    def _estimate(cls, seqs, order, vocab, bos_id, eos_id, unk_id, kind, sha, smoothing, prune, k, fallback,
                  discounts):
        fixed = _check_discounts(discounts, order, smoothing)
        seqs = [s for s in seqs if len(s)]
        if not seqs:
            raise ChoicelmError("the training text is empty: there are no tokens to count; pass some text")
        R = len(vocab)
        tok_T, after_T, _ = _stream(seqs, bos_id, eos_id)
        keys, counts, suffix, first = _count(tok_T, after_T, order, R)
        lm = cls(order, smoothing, vocab, bos_id, eos_id, unk_id, keys, counts=counts, k=k, kind=kind,
                 tokenizer_sha256=sha)
        if smoothing == "add_k":
            lm.ctx_total = [np.array([counts[0].sum() - counts[0][bos_id]])] + [
                np.bincount(keys[n] // R, weights=counts[n], minlength=len(keys[n - 1])) for n in range(1, order)]
            return lm
        lm.logp, lm.bow, lm.discounts = _interpolate(keys, counts, suffix, first, R, bos_id, smoothing, fallback, fixed)
        if prune:
            _prune_singletons(lm, suffix)
        return lm

    # --- scoring

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse to score ids from a tokenizer other than the one this model was counted with."""
        sha = tokenizer if isinstance(tokenizer, str) else tokenizer.sha256()
        if self.kind == "words":
            raise ChoicelmError("this n-gram model counts whitespace words, not a tokenizer's ids; score text with "
                                "lm.logprob_text(line) (or rebuild the model with that tokenizer)")
        if self.tokenizer_sha256 is not None and sha != self.tokenizer_sha256:
            raise ChoicelmError("these ids come from a different tokenizer than the one this n-gram model was "
                                "counted with; use the model's own tokenizer or rebuild the model")

    def logprob(self, ids: Sequence[int], bos: bool = True, eos: bool = True, tokenizer=None) -> np.ndarray:
        """Natural-log probability of each token of one sequence given the ones before it (and <s>),
        then of </s> when eos: shape [len(ids) + eos]."""
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)
        logp, _ = self._score([ids], bos, eos)
        return logp

    def logprob_text(self, line: str, bos: bool = True, eos: bool = True) -> np.ndarray:
        """logprob() of one line of whitespace words (word models only)."""
        return self.logprob(self._words().encode(line), bos, eos)

    def score(self, sequences: Iterable[Sequence[int]], bos: bool = True, eos: bool = True) -> tuple[float, int]:
        """(total natural-log probability, number of predicted tokens) over many sequences, scored
        vectorised in chunks of about a million tokens (memory stays bounded for any corpus)."""
        seqs = _as_sequences(sequences)
        total, n, start = 0.0, 0, 0
        ends = np.cumsum([len(s) + 2 for s in seqs])
        while start < len(seqs):
            stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + SCORE_CHUNK)))
            logp, _ = self._score(seqs[start:stop], bos, eos, checked=True)
            total, n, start = total + float(logp.sum()), n + len(logp), stop
        return total, n

    def perplexity(self, sequences: Iterable[Sequence[int]], bos: bool = True, eos: bool = True) -> float:
        """exp(-mean log-probability) per predicted token, </s> included (KenLM's convention)."""
        total, n = self.score(sequences, bos, eos)
        if n == 0:
            raise ChoicelmError("there are no tokens to score; pass some text")
        return float(np.exp(-total / n))

    def _words(self) -> WordVocab:
        if self.words is None:
            raise ChoicelmError("this n-gram model counts a tokenizer's ids, not words; encode the text with "
                                "that tokenizer and call lm.logprob(ids)")
        return self.words

    def _score(self, sequences, bos: bool, eos: bool, checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities of every predicted position of the concatenated sequences (and the
        positions in the stream they belong to)."""
        seqs = sequences if checked else _as_sequences(sequences)
        flat = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        _check_ids(flat, self.vocab_size, "scoring")
        if self.kind == "words" and np.any((flat == self.bos_id) | (flat == self.eos_id)):
            raise ChoicelmError(f"ids contain {BOS} or {EOS}; they are added by the model (bos=, eos=)")
        tok_T, after_T, back_T = _stream(seqs, self.bos_id if bos else None, self.eos_id if eos else None, flat)
        pos = np.flatnonzero(~((back_T == 0) & bos)) if len(tok_T) else np.zeros(0, np.int64)
        G = self._index(tok_T, after_T)
        if self.smoothing == "add_k":
            return self._score_add_k(G, pos, back_T), pos
        out = np.zeros(len(pos))
        todo = np.ones(len(pos), dtype=bool)
        for n in range(self.order, 0, -1):      # longest n-gram first; add backoff weights on the way down
            sel = np.flatnonzero(todo & (back_T[pos] >= n - 1))
            start = pos[sel] - (n - 1)
            g = G[n - 1][start]
            hit = g >= 0
            out[sel[hit]] += self.logp[n - 1][g[hit]]
            todo[sel[hit]] = False
            if n > 1:
                miss, c = sel[~hit], G[n - 2][start[~hit]]
                out[miss[c >= 0]] += self.bow[n - 2][c[c >= 0]]
        return out, pos

    def _score_add_k(self, G, pos, back_T) -> np.ndarray:
        n_pred = self.n_vocab - 1
        out = np.full(len(pos), np.nan)
        for n in range(self.order, 0, -1):      # the longest context seen in training decides
            sel = np.flatnonzero(np.isnan(out) & (back_T[pos] >= n - 1))
            start = pos[sel] - (n - 1)
            if n > 1:
                c = G[n - 2][start]
                ok = c >= 0
                ok[ok] = self.ctx_total[n - 1][c[ok]] > 0
                sel, start, c = sel[ok], start[ok], c[ok]
                total = self.ctx_total[n - 1][c]
            else:
                total = np.full(len(sel), float(self.ctx_total[0][0]))
            g = G[n - 1][start]
            count = np.where(g >= 0, self.counts[n - 1][np.maximum(g, 0)], 0)
            out[sel] = np.log((count + self.k) / (total + self.k * n_pred))
        return out

    def _index(self, tok_T: np.ndarray, after_T: np.ndarray) -> list[np.ndarray]:
        """G[n-1][s] = table index of the n-gram starting at stream position s, or -1 if unseen."""
        R = self.n_vocab
        if self._key_index is None:             # built on first use: fit and load stay fast
            self._key_index = [None] + [KeyIndex(k) for k in self.keys[1:]]
        G = [tok_T.copy()]
        for n in range(2, self.order + 1):
            prev = G[-1]
            s = np.flatnonzero((after_T >= n - 1) & (prev >= 0))
            g = np.full(len(tok_T), -1, dtype=np.int64)
            g[s] = self._key_index[n - 1].find(prev[s] * R + tok_T[s + n - 1])
            G.append(g)
        return G

    def count(self, ngram: Sequence[int]) -> int:
        """Times the n-gram (model ids, <s>/</s> included where they belong) was seen in training."""
        if self.counts is None:
            raise ChoicelmError("this model was read from an ARPA file, which keeps no counts")
        ngram = [int(i) for i in ngram]
        if not 1 <= len(ngram) <= self.order:
            raise ChoicelmError(f"an n-gram of this model has 1 to {self.order} ids; got {len(ngram)}")
        _check_ids(np.array(ngram, dtype=np.int64), self.n_vocab, "n-gram")
        i = self._find(ngram)
        return int(self.counts[len(ngram) - 1][i]) if i >= 0 else 0

    def _find(self, ngram: Sequence[int]) -> int:
        """Table index of one n-gram (of model ids), or -1."""
        idx = int(ngram[0])
        for n, w in enumerate(ngram[1:], start=2):
            key = idx * self.n_vocab + int(w)
            j = int(np.searchsorted(self.keys[n - 1], key))
            if j == len(self.keys[n - 1]) or self.keys[n - 1][j] != key:
                return -1
            idx = j
        return idx

    # --- generation

    def next_token_logprobs(self, context: Sequence[int], bos: bool = True) -> np.ndarray:
        """Natural-log P(next | <s> + context) over every model id: [n_vocab], sums to 1, P(<s>) = 0."""
        ctx = [self.bos_id] * bos + [int(i) for i in np.asarray(context, dtype=np.int64).reshape(-1)]
        _check_ids(np.asarray(ctx[bos:], dtype=np.int64), self.n_vocab, "context")
        ctx = ctx[len(ctx) - min(len(ctx), self.order - 1):]
        R = self.n_vocab
        if self.smoothing == "add_k":
            for n in range(len(ctx) + 1, 0, -1):
                h = self._find(ctx[len(ctx) - n + 1:]) if n > 1 else 0
                if h >= 0 and self.ctx_total[n - 1][h] > 0:
                    break
            denom = self.ctx_total[n - 1][h] + self.k * (R - 1)
            p = np.full(R, self.k / denom)
            lo, hi = np.searchsorted(self.keys[n - 1], [h * R, (h + 1) * R]) if n > 1 else (0, R)
            p[self.keys[n - 1][lo:hi] % R] = (self.counts[n - 1][lo:hi] + self.k) / denom
            p[self.bos_id] = 0.0
            with np.errstate(divide="ignore"):
                return np.log(p)
        lp = self.logp[0].copy()
        for n in range(2, len(ctx) + 2):        # replace by longer n-grams where seen, back off elsewhere
            h = self._find(ctx[len(ctx) - n + 1:])
            if h < 0:
                break
            lp += self.bow[n - 2][h]
            lo, hi = np.searchsorted(self.keys[n - 1], [h * R, (h + 1) * R])
            lp[self.keys[n - 1][lo:hi] % R] = self.logp[n - 1][lo:hi]
        return lp

    # --- save / load

    def save(self, out_dir: str | os.PathLike) -> Path:
        """out_dir/ngram.npz (the tables) and out_dir/ngram.json (the rest), each written atomically;
        the json goes last, so a directory with it is complete."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name in ("keys", "logp", "bow", "counts", "ctx_total"):
            for n, a in enumerate(getattr(self, name) or [], start=1):
                arrays[f"{name}_{n}"] = a
        tmp = out / (NPZ + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / NPZ)
        meta = {"format": "choicelm-ngram", "version": FORMAT_VERSION, "order": self.order,
                "smoothing": self.smoothing, "kind": self.kind, "k": self.k, "discounts": self.discounts,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id,
                "tokenizer_sha256": self.tokenizer_sha256, "num_ngrams": self.num_ngrams(), "vocab": self.vocab}
        tmp = out / (META + ".tmp")
        tmp.write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out / META)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NGramLM":
        path = Path(path)
        if not (path / META).is_file() or not (path / NPZ).is_file():
            raise ChoicelmError(f"{path} holds no complete n-gram model ({META} and {NPZ}); build one with "
                                f"NGramLM.fit(...).save(dir) or `choicelm pretrain` with model kind ngram")
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
            with np.load(path / NPZ) as z:
                arrays = {name: z[name] for name in z.files}
        except (ValueError, OSError) as e:
            raise ChoicelmError(f"{path} holds a damaged n-gram model ({e}); rebuild it") from None
        if meta.get("format") != "choicelm-ngram" or meta.get("version") != FORMAT_VERSION:
            raise ChoicelmError(f"{path / META} is not a choicelm n-gram model of format version {FORMAT_VERSION}")

        def tables(name):
            found = [arrays.get(f"{name}_{n}") for n in range(1, meta["order"] + 1)]
            found = [a for a in found if a is not None]
            return found or None

        return cls(meta["order"], meta["smoothing"], meta["vocab"], meta["bos_id"], meta["eos_id"], meta["unk_id"],
                   tables("keys"), tables("logp"), tables("bow"), tables("counts"), tables("ctx_total"),
                   meta["k"], meta["discounts"], meta["kind"], meta["tokenizer_sha256"])

    def to_arpa(self, path: str | os.PathLike) -> Path:
        """Write a standard ARPA file (log10 probabilities and backoff weights) that KenLM loads."""
        if self.smoothing == "add_k":
            raise ChoicelmError("an add-k model has no ARPA form (it does not back off); "
                                "build it with smoothing kneser_ney or mle to write ARPA")
        return write_arpa(self, path)

    @classmethod
    def from_arpa(cls, path: str | os.PathLike, kind: str | None = None) -> "NGramLM":
        """Read an ARPA file. kind "ids" when its words are a tokenizer's ids 0..V-1 (as written by a
        token-id model), "words" otherwise; None guesses from the words."""
        return read_arpa(cls, path, kind)


# ----------------------------------------------------------------------------- counting

def _check_options(order, smoothing, prune, k) -> None:
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 1 <= order <= MAX_ORDER:
        raise ChoicelmError(f"n-gram order={order!r} is not allowed; choose an integer from 1 to {MAX_ORDER}")
    if smoothing not in SMOOTHINGS:
        raise ChoicelmError(f"smoothing={smoothing!r} is not known; choose one of {', '.join(SMOOTHINGS)}")
    if smoothing == "add_k" and not (np.isfinite(k) and k > 0):
        raise ChoicelmError(f"add-k needs k > 0 (got k={k}); k=1 is Laplace smoothing")
    if smoothing == "add_k" and prune:
        raise ChoicelmError("pruning needs a backoff model; use smoothing kneser_ney or mle with prune_singletons")


def _check_discounts(discounts, order, smoothing) -> list[list[float]] | None:
    if discounts is None:
        return None
    if smoothing != "kneser_ney":
        raise ChoicelmError("discounts are a Kneser-Ney setting; drop them or use smoothing kneser_ney")
    fixed = [[float(d) for d in row] for row in discounts]
    if len(fixed) != order or any(len(row) != 3 or not all(0 <= d <= i + 1 for i, d in enumerate(row))
                                  for row in fixed):
        raise ChoicelmError(f"discounts must be {order} triples [D1, D2, D3+] with 0 <= Di <= i (got {discounts})")
    return fixed


def _as_sequences(sequences) -> list[np.ndarray]:
    """A list of 1-D int64 arrays, or one clear error for text or a flat array of ids."""
    if isinstance(sequences, str):
        sequences = [sequences]                 # reported below
    out = []
    for s in sequences:
        if type(s) is np.ndarray and s.ndim == 1 and s.dtype == np.int64:
            out.append(s)                       # the common case, kept cheap: scoring is per token
            continue
        if isinstance(s, str):
            raise ChoicelmError("pass token ids, not text; for a word model use fit_words(lines) / "
                                "lm.logprob_text(line)")
        try:
            a = np.asarray(s)
        except ValueError:                      # ragged nesting
            a = np.asarray(s, dtype=object)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ChoicelmError(f"pass a list of sequences of integer ids (one per document or sentence), e.g. "
                                f"[ids] for one; got an element of shape {a.shape} and type {a.dtype}")
        out.append(a.astype(np.int64, copy=False))
    return out


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ChoicelmError(f"{what} id {bad} is outside this model's vocabulary 0..{vocab_size - 1}; the ids come "
                            f"from a different tokenizer or vocabulary than the model's")


def _stream(seqs, bos_id, eos_id, flat=None):
    """Concatenate `[<s>] + seq + [</s>]` for every sequence (`flat`: the sequences already joined).
    Returns the tokens and, per position, how many tokens of its own sequence follow it (after) and
    precede it (back)."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64) + (bos_id is not None) + (eos_id is not None)
    ends = np.cumsum(lens)
    starts = ends - lens
    T = int(ends[-1]) if len(ends) else 0
    tok_T = np.empty(T, dtype=np.int64)
    inner = np.ones(T, dtype=bool)
    if bos_id is not None:
        inner[starts[lens > 0]] = False
        tok_T[starts[lens > 0]] = bos_id
    if eos_id is not None:
        inner[ends[lens > 0] - 1] = False
        tok_T[ends[lens > 0] - 1] = eos_id
    if seqs:
        tok_T[inner] = np.concatenate(seqs) if flat is None else flat
    arange_T = np.arange(T, dtype=np.int64)
    after_T = np.repeat(ends - 1, lens) - arange_T
    back_T = arange_T - np.repeat(starts, lens)
    return tok_T, after_T, back_T


class KeyIndex:
    """A hash table from n-gram key to its row in the sorted key array: open addressing, linear
    probing, Fibonacci hashing, load <= 1/2. A lookup costs one or two random reads where a binary
    search over a large table costs ~20 (3-4x faster for a whole token array). Both build and lookup
    are vectorised: every round places (or probes) all pending keys at once."""

    GOLDEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, keys: np.ndarray):
        bits = max(2, (2 * len(keys) - 1).bit_length())
        self.mask = (1 << bits) - 1
        self.shift = np.uint64(64 - bits)
        self.rows_S = np.full(1 << bits, -1, dtype=np.int64)  # row of the key in each slot, -1 = empty
        pending, slot = np.arange(len(keys)), self._hash(keys)
        while len(pending):
            free = self.rows_S[slot] < 0
            self.rows_S[slot[free]] = pending[free]       # colliding writers: the last one wins the slot
            lost = self.rows_S[slot] != pending
            pending, slot = pending[lost], (slot[lost] + 1) & self.mask
        self.keys_S = np.where(self.rows_S >= 0, keys[np.maximum(self.rows_S, 0)] if len(keys) else -1, -1)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * self.GOLDEN) >> self.shift).astype(np.int64)

    def find(self, query: np.ndarray) -> np.ndarray:
        """Row of every query key in the sorted key array, or -1 where it is absent."""
        out = np.full(len(query), -1, dtype=np.int64)
        pending, slot = np.arange(len(query)), self._hash(query)
        while len(pending):
            k = self.keys_S[slot]
            hit = k == query
            out[pending[hit]] = self.rows_S[slot[hit]]
            go = (k >= 0) & ~hit                             # occupied by another key: probe on
            pending, slot, query = pending[go], (slot[go] + 1) & self.mask, query[go]
        return out


def _count(tok_T, after_T, order, R):
    """Distinct n-grams of every order with their raw counts. Also, per table entry, the index of its
    suffix (the n-gram without its first word, in the order n-1 table) and its first word."""
    keys = [np.arange(R, dtype=np.int64)]
    counts = [np.bincount(tok_T, minlength=R).astype(np.int64)]
    suffix, first = [None], [keys[0]]
    G = tok_T
    for n in range(2, order + 1):
        if len(keys[-1]) * R >= 2 ** 63:
            raise ChoicelmError(f"{len(keys[-1])} distinct {n - 1}-grams over {R} words overflow the 64-bit keys; "
                                f"lower the order or the vocabulary size")
        s = np.flatnonzero(after_T >= n - 1)
        uniq, inverse, c = np.unique(G[s] * R + tok_T[s + n - 1], return_inverse=True, return_counts=True)
        rep = np.empty(len(uniq), dtype=np.int64)
        rep[inverse] = s                        # any one occurrence of each distinct n-gram
        suffix.append(G[rep + 1])               # G is still the order n-1 index here
        first.append(tok_T[rep])
        G = np.full(len(tok_T), -1, dtype=np.int64)
        G[s] = inverse
        keys.append(uniq)
        counts.append(c.astype(np.int64))
    return keys, counts, suffix, first


# ----------------------------------------------------------------------------- estimating

def _discounts(a: np.ndarray, n: int, fallback: bool) -> list[float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ from the count-of-counts t1..t4 of order n."""
    t = np.bincount(a[a > 0].clip(max=5).astype(np.int64), minlength=6)[1:5].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        Y = t[0] / (t[0] + 2 * t[1])
        D = [1 - 2 * Y * t[1] / t[0], 2 - 3 * Y * t[2] / t[1], 3 - 4 * Y * t[3] / t[2]]
    if all(np.isfinite(d) and 0 <= d <= i + 1 for i, d in enumerate(D)):
        return [float(d) for d in D]
    if not fallback:
        raise ChoicelmError(f"order {n} has count-of-counts t1..t4 = {t.astype(int).tolist()}, which give no valid "
                            f"Kneser-Ney discounts (the text is too small); add text, lower the order, or pass "
                            f"discount_fallback=True to use KenLM's {KENLM_FALLBACK_DISCOUNTS}")
    log.warning("order %d: count-of-counts %s give no valid discounts; using %s", n, t.astype(int).tolist(),
                KENLM_FALLBACK_DISCOUNTS)
    return list(KENLM_FALLBACK_DISCOUNTS)


def _interpolate(keys, counts, suffix, first, R, bos_id, smoothing, fallback, fixed=None):
    """Backoff-form tables (natural-log P of every n-gram, log backoff weight of every context),
    order by order from unigrams up: p_n = alpha + gamma(context) * p_{n-1}(suffix)."""
    order = len(keys)
    kn = smoothing == "kneser_ney"
    logp, bow, discounts = [], [], []
    p_prev = None
    for n in range(1, order + 1):
        a = counts[n - 1].astype(np.float64)
        if kn and n < order:                    # continuation counts, except for n-grams that start with <s>
            cont = np.bincount(suffix[n], minlength=len(keys[n - 1])).astype(np.float64)
            a = np.where(first[n - 1] == bos_id, a, cont)
        if n == 1:
            a[bos_id] = 0.0                     # <s> is never predicted
        ctx = keys[n - 1] // R if n > 1 else np.zeros(R, dtype=np.int64)
        n_ctx = len(keys[n - 2]) if n > 1 else 1
        total = np.bincount(ctx, weights=a, minlength=n_ctx)
        if kn:
            D = fixed[n - 1] if fixed is not None else _discounts(a, n, fallback)
            discounts.append(D)
            d = np.array([0.0] + D)[np.minimum(a, 3).astype(np.int64)]    # D(0) = 0: unseen unigrams
            mass = np.bincount(ctx, weights=d, minlength=n_ctx)
        else:
            d, mass = 0.0, np.zeros(n_ctx)
        seen = total > 0
        gamma = np.where(seen, mass / np.where(seen, total, 1.0), 1.0)
        alpha = np.maximum(a - d, 0.0) / np.where(seen, total, 1.0)[ctx]
        lower = 1.0 / (R - 1) if n == 1 else p_prev[suffix[n - 1]]
        p = alpha + gamma[ctx] * lower
        if n == 1:
            p[bos_id] = 0.0
        with np.errstate(divide="ignore"):
            logp.append(np.log(p))
            if n > 1:
                bow.append(np.log(gamma))       # contexts never followed at this order keep weight 1
        p_prev = p
    return logp, bow, discounts or None


def _prune_singletons(lm: NGramLM, suffix) -> None:
    """Drop n-grams of order >= 3 seen once. A kept n-gram's prefix and suffix are kept too (they
    were seen at least as often), so the trie stays whole; backoff weights are recomputed so that
    kept n-grams plus the backed-off rest still sum to 1 in every context:
        bow(h) = (1 - sum_kept p(w | h)) / (1 - sum_kept p(w | h'))."""
    R = lm.n_vocab
    keep = [np.ones(len(k), dtype=bool) for k in lm.keys]
    for n in range(3, lm.order + 1):
        keep[n - 1] = lm.counts[n - 1] >= 2
    for n in range(3, lm.order + 1):
        kept = keep[n - 1]
        ctx = lm.keys[n - 1][kept] // R
        size = len(lm.keys[n - 2])
        s_hi = np.bincount(ctx, weights=np.exp(lm.logp[n - 1][kept]), minlength=size)
        s_lo = np.bincount(ctx, weights=np.exp(lm.logp[n - 2][suffix[n - 1][kept]]), minlength=size)
        with np.errstate(divide="ignore", invalid="ignore"):
            lm.bow[n - 2] = np.where(s_hi > 0, np.log(np.maximum(1 - s_hi, 0)) - np.log(1 - s_lo), 0.0)
    new_index = [np.cumsum(m) - 1 for m in keep]
    for n in range(1, lm.order + 1):
        m = keep[n - 1]
        keys = lm.keys[n - 1][m]
        if n > 1:
            keys = new_index[n - 2][keys // R] * R + keys % R
        lm.keys[n - 1] = keys
        lm.logp[n - 1] = lm.logp[n - 1][m]
        lm.counts[n - 1] = lm.counts[n - 1][m]
        if n < lm.order:
            lm.bow[n - 1] = lm.bow[n - 1][m]


def score_stream(lm: "NGramLM", ids: np.ndarray, eot_id: int) -> tuple[float, int]:
    """(total natural-log probability, predictions) of a token stream as documents cut at <|endoftext|>:
    each document's tokens, then </s> for the <|endoftext|> that ends it. After the last one comes either
    nothing or a document the stream cuts off, whose tokens are scored but not an end it does not have;
    so the predictions are exactly the stream's tokens, as for a neural model (evaluation/perplexity.py)."""
    cuts = np.flatnonzero(ids == eot_id)
    docs = [ids[a:b] for a, b in zip(np.r_[0, cuts + 1], np.r_[cuts, len(ids)])]
    total, count = lm.score(docs[:-1])
    rest_total, rest_count = lm.score(docs[-1:], eos=False)
    return total + rest_total, count + rest_count
