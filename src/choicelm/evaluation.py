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
from .models.moe import CAUSAL_RULES
from .train.objectives import causal_lm, summed_loss
from .train.runtime import use_bf16

METRICS = ("ppl",)


@torch.no_grad()
def perplexity(lm, data_dir: str | Path, split: str = "val", batch_size: int = 8, max_batches: int | None = None,
               precision: str = "fp32") -> dict:
    """Mean next-token loss over the split's non-overlapping windows of the model's block size (an encoder:
    masked-LM loss over its masked tokens)."""
    data = TokenDataset(Path(data_dir), split)
    if lm.config.model.kind == "ngram":
        return ngram_perplexity(lm, data)
    if data.manifest["tokenizer"]["sha256"] != lm.tokenizer.sha256():
        raise ChoicelmError(f"--data {data_dir} was encoded with a different tokenizer than the checkpoint's; "
                            "re-run `choicelm prepare` with the checkpoint's tokenizer folder")
    batches = eval_batches(data, lm.config.model.block_size, batch_size, max_batches)
    mlm = lm.config.model.kind == "bert"
    objective = masked_lm_objective(lm) if mlm else causal_lm
    loss_sum, count = summed_loss(objective, lm.model, batches, lm.device, use_bf16(precision, lm.device))
    if count == 0:
        raise ChoicelmError(f"split '{split}' of {data_dir} has no complete window of {lm.config.model.block_size + 1} tokens")
    loss = loss_sum / count
    result = {"split": split, "tokens": count, "loss": loss, "ppl": math.exp(loss)}
    if mlm:  # not comparable with next-token perplexity, unigram or bits per byte: say so and stop here
        result["objective"] = "mlm+nsp" if lm.config.model.nsp else "mlm"
        result["note"] = ("masked-LM loss and perplexity over the masked tokens only (BERT masking: 15% of tokens, "
                          "80/10/10; masks seeded by train.seed and each window's tokens), not next-token perplexity"
                          + ("; the loss adds the mean next-sentence loss, as the training run's val_loss does"
                             if lm.config.model.nsp else ""))
        return result
    if getattr(lm.model, "moe_config", None) is not None:  # say which MoE routing produced the number
        result["routing"] = lm.model.current_routing()
        result["routing_causal"] = result["routing"] in CAUSAL_RULES
    if split != "train" and "train" in data.manifest["splits"]:
        result["unigram_ppl"] = unigram_perplexity(TokenDataset(Path(data_dir), "train"), data)
    split_info = data.manifest["splits"][split]
    if split_info.get("bytes"):
        bytes_per_token = split_info["bytes"] / split_info["tokens"]
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return result


def masked_lm_objective(lm):
    """The MLM objective for an encoder checkpoint, masking as its validation during training did."""
    from .data.mlm import MLMMasker
    from .train.objectives import MaskedLM

    if lm.config.model.n_labels:
        raise ChoicelmError("this encoder is a classifier (model.n_labels > 0): it has no masked-LM loss to report; "
                            "evaluate the pretrained (masked-LM) checkpoint, or score the classifier on labelled data")
    return MaskedLM(MLMMasker.from_tokenizer(lm.tokenizer), lm.config.train.seed, nsp=lm.config.model.nsp)


def ngram_perplexity(lm, data: TokenDataset) -> dict:
    """A counted model scores the whole split as documents (its </s> predicts <|endoftext|>), so its
    per-token perplexity and bits per byte line up with a neural model's on the same shards."""
    from .train.counting import score_split

    if lm.model.kind == "ids" and data.manifest["tokenizer"]["sha256"] != lm.model.tokenizer_sha256:
        raise ChoicelmError(f"--data {data.dir} was encoded with a different tokenizer than the n-gram model "
                            "was counted on; re-run `choicelm prepare` with the checkpoint's tokenizer folder")
    return score_split(lm.model, data, data.manifest["eot_id"])


def unigram_perplexity(train: TokenDataset, test: TokenDataset) -> float:
    """Perplexity of the add-one unigram model counted on `train`, over all of `test`: the floor a
    trained model must clearly beat."""
    counts = sum(np.bincount(np.asarray(s), minlength=train.vocab_size) for s in train.shards).astype(np.float64)
    log_probs = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    total = sum(float(log_probs[np.asarray(s)].sum()) for s in test.shards)
    return math.exp(-total / test.tokens)


def evaluate(checkpoint: str | Path, data_dir: str | Path, metrics: list[str], split: str = "val",
             batch_size: int = 8, max_batches: int | None = None, device: str = "auto",
             routing: str | None = None) -> dict:
    """routing: an MoE model's routing rule for this evaluation (e.g. topk, to compare with the causal
    default); the result says which rule produced it and whether that rule is causal."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ChoicelmError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    from .api import load

    lm = load(checkpoint, device)
    if routing is None:
        return perplexity(lm, data_dir, split, batch_size, max_batches)
    if not hasattr(lm.model, "routing_as"):
        raise ChoicelmError(f"--routing {routing} needs an MoE GPT checkpoint; {checkpoint} is a {lm.config.model.kind}")
    with lm.model.routing_as(routing):
        return perplexity(lm, data_dir, split, batch_size, max_batches)
