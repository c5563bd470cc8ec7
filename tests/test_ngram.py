"""The counted n-gram LM: hand-computed Kneser-Ney, MLE and add-k numbers; an independent dict-based
Kneser-Ney written straight from Chen & Goodman's formulas; KenLM (pip `kenlm`) scoring our ARPA
files; normalisation of every context; ARPA and save/load round trips; bad input."""

import math
import random
from collections import Counter

import numpy as np
import pytest

from choicelm.core.errors import ChoicelmError
from choicelm.models.ngram import BOS, EOS, UNK, NGramLM, WordVocab

LN10 = math.log(10)
FALLBACK = [[0.5, 1.0, 1.5]] * 6          # fixed discounts for the hand-computed cases
TINY = ["a b", "a a b", "b"]               # <s> a b </s> | <s> a a b </s> | <s> b </s>


def probs(lm, line):
    return np.exp(lm.logprob_text(line))


# ----------------------------------------------------------------------------- hand-computed numbers

def test_discounts_from_count_of_counts_by_hand():
    # one sentence, unigram model (highest order: raw counts): a 1, b 2, c 3, d 4, e 1, </s> 1
    # count-of-counts t1 = 3 (a, e, </s>), t2 = 1, t3 = 1, t4 = 1
    # Y = 3 / (3 + 2*1) = 0.6; D1 = 1 - 2*0.6*1/3 = 0.6; D2 = 2 - 3*0.6*1/1 = 0.2; D3+ = 3 - 4*0.6*1/1 = 0.6
    lm = NGramLM.fit_words(["a b b c c c d d d d e"], order=1)
    assert lm.discounts[0] == pytest.approx([0.6, 0.2, 0.6])
    # total 12; gamma = (0.6*3 + 0.2*1 + 0.6*2) / 12 = 3.2/12; |V| without <s> = 7 (<unk> </s> a b c d e)
    gamma = 3.2 / 12
    w = lm.words.index
    lp = np.exp(lm.next_token_logprobs([]))
    assert lp[w["d"]] == pytest.approx((4 - 0.6) / 12 + gamma / 7)
    assert lp[w["b"]] == pytest.approx((2 - 0.2) / 12 + gamma / 7)
    assert lp[w["a"]] == pytest.approx((1 - 0.6) / 12 + gamma / 7)
    assert lp[w[UNK]] == pytest.approx(gamma / 7)
    assert lp[w[BOS]] == 0.0


def test_kneser_ney_bigram_by_hand():
    # Unigrams use continuation counts N1+(. w): a {<s>, a} = 2, b {a, <s>} = 2, </s> {b} = 1; total 5.
    # gamma = (0.5*1 + 1.0*2) / 5 = 0.5, spread over |V| = 4 (<unk> </s> a b):
    #   p(a) = p(b) = (2 - 1)/5 + 0.5/4 = 0.325, p(</s>) = (1 - 0.5)/5 + 0.125 = 0.225, p(<unk>) = 0.125
    # Bigrams (raw counts): <s> a 2, <s> b 1, a b 2, a a 1, b </s> 3.
    #   context <s>: total 3, gamma = (0.5 + 1)/3 = 0.5; p(a|<s>) = 1/3 + 0.5*0.325, p(b|<s>) = 0.5/3 + 0.5*0.325
    #   context a:   total 3, gamma = 0.5;            p(b|a) = 1/3 + 0.5*0.325,   p(</s>|a) = 0.5*0.225
    #   context b:   total 3, gamma = 1.5/3 = 0.5;    p(</s>|b) = 1.5/3 + 0.5*0.225, p(a|b) = 0.5*0.325
    lm = NGramLM.fit_words(TINY, order=2, discounts=FALLBACK[:2])
    assert lm.words.words == [UNK, BOS, EOS, "a", "b"]
    assert probs(lm, "a b") == pytest.approx([1 / 3 + 0.1625, 1 / 3 + 0.1625, 0.5 + 0.1125])
    assert probs(lm, "b a") == pytest.approx([0.5 / 3 + 0.1625, 0.1625, 0.1125])
    # an unknown word is <unk>; after it (a context never seen) the unigram distribution answers
    assert probs(lm, "zebra") == pytest.approx([0.5 * 0.125, 0.225])
    assert lm.perplexity([lm.words.encode("a b")]) == pytest.approx(
        (0.49583333 * 0.49583333 * 0.6125) ** (-1 / 3), rel=1e-6)


def test_kneser_ney_trigram_by_hand():
    # Trigrams (raw): <s> a b 1, a b </s> 2, <s> a a 1, a a b 1, <s> b </s> 1.
    # Bigrams use continuation counts except those starting with <s> (raw): <s> a 2, <s> b 1,
    #   a b = |{<s>, a}| = 2, b </s> = |{a, <s>}| = 2, a a = |{<s>}| = 1. Unigrams as in the bigram case.
    #   p2(a|<s>) = 1/3 + 0.1625 = 0.4958333, p2(b|a) = 0.4958333, p2(a|a) = 0.5/3 + 0.1625 = 0.3291667,
    #   p2(</s>|b): total 2, gamma = 1*1/2 -> (2 - 1)/2 + 0.5*0.225 = 0.6125
    # Trigram contexts:
    #   <s> a: b 1, a 1, total 2, gamma 0.5: p(b|<s> a) = 0.5/2 + 0.5*0.4958333, p(a|<s> a) = 0.25 + 0.5*0.3291667
    #   a b: </s> 2, gamma 0.5: p(</s>|a b) = 1/2 + 0.5*0.6125 = 0.80625
    #   a a: b 1, gamma 0.5: p(b|a a) = 0.5 + 0.5*0.4958333
    lm = NGramLM.fit_words(TINY, order=3, discounts=FALLBACK[:3])
    p2_ab = 1 / 3 + 0.1625
    assert probs(lm, "a b") == pytest.approx([p2_ab, 0.25 + 0.5 * p2_ab, 0.80625])
    assert probs(lm, "a a b") == pytest.approx([p2_ab, 0.25 + 0.5 * (0.5 / 3 + 0.1625), 0.5 + 0.5 * p2_ab, 0.80625])
    # "b b": p2(b|<s>); then context <s> b saw only </s>: 0.5 * p2(b|b) = 0.5 * (0.5 * 0.325);
    # then context "b b" was never seen: p2(</s>|b) = 0.6125
    assert probs(lm, "b b") == pytest.approx([0.5 / 3 + 0.1625, 0.5 * 0.5 * 0.325, 0.6125])
    w = lm.words.index
    assert lm.count([w[BOS], w["a"], w["b"]]) == 1 and lm.count([w["a"], w["b"], w[EOS]]) == 2
    assert lm.count([w["b"], w["b"]]) == 0


def test_mle_and_add_k_by_hand():
    # MLE bigram: p(a|<s>) = 2/3, p(b|a) = 2/3, p(</s>|b) = 3/3; p(</s>|a) was never seen: 0
    mle = NGramLM.fit_words(TINY, order=2, smoothing="mle")
    assert probs(mle, "a b") == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert mle.logprob_text("a")[-1] == -np.inf
    # add-1 bigram, |V| = 4: (c + 1) / (total + 4)
    add1 = NGramLM.fit_words(TINY, order=2, smoothing="add_k", k=1)
    assert probs(add1, "a b") == pytest.approx([3 / 7, 3 / 7, 4 / 7])
    # after <unk> (never a context) the unigram add-1 answers: </s> 3 of 9 -> (3 + 1) / (9 + 4)
    assert probs(add1, "zebra") == pytest.approx([1 / 7, 4 / 13])
    add_half = NGramLM.fit_words(TINY, order=2, smoothing="add_k", k=0.5)
    assert probs(add_half, "b")[0] == pytest.approx(1.5 / 5)


# ----------------------------------------------------------------------------- an independent Kneser-Ney

def reference_kneser_ney(sentences, order):
    """Interpolated modified Kneser-Ney with dicts, straight from Chen & Goodman (1998, section 3)
    and KenLM's conventions. Returns p(word, history) for histories that start after <s>."""
    raw = [Counter() for _ in range(order + 1)]
    for s in sentences:
        padded = [BOS] + s.split() + [EOS]
        for n in range(1, order + 1):
            for i in range(len(padded) - n + 1):
                raw[n][tuple(padded[i:i + n])] += 1
    adj = [None] + [Counter() for _ in range(order)]
    for n in range(1, order + 1):
        for g, c in raw[n].items():
            if n == order or g[0] == BOS:
                adj[n][g] = c
            else:
                adj[n][g] = len({h[0] for h in raw[n + 1] if h[1:] == g})
    del adj[1][(BOS,)]
    vocab = {w for (w,) in raw[1]} | {UNK}
    n_pred = len(vocab) - 1

    def discounts(n):
        t = Counter(adj[n].values())          # t[k]: n-grams seen exactly k times
        try:
            y = t[1] / (t[1] + 2 * t[2])
            d = [1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3]]
        except ZeroDivisionError:
            return [0.5, 1.0, 1.5]
        return d if all(0 <= x <= i + 1 for i, x in enumerate(d)) else [0.5, 1.0, 1.5]

    D = [None] + [discounts(n) for n in range(1, order + 1)]

    def p(w, h):
        if w == BOS:
            return 0.0
        h = tuple(h[len(h) - min(len(h), order - 1):])
        lower = p(w, h[1:]) if h else 1 / n_pred
        n = len(h) + 1
        follow = {g[-1]: c for g, c in adj[n].items() if g[:-1] == h}
        total = sum(follow.values())
        if total == 0:
            return lower
        disc = lambda c: D[n][min(c, 3) - 1]
        gamma = sum(disc(c) for c in follow.values()) / total
        c = follow.get(w, 0)
        return (max(c - disc(c), 0) if c else 0) / total + gamma * lower

    return p, vocab, D


def random_corpus(seed, n_sentences=80, n_words=25):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    weights = [1 / (i + 1) for i in range(n_words)]   # Zipf-like, so counts repeat
    return [" ".join(rng.choices(words, weights, k=rng.randint(1, 9))) for _ in range(n_sentences)]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_independent_kneser_ney(order):
    corpus = random_corpus(order, n_sentences=150, n_words={1: 200, 2: 60, 3: 60, 4: 8}[order])
    lm = NGramLM.fit_words(corpus, order, discount_fallback=True)
    p, vocab, D = reference_kneser_ney(corpus, order)
    np.testing.assert_allclose(np.array(lm.discounts), np.array(D[1:]), rtol=1e-12)
    assert sum(d != [0.5, 1.0, 1.5] for d in lm.discounts) >= max(1, order - 1)   # estimated, not the fallback
    rng = random.Random(0)
    histories = [[]] + [rng.choices(sorted(vocab - {UNK, BOS, EOS}), k=rng.randint(1, 5)) for _ in range(30)]
    for h in histories:
        ours = np.exp(lm.next_token_logprobs(lm.words.encode(" ".join(h))))
        theirs = np.array([p(w, [BOS] + h) for w in lm.words.words])
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    for line in corpus[:10] + ["w1 w1 w1 w1 w1 w1", "w6 w5 w4 zzz w3"]:
        words = line.split()
        theirs = [p(w if w in vocab else UNK, [BOS] + words[:i]) for i, w in enumerate(words + [EOS])]
        np.testing.assert_allclose(probs(lm, line), theirs, rtol=1e-10)


def test_counts_match_a_counter():
    corpus = random_corpus(7, n_sentences=40)
    lm = NGramLM.fit_words(corpus, 6, discount_fallback=True)
    raw = Counter()
    for s in corpus:
        padded = [BOS] + s.split() + [EOS]
        for n in range(1, 7):
            raw.update(tuple(padded[i:i + n]) for i in range(len(padded) - n + 1))
    assert lm.num_ngrams()[1:] == [sum(len(g) == n for g in raw) for n in range(2, 7)]
    for g, c in raw.items():
        assert lm.count([lm.words.index[w] for w in g]) == c


# ----------------------------------------------------------------------------- every context sums to 1

def contexts(lm, rng, n=25):
    """Seen, partly seen and unseen contexts of every length up to order - 1 (and longer)."""
    out = [[]]
    for _ in range(n):
        out.append(list(rng.integers(0, lm.vocab_size, rng.integers(1, lm.order + 2))))
    return out


@pytest.mark.parametrize("smoothing,prune", [("kneser_ney", False), ("kneser_ney", True), ("mle", False),
                                             ("mle", True), ("add_k", False)])
def test_every_context_sums_to_one(shakespeare_slice, smoothing, prune):
    lines = shakespeare_slice[1].read_text().splitlines()[:1500]
    lm = NGramLM.fit_words(lines, 4, smoothing=smoothing, prune_singletons=prune, k=0.1)
    rng = np.random.default_rng(0)
    seen = [list(lm.words.encode(line))[:j] for line in lines[:40:4] for j in range(4)]
    for ctx in contexts(lm, rng) + seen:
        lp = lm.next_token_logprobs(ctx)
        assert lp.shape == (lm.n_vocab,) and lp[lm.bos_id] == -np.inf
        assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-9)
        # the vectorised scorer agrees with the full distribution, token by token
        seq = ctx + [int(np.argmax(lp))]
        if lm.words.words[seq[-1]] not in (EOS,):
            assert lm.logprob(seq)[len(ctx)] == pytest.approx(lp[seq[-1]], rel=1e-9, abs=1e-12)


def test_pruning_drops_singletons_above_order_two(shakespeare_slice):
    lines = shakespeare_slice[1].read_text().splitlines()[:1500]
    full = NGramLM.fit_words(lines, 4)
    pruned = NGramLM.fit_words(lines, 4, prune_singletons=True)
    assert pruned.num_ngrams()[:2] == full.num_ngrams()[:2]
    for n in (3, 4):
        assert pruned.num_ngrams()[n - 1] == int((full.counts[n - 1] >= 2).sum())
        assert pruned.counts[n - 1].min() >= 2
    seqs = [lm_ids for lm_ids in (full.words.encode(line) for line in lines[:200])]
    assert pruned.perplexity(seqs) > full.perplexity(seqs)   # training text: pruning costs fit


# ----------------------------------------------------------------------------- KenLM reads our ARPA

def _kenlm():
    return pytest.importorskip("kenlm")


@pytest.mark.parametrize("order,prune", [(3, False), (5, True), (2, False)])
def test_kenlm_scores_our_arpa_the_same(tmp_path, shakespeare_slice, order, prune):
    kenlm = _kenlm()
    train = [line for p in shakespeare_slice[:2] for line in p.read_text().splitlines()]
    test = [line for line in shakespeare_slice[2].read_text().splitlines() if line.strip()][:400]
    lm = NGramLM.fit_words(train, order, prune_singletons=prune)
    lm.to_arpa(tmp_path / "lm.arpa")
    model = kenlm.Model(str(tmp_path / "lm.arpa"))
    for line in test:
        ours = lm.logprob_text(line) / LN10
        theirs = [s[0] for s in model.full_scores(line)]
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert model.score(line, bos=False, eos=False) == pytest.approx(
            lm.logprob_text(line, bos=False, eos=False).sum() / LN10, abs=1e-4)


def test_kenlm_scores_a_token_id_model(tmp_path):
    kenlm = _kenlm()
    rng = np.random.default_rng(0)
    docs = [np.minimum(rng.zipf(1.5, rng.integers(20, 200)), 99) for _ in range(200)]
    lm = NGramLM.fit(docs, 4, vocab_size=100, discount_fallback=True)
    assert (lm.bos_id, lm.eos_id, lm.unk_id, lm.n_vocab) == (100, 101, 102, 103)
    lm.to_arpa(tmp_path / "ids.arpa")
    model = kenlm.Model(str(tmp_path / "ids.arpa"))
    for doc in docs[:30] + [np.arange(100)]:
        theirs = [s[0] for s in model.full_scores(" ".join(map(str, doc)))]
        np.testing.assert_allclose(lm.logprob(doc) / LN10, theirs, atol=1e-4)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("smoothing,prune", [("kneser_ney", False), ("kneser_ney", True), ("mle", False)])
def test_arpa_round_trip(tmp_path, shakespeare_slice, smoothing, prune):
    lines = shakespeare_slice[1].read_text().splitlines()
    lm = NGramLM.fit_words(lines, 3, smoothing=smoothing, prune_singletons=prune)
    back = NGramLM.from_arpa(lm.to_arpa(tmp_path / "lm.arpa"))
    assert back.kind == "words" and back.vocab == lm.vocab and back.num_ngrams() == lm.num_ngrams()
    seqs = [lm.words.encode(line) for line in lines[:300]]
    for a, b in zip(lm.keys, back.keys):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(back._score(seqs, True, True)[0], lm._score(seqs, True, True)[0], rtol=1e-7)
    for ctx in ([], seqs[0][:1], seqs[1][:2], [0, 0]):
        np.testing.assert_allclose(back.next_token_logprobs(ctx), lm.next_token_logprobs(ctx), rtol=1e-7)
    back.to_arpa(tmp_path / "again.arpa")   # and it writes the same file again
    assert (tmp_path / "again.arpa").read_text() == (tmp_path / "lm.arpa").read_text()


def test_arpa_round_trip_of_token_ids(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50, rng.integers(5, 60)) for _ in range(100)]
    lm = NGramLM.fit(docs, 3, vocab_size=60, discount_fallback=True)   # ids 50..59 never seen
    back = NGramLM.from_arpa(lm.to_arpa(tmp_path / "lm.arpa"))
    assert back.kind == "ids" and back.vocab_size == 60 and back.eos_id == lm.eos_id
    np.testing.assert_allclose(back.logprob(docs[0]), lm.logprob(docs[0]), rtol=1e-7)
    np.testing.assert_allclose(back.next_token_logprobs([59]), lm.next_token_logprobs([59]), rtol=1e-7)


@pytest.mark.parametrize("smoothing", ["kneser_ney", "add_k"])
def test_save_load_is_exact(tmp_path, smoothing):
    lm = NGramLM.fit_words(random_corpus(3), 3, smoothing=smoothing, discount_fallback=True, k=0.2)
    lm.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["ngram.json", "ngram.npz"]
    back = NGramLM.load(tmp_path / "m")
    assert (back.order, back.smoothing, back.vocab, back.discounts) == (lm.order, lm.smoothing, lm.vocab, lm.discounts)
    for line in random_corpus(4)[:20]:
        np.testing.assert_array_equal(back.logprob_text(line), lm.logprob_text(line))


# ----------------------------------------------------------------------------- generation

def sample(lm, max_tokens=50, seed=None, temperature=None, top_k=None, context=()):
    """The n-gram decodes on the generation engine, like every model (it was NGramLM.sample)."""
    from choicelm.generation import GenerationConfig, generate_ids

    cfg = GenerationConfig(max_new_tokens=max_tokens, seed=seed, temperature=temperature, top_k=top_k,
                           eos_token_id=lm.eos_id)
    return generate_ids(lm, [list(context)], cfg)[0].ids


def test_sampling_is_seeded_greedy_and_stops_at_end_of_sentence():
    lm = NGramLM.fit_words(random_corpus(5), 3, discount_fallback=True)
    a = sample(lm, max_tokens=30, seed=1)
    assert a == sample(lm, max_tokens=30, seed=1) and lm.eos_id not in a and len(a) <= 30
    assert any(sample(lm, max_tokens=30, seed=s) != a for s in range(2, 6))
    greedy, ctx = sample(lm, max_tokens=10, temperature=0), []
    for tok in greedy:
        assert tok == int(np.argmax(lm.next_token_logprobs(ctx)))
        ctx.append(tok)
    top1 = sample(lm, max_tokens=10, seed=3, top_k=1)
    assert top1 == greedy
    with pytest.raises(ChoicelmError, match="temperature"):
        sample(lm, temperature=-1)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("order", [0, 7, -1, 2.0, "3", True])
def test_order_out_of_range(order):
    with pytest.raises(ChoicelmError, match="order"):
        NGramLM.fit_words(TINY, order)
    with pytest.raises(ChoicelmError, match="order"):
        NGramLM.fit([[1, 2, 3]], order, vocab_size=4)


def test_empty_training_text():
    for bad in ([], ["", "   "], ):
        with pytest.raises(ChoicelmError, match="empty"):
            NGramLM.fit_words(bad, 3)
    with pytest.raises(ChoicelmError, match="empty"):
        NGramLM.fit([[], []], 3, vocab_size=10)
    with pytest.raises(ChoicelmError, match="empty"):
        NGramLM.fit([], 3)


def test_other_bad_options():
    with pytest.raises(ChoicelmError, match="smoothing"):
        NGramLM.fit_words(TINY, 2, smoothing="witten_bell")
    with pytest.raises(ChoicelmError, match="k > 0"):
        NGramLM.fit_words(TINY, 2, smoothing="add_k", k=0)
    with pytest.raises(ChoicelmError, match="discount_fallback"):
        NGramLM.fit_words(TINY, 3)                       # count-of-counts too thin for discounts
    with pytest.raises(ChoicelmError, match="outside"):
        NGramLM.fit([[1, 2, 30]], 2, vocab_size=10)
    with pytest.raises(ChoicelmError, match="<s>"):
        NGramLM.fit_words(["a <s> b"], 2)
    with pytest.raises(ChoicelmError, match="list of sequences"):
        NGramLM.fit(np.arange(10), 2, vocab_size=10)     # a flat stream, not a list of documents
    with pytest.raises(ChoicelmError, match="not text"):
        NGramLM.fit(["a b c"], 2)
    lm = NGramLM.fit([np.arange(10)] * 3, 2, vocab_size=10, discount_fallback=True)
    with pytest.raises(ChoicelmError, match="list of sequences"):
        lm.score(np.arange(5))
    with pytest.raises(ChoicelmError, match="list of sequences"):
        lm.logprob([[1, 2], [3]])
    with pytest.raises(ChoicelmError, match="ARPA"):
        NGramLM.fit_words(TINY, 2, smoothing="add_k").to_arpa("/nonexistent/x.arpa")


def test_word_model_refuses_ids_of_another_tokenizer(tmp_path):
    from choicelm.text import Tokenizer

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 20)
    tok = Tokenizer.train([text], 300)
    other = Tokenizer.train([text], None, kind="char")
    words = NGramLM.fit_words(TINY, 2, discounts=FALLBACK[:2])
    with pytest.raises(ChoicelmError, match="whitespace words"):
        words.logprob(tok.encode("to be"), tokenizer=tok)
    with pytest.raises(ChoicelmError, match="outside"):
        words.logprob(tok.encode("to be"))               # ids beyond the 5 words
    with pytest.raises(ChoicelmError, match="not text"):
        words.score(["a b"])
    ids = NGramLM.fit([tok.encode("to be or not to be")] * 3, 2, tokenizer=tok, discount_fallback=True)
    assert ids.vocab_size == tok.vocab_size
    ids.logprob(tok.encode("to be"), tokenizer=tok)      # its own tokenizer is fine
    with pytest.raises(ChoicelmError, match="different tokenizer"):
        ids.logprob(other.encode("to be"), tokenizer=other)
    with pytest.raises(ChoicelmError, match="not words"):
        ids.logprob_text("to be")


ARPA_OK = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
-99\t<s>\t-0.30103
-0.6\t</s>
-0.5\ta\t-0.2
-1.0\t<unk>

\\2-grams:
-0.2\t<s> a
-0.1\ta </s>

\\end\\
"""


@pytest.mark.parametrize("text,line,what", [
    (ARPA_OK.replace("\\end\\\n", ""), 15, "ends early"),                       # truncated at the end
    ("\n".join(ARPA_OK.splitlines()[:12]), 13, "ends early"),                  # truncated mid-section
    (ARPA_OK.replace("-0.5\ta", "-0.x\ta"), 8, "not a number"),
    (ARPA_OK.replace("-0.1\ta </s>", "-0.1\ta b </s>"), 13, "log10-probability"),
    (ARPA_OK.replace("-0.1\ta </s>", "-0.1\ta zz"), 13, "'zz' is not among"),
    (ARPA_OK.replace("ngram 2=2", "ngram 2=3"), 14, "expected"),               # count larger than section
    (ARPA_OK.replace("\\data\\", "data"), 1, "\\\\data"),
    (ARPA_OK.replace("-1.0\t<unk>", "-1.0\ta"), 9, "listed twice"),
    (ARPA_OK.replace("\\2-grams:", "\\3-grams:"), 11, "2-grams"),
    ("\\data\\\nngram 1=3\nngram 2=1\nngram 3=1\n\n\\1-grams:\n-99\t<s>\t0\n-1\t</s>\n-1\ta\t0\n\n\\2-grams:\n"
     "-1\t<s> a\t0\n\n\\3-grams:\n-1\ta a </s>\n\n\\end\\\n", 15, "no entry for its prefix 'a a'"),
])
def test_malformed_arpa_names_the_line(tmp_path, text, line, what):
    path = tmp_path / "bad.arpa"
    path.write_text(text)
    with pytest.raises(ChoicelmError, match=f"line {line}:.*{what}"):
        NGramLM.from_arpa(path)


def test_well_formed_arpa_reads(tmp_path):
    (tmp_path / "ok.arpa").write_text(ARPA_OK)
    lm = NGramLM.from_arpa(tmp_path / "ok.arpa")
    assert lm.vocab == [UNK, BOS, EOS, "a"] and lm.order == 2
    # "a": p(a|<s>) = 10^-0.2; then p(</s>|a) = 10^-0.1
    np.testing.assert_allclose(lm.logprob_text("a") / LN10, [-0.2, -0.1])
    # "a a": p(a|a) backs off: bow(a) + p(a) = -0.2 + -0.5
    np.testing.assert_allclose(lm.logprob_text("a a") / LN10, [-0.2, -0.7, -0.1])


def test_word_vocab():
    v = WordVocab.build(["b a b", "c b"], min_count=2)
    assert v.words == [UNK, BOS, EOS, "b"]
    assert list(v.encode("b a zz")) == [3, 0, 0] and v.decode([3, 0]) == f"b {UNK}"


def test_score_in_chunks_equals_one_pass(monkeypatch):
    import choicelm.models.ngram as ngram

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30, rng.integers(0, 50)) for _ in range(300)]
    lm = NGramLM.fit(docs, 3, vocab_size=30, discount_fallback=True)
    whole = np.concatenate([lm.logprob(d) for d in docs])
    monkeypatch.setattr(ngram, "SCORE_CHUNK", 37)
    total, n = lm.score(docs)
    assert n == len(whole) == sum(len(d) + 1 for d in docs) and total == pytest.approx(whole.sum(), rel=1e-12)
    assert lm.score([]) == (0.0, 0)
    with pytest.raises(ChoicelmError, match="no tokens"):
        lm.perplexity([])


def test_kneser_ney_beats_add_k_on_a_held_out_play(shakespeare_slice):
    train = [line for p in shakespeare_slice[:2] for line in p.read_text().splitlines()]
    held_out = [line for line in shakespeare_slice[2].read_text().splitlines() if line.strip()]
    ppl = {}
    for name, kw in {"kn3": dict(order=3), "kn1": dict(order=1), "add1": dict(order=3, smoothing="add_k", k=1),
                     "add.01": dict(order=3, smoothing="add_k", k=0.01), "mle": dict(order=3, smoothing="mle")}.items():
        lm = NGramLM.fit_words(train, **kw)
        ppl[name] = lm.perplexity([lm.words.encode(line) for line in held_out])
    assert ppl["kn3"] < ppl["kn1"] and ppl["kn3"] < ppl["add.01"] < ppl["add1"]
    assert ppl["mle"] == np.inf                        # unseen words get probability 0


def test_key_index_finds_what_searchsorted_finds():
    from choicelm.models.ngram import KeyIndex

    rng = np.random.default_rng(0)
    for n_keys in (0, 1, 7, 5000):
        keys = np.unique(rng.integers(0, 2**40, n_keys))
        query = np.concatenate([keys, rng.integers(0, 2**40, 3000), keys[:5] + 1]).astype(np.int64)
        j = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
        expected = np.where(keys[j] == query, j, -1) if len(keys) else np.full(len(query), -1)
        np.testing.assert_array_equal(KeyIndex(keys).find(query), expected)
