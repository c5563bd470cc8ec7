"""Task metrics for fine-tuned models: thin, documented wrappers over the libraries people already trust.

Classification numbers come from scikit-learn, BLEU from sacrebleu, ROUGE from Google's rouge-score, so a
figure here is the figure anyone else gets from the same outputs. Every result is plain Python (floats,
ints, lists, dicts) and can go straight into JSON. The libraries are imported inside each function, so
`import choicelm` stays light; they come with `pip install 'choicelm[finetune]'`.

    from choicelm.evaluation.metrics import classification_metrics, format_classification_report, bleu, rouge

    m = classification_metrics(["pos", "neg", "pos"], ["pos", "pos", "pos"], labels=["neg", "pos"])
    print(m["accuracy"], m["f1"])            # macro F1
    print(format_classification_report(m))   # per-class table and confusion matrix
    bleu(["the cat sat"], ["the cat sat"])["bleu"]      # 0-100, with sacrebleu's signature string
    rouge(["the cat sat"], ["the cat sat"])["rougeL"]   # 0-1, averaged over examples

`check_metric_names(names, task)` validates what a user asked for (e.g. `--metrics f1,accuracy`) against
the task before any model is loaded.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ..core.errors import ChoicelmError

CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall")
GENERATION_METRICS = ("bleu", "rouge")
METRICS = frozenset(CLASSIFICATION_METRICS + GENERATION_METRICS + ("ppl",))

# Which metrics fit which fine-tuning task (the `--task` values of `choicelm finetune`).
TASK_METRICS = {
    "classify": CLASSIFICATION_METRICS,
    "seq2seq": GENERATION_METRICS,
    "sft": ("ppl",),  # loss and perplexity on the reply tokens
}

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def check_metric_names(names: list[str], task: str) -> list[str]:
    """The names, lower-cased, if every one is a known metric that fits `task`; otherwise a ChoicelmError
    listing the metrics that do fit."""
    if task not in TASK_METRICS:
        raise ChoicelmError(f"unknown task '{task}'; metrics are defined for: {', '.join(TASK_METRICS)}")
    fitting = TASK_METRICS[task]
    wanted = [name.strip().lower() for name in names]
    if not wanted:
        raise ChoicelmError(f"no metric named; for task '{task}' choose from: {', '.join(fitting)}")
    unknown = [name for name in wanted if name not in METRICS]
    if unknown:
        raise ChoicelmError(f"unknown metric(s) {', '.join(unknown)}; for task '{task}' choose from: {', '.join(fitting)}")
    unfit = [name for name in wanted if name not in fitting]
    if unfit:
        raise ChoicelmError(f"metric(s) {', '.join(unfit)} do not fit task '{task}'; choose from: {', '.join(fitting)}")
    return wanted


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix, all from sklearn.metrics.

    A class that is never predicted (or never present) scores 0 rather than warning (zero_division=0), and it
    still counts in the macro average: macro F1 is the plain mean of the per-class F1s over `labels`.
    Confusion matrix rows are true labels and columns predicted labels, both in `labels` order.
    """
    _check_classification_inputs(y_true, y_pred, labels)
    skm = _require("sklearn.metrics")
    labels = list(labels)
    macro_p, macro_r, macro_f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0)
    class_p, class_r, class_f1, class_n = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0)
    per_class = {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                 for label, p, r, f, n in zip(labels, class_p, class_r, class_f1, class_n)}
    return {
        "n": len(y_true),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(macro_p),
        "recall": float(macro_r),
        "f1": float(macro_f1),
        "average": "macro",
        "labels": labels,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _check_classification_inputs(y_true: list[str], y_pred: list[str], labels: list[str]) -> None:
    _check_same_nonempty_length(y_true, y_pred, "y_true", "y_pred")
    if not labels:
        raise ChoicelmError("labels is empty; pass every class name, in the order the report should list them")
    if len(set(labels)) != len(labels):
        raise ChoicelmError(f"labels has duplicates ({list(labels)}); list each class once")
    known = set(labels)
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        outside = sorted({str(v) for v in values if v not in known})
        if outside:
            raise ChoicelmError(f"{name} holds label(s) not in labels: {', '.join(outside[:10])}; "
                                f"add them to labels or fix the data (labels: {', '.join(map(str, labels))})")


def format_classification_report(metrics: dict) -> str:
    """A fixed-width table of a `classification_metrics` result: per-class rows, the macro average,
    accuracy, then the confusion matrix (rows = true, columns = predicted)."""
    labels = [str(label) for label in metrics["labels"]]
    width = max(12, *(len(label) for label in labels))
    lines = [f"{'':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"]
    for label in metrics["labels"]:
        row = metrics["per_class"][label]
        lines.append(f"{str(label):<{width}}  {row['precision']:>9.4f}  {row['recall']:>9.4f}  "
                     f"{row['f1']:>9.4f}  {row['support']:>9d}")
    lines.append("")
    lines.append(f"{'macro avg':<{width}}  {metrics['precision']:>9.4f}  {metrics['recall']:>9.4f}  "
                 f"{metrics['f1']:>9.4f}  {metrics['n']:>9d}")
    lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>9}  {metrics['accuracy']:>9.4f}  {metrics['n']:>9d}")
    lines.append("")
    lines.append("confusion matrix (rows = true label, columns = predicted label)")
    cell = max(6, *(len(label) for label in labels), *(len(str(c)) for row in metrics["confusion_matrix"] for c in row))
    lines.append(f"{'':<{width}}  " + "  ".join(f"{label:>{cell}}" for label in labels))
    for label, row in zip(labels, metrics["confusion_matrix"]):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{count:>{cell}d}" for count in row))
    return "\n".join(lines)


def bleu(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (0-100) from sacrebleu with its default settings (13a tokenizer, mixed case, exp smoothing),
    one reference per hypothesis. The signature string says exactly how the number was computed; quote it
    with the score, since BLEU from different settings is not comparable."""
    _check_same_nonempty_length(hypotheses, references, "hypotheses", "references")
    sacrebleu_metrics = _require("sacrebleu.metrics")
    scorer = sacrebleu_metrics.BLEU()
    result = scorer.corpus_score(list(hypotheses), [list(references)])
    return {
        "bleu": float(result.score),
        "precisions": [float(p) for p in result.precisions],  # 1- to 4-gram, in percent
        "brevity_penalty": float(result.bp),
        "hyp_len": int(result.sys_len),
        "ref_len": int(result.ref_len),
        "n": len(hypotheses),
        "signature": str(scorer.get_signature()),
    }


def rouge(hypotheses: list[str], references: list[str]) -> dict:
    """ROUGE-1, ROUGE-2 and ROUGE-L (0-1) from rouge-score with Porter stemming, averaged over examples.

    Keys `rouge1`, `rouge2`, `rougeL` hold the F-measure; `<type>_precision` and `<type>_recall` the others.
    rouge-score's default tokenizer lower-cases and keeps only a-z and 0-9, so text in other scripts scores 0;
    ROUGE-L here is the sentence-level LCS (not the newline-split `rougeLsum`).
    """
    _check_same_nonempty_length(hypotheses, references, "hypotheses", "references")
    rouge_scorer = _require("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = {f"{kind}{part}": 0.0 for kind in ROUGE_TYPES for part in ("", "_precision", "_recall")}
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(target=reference, prediction=hypothesis)
        for kind in ROUGE_TYPES:
            sums[kind] += scores[kind].fmeasure
            sums[f"{kind}_precision"] += scores[kind].precision
            sums[f"{kind}_recall"] += scores[kind].recall
    result = {key: total / len(hypotheses) for key, total in sums.items()}
    result["n"] = len(hypotheses)
    result["rouge_settings"] = (f"rouge-score {metadata.version('rouge-score')}, use_stemmer=True, default tokenizer, "
                                "rougeL = sentence-level LCS, F-measure/precision/recall averaged over examples")
    return result


def _check_same_nonempty_length(first: list, second: list, first_name: str, second_name: str) -> None:
    if len(first) != len(second):
        raise ChoicelmError(f"{first_name} has {len(first)} items but {second_name} has {len(second)}; "
                            "pass one per example, in the same order")
    if len(first) == 0:
        raise ChoicelmError(f"{first_name} and {second_name} are empty; pass at least one example")


def _require(module: str):
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:  # name what is missing: rouge-score also needs nltk and absl-py
        raise ChoicelmError(f"cannot import {module} ({error}); install the fine-tuning extras: "
                            "pip install 'choicelm[finetune]'") from None
