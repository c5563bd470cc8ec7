"""Fine-tuning metrics: our numbers equal sklearn / sacrebleu / rouge-score called directly, plus hand checks."""

import json
import sys

import pytest
import sacrebleu
import sklearn.metrics as skm
from rouge_score import rouge_scorer

from choicelm.core.errors import ChoicelmError
from choicelm.evaluation.metrics import (METRICS, bleu, check_metric_names, classification_metrics,
                                       format_classification_report, rouge)

# A 3-class example small enough to score by hand (see test_macro_f1_by_hand).
TRUE = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]
LABELS = ["a", "b", "c"]

HYPS = ["the cat sat on the mat", "a quick brown dog jumps over the lazy fox", "stocks fell sharply on monday",
        "rain is expected"]
REFS = ["the cat is sitting on the mat", "the quick brown fox jumps over the lazy dog",
        "shares fell sharply on monday morning", "heavy rain is expected tomorrow"]


def test_macro_f1_by_hand():
    m = classification_metrics(TRUE, PRED, LABELS)
    # a: P=2/2, R=2/3 -> F1 0.8;  b: P=1/2, R=1/2 -> 0.5;  c: P=1/2, R=1/1 -> 2/3
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows true, columns predicted


def test_classification_matches_sklearn_and_is_json():
    labels = ["pos", "neg", "neutral", "never"]  # "never" is in no list: scores 0, counts in the macro mean
    y_true = ["pos", "neg", "neutral", "pos", "neg", "neg", "pos", "neutral"]
    y_pred = ["pos", "pos", "neutral", "pos", "neg", "neutral", "neg", "neutral"]
    m = classification_metrics(y_true, y_pred, labels)
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    per_f1 = skm.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert [m["per_class"][label]["f1"] for label in labels] == pytest.approx(list(per_f1))
    assert m["per_class"]["never"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert json.loads(json.dumps(m)) == m


def test_report_shows_table_and_confusion_matrix():
    report = format_classification_report(classification_metrics(TRUE, PRED, LABELS))
    assert "macro avg" in report and "accuracy" in report and "confusion matrix" in report
    matrix_rows = report.splitlines()[-3:]
    assert [row.split() for row in matrix_rows] == [["a", "2", "1", "0"], ["b", "0", "1", "1"], ["c", "0", "0", "1"]]


def test_bleu_matches_sacrebleu():
    ours = bleu(HYPS, REFS)
    theirs = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert ours["bleu"] == pytest.approx(theirs.score)
    assert ours["precisions"] == pytest.approx(theirs.precisions)
    assert ours["brevity_penalty"] == pytest.approx(theirs.bp)
    assert ours["signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert 0 < ours["bleu"] < 100


def test_bleu_exact_match_and_disjoint():
    assert bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)
    disjoint = bleu(["alpha beta gamma delta"], ["one two three four"])
    assert disjoint["bleu"] == 0.0 and disjoint["precisions"] == [0.0, 0.0, 0.0, 0.0]


def test_rouge_matches_rouge_score_averaged():
    ours = rouge(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, REFS)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert ours[kind] == pytest.approx(sum(s[kind].fmeasure for s in scores) / len(scores))
        assert ours[f"{kind}_precision"] == pytest.approx(sum(s[kind].precision for s in scores) / len(scores))
        assert ours[f"{kind}_recall"] == pytest.approx(sum(s[kind].recall for s in scores) / len(scores))
    assert "use_stemmer=True" in ours["rouge_settings"]
    # the stemmer is on: cats/cat and sit/sits share stems, so these agree on every unigram
    assert rouge(["the cats sit"], ["the cat sits"])["rouge1"] == pytest.approx(1.0)
    assert rouge(["alpha beta"], ["gamma delta"])["rougeL"] == 0.0


def test_metric_names_checked_against_task():
    assert METRICS == {"accuracy", "f1", "precision", "recall", "bleu", "rouge", "ppl"}
    assert check_metric_names(["F1", " accuracy"], "classify") == ["f1", "accuracy"]
    assert check_metric_names(["bleu", "rouge"], "seq2seq") == ["bleu", "rouge"]
    with pytest.raises(ChoicelmError, match="unknown metric.*meteor.*accuracy, f1, precision, recall"):
        check_metric_names(["meteor"], "classify")
    with pytest.raises(ChoicelmError, match="bleu do not fit task 'classify'"):
        check_metric_names(["f1", "bleu"], "classify")
    with pytest.raises(ChoicelmError, match="f1 do not fit task 'seq2seq'; choose from: bleu, rouge"):
        check_metric_names(["f1"], "seq2seq")
    with pytest.raises(ChoicelmError, match="unknown task"):
        check_metric_names(["f1"], "regress")


def test_bad_inputs_raise():
    with pytest.raises(ChoicelmError, match="y_true has 2 items but y_pred has 1"):
        classification_metrics(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ChoicelmError, match="empty"):
        classification_metrics([], [], ["a"])
    with pytest.raises(ChoicelmError, match="y_pred holds label.*zebra"):
        classification_metrics(["a"], ["zebra"], ["a", "b"])
    with pytest.raises(ChoicelmError, match="duplicates"):
        classification_metrics(["a"], ["a"], ["a", "a"])
    with pytest.raises(ChoicelmError, match="hypotheses has 1 items but references has 2"):
        bleu(["x"], ["x", "y"])
    with pytest.raises(ChoicelmError, match="empty"):
        rouge([], [])


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # makes the import fail
    with pytest.raises(ChoicelmError, match=r"pip install 'choicelm\[finetune\]'"):
        bleu(["x"], ["x"])
