"""Evaluation metrics. Perplexity and bits per byte of a language model on prepared token shards.

Bits per byte (loss in bits x tokens / UTF-8 bytes of the same text) compares models with
different tokenizers; perplexity is per token of this model's tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .data.loader import TokenDataset, eval_batches
from .errors import ChoicelmError
from .train.objectives import causal_lm, summed_loss
from .train.runtime import use_bf16

METRICS = ("ppl",)


@torch.no_grad()
def perplexity(lm, data_dir: str | Path, split: str = "val", batch_size: int = 8, max_batches: int | None = None,
               precision: str = "fp32") -> dict:
    """Mean next-token loss over the split's non-overlapping windows of the model's block size."""
    data = TokenDataset(Path(data_dir), split)
    if data.manifest["tokenizer"]["sha256"] != lm.tokenizer.sha256():
        raise ChoicelmError(f"--data {data_dir} was encoded with a different tokenizer than the checkpoint's; "
                            "re-run `choicelm prepare` with the checkpoint's tokenizer folder")
    batches = eval_batches(data, lm.config.model.block_size, batch_size, max_batches)
    loss_sum, count = summed_loss(causal_lm, lm.model, batches, lm.device, use_bf16(precision, lm.device))
    if count == 0:
        raise ChoicelmError(f"split '{split}' of {data_dir} has no complete window of {lm.config.model.block_size + 1} tokens")
    loss = loss_sum / count
    result = {"split": split, "tokens": count, "loss": loss, "ppl": math.exp(loss)}
    if split != "train" and "train" in data.manifest["splits"]:
        result["unigram_ppl"] = unigram_perplexity(TokenDataset(Path(data_dir), "train"), data)
    split_info = data.manifest["splits"][split]
    if split_info.get("bytes"):
        bytes_per_token = split_info["bytes"] / split_info["tokens"]
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return result


def unigram_perplexity(train: TokenDataset, test: TokenDataset) -> float:
    """Perplexity of the add-one unigram model counted on `train`, over all of `test`: the floor a
    trained model must clearly beat."""
    counts = sum(np.bincount(np.asarray(s), minlength=train.vocab_size) for s in train.shards).astype(np.float64)
    log_probs = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    total = sum(float(log_probs[np.asarray(s)].sum()) for s in test.shards)
    return math.exp(-total / test.tokens)


def evaluate(checkpoint: str | Path, data_dir: str | Path, metrics: list[str], split: str = "val",
             batch_size: int = 8, max_batches: int | None = None, device: str = "auto") -> dict:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ChoicelmError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    from .api import load

    lm = load(checkpoint, device)
    return perplexity(lm, data_dir, split, batch_size, max_batches)
