"""Task metrics of a fine-tuned model on a file: what `choicelm evaluate --data FILE` and the end of
`choicelm finetune` report.

    classify   predicted labels -> accuracy, macro precision/recall/F1, confusion matrix (scikit-learn)
    seq2seq    decoded targets (greedy, or beam search) -> BLEU (sacrebleu, with its signature) and
               ROUGE-1/2/L (rouge-score)
    sft        loss and perplexity on the reply tokens

    evaluate_file(choicelm.load("runs/cls"), "test.csv")  # {"task": "classify", "accuracy": ..., ...}
"""

from __future__ import annotations

import math

import torch

from ..api import classify_texts
from ..core.errors import ChoicelmError
from ..data import tasks as fd
from ..models import registry
from . import metrics as fm


def task_of(lm) -> str:
    """The task a loaded model does: classify (it has a head), else the one other task its family fine-tunes
    for (seq2seq for an encoder-decoder, sft for a decoder)."""
    if lm.is_classifier:
        return "classify"
    tasks = [t for t in registry.get(lm.config.model.kind).tasks if t != "classify"]
    if tasks:
        return tasks[0]
    raise ChoicelmError(f"a {lm.config.model.kind} model has no fine-tuning task metrics; evaluate it with "
                        "--metrics ppl on prepared data")


def evaluate_file(lm, path, metrics: list[str] | None = None, *, num_beams: int = 1, max_new_tokens: int = 0,
                  batch_size: int = 32) -> dict:
    """The task metrics of `lm` on the examples in `path` (same format as the fine-tuning files)."""
    task = task_of(lm)
    f = lm.config.finetune
    if metrics:
        fm.check_metric_names(metrics, task)
    if task == "classify":
        rows = fd.read_classification(path, f.text_column, f.label_column)
        fd.label_ids([label for _, label in rows], lm.labels, str(path))  # unseen labels: one clear error
        predicted = [label for label, _ in classify_texts(lm, [text for text, _ in rows], batch_size)]
        result = fm.classification_metrics([label for _, label in rows], predicted, lm.labels)
        return {"task": task, "examples": len(rows), **result}
    if task == "seq2seq":
        pairs = fd.read_pairs(path, f.source_column, f.target_column)
        limit = max_new_tokens or f.max_target_length or min(64, lm.config.model.block_size)
        sources = [s for s, _ in pairs]
        hyps = []
        for i in range(0, len(sources), batch_size):
            hyps += lm.generate(sources[i:i + batch_size], max_new_tokens=limit, temperature=0, num_beams=num_beams)
        refs = [t for _, t in pairs]
        wanted = metrics or ["bleu", "rouge"]
        result = {"task": task, "examples": len(pairs), "decoding": f"num_beams={num_beams}, max_new_tokens={limit}"}
        if "bleu" in wanted:
            result["bleu"] = fm.bleu(hyps, refs)
        if "rouge" in wanted:
            result["rouge"] = fm.rouge(hyps, refs)
        result["samples"] = [{"source": s[:200], "reference": r, "output": h} for s, r, h in
                             list(zip(sources, refs, hyps))[:5]]
        return result
    return _reply_loss(lm, path, batch_size)


def summary(result: dict) -> str:
    """One line of a task result, for people (the JSON has the rest)."""
    n = result["examples"]
    if result["task"] == "classify":
        return f"accuracy {result['accuracy']:.3f}, macro F1 {result['f1']:.3f} on {n} examples"
    if result["task"] == "seq2seq":
        parts = []
        if "bleu" in result:
            parts.append(f"BLEU {result['bleu']['bleu']:.2f} ({result['bleu']['signature']})")
        if "rouge" in result:
            r = result["rouge"]
            parts.append(f"ROUGE-1/2/L {r['rouge1']:.3f}/{r['rouge2']:.3f}/{r['rougeL']:.3f}")
        return ", ".join(parts) + f" on {n} examples ({result['decoding']})"
    return f"reply loss {result['loss']:.3f}, perplexity {result['ppl']:.2f} on {n} conversations"


@torch.no_grad()
def _reply_loss(lm, path, batch_size: int) -> dict:
    from ..text.chat_template import template_of
    from ..objectives import causal_lm

    template = template_of(lm.tokenizer)
    max_len = lm.config.finetune.max_length or lm.config.model.block_size
    max_len = min(max_len, lm.config.model.block_size)
    encoded = [fd.sft_ids(lm.tokenizer, template, m, max_len) for m in fd.read_conversations(path)]
    data = fd.SFTDataset([i for i, _ in encoded], [t for _, t in encoded], lm.tokenizer.pad_id_or_eos)
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x_BT, y_BT = data.collate(list(range(i, min(i + batch_size, len(data)))))
        loss, n, _ = causal_lm(lm.model, (x_BT.to(lm.device), y_BT.to(lm.device)))
        total, count = total + float(loss), count + n
    if not count:
        raise ChoicelmError(f"{path}: no reply tokens to score within the block size")
    return {"task": "sft", "examples": len(data), "reply_tokens": count, "loss": total / count,
            "ppl": math.exp(total / count)}
