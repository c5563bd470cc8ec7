"""Evaluation metrics: perplexity and bits per byte of language models on prepared token shards, scored
the same way for every model kind so that their numbers compare.

Which tokens are scored, and with what context. The split is one stream of N tokens (its shards joined),
preceded by a virtual <|endoftext|> (a BOS, as GPT-2 does), so every one of the N tokens, the first
included, is predicted exactly once from the tokens before it:

    GPT (fixed length)  sliding windows of block_size tokens every `stride` tokens (Hugging Face's
                        "Perplexity of fixed-length models"): the first window scores all its tokens, each
                        later one only its last `stride`, and the last window is aligned to the end of the
                        stream (it scores the rest, so it too is full length). A token is predicted from the
                        block_size - stride + 1 to block_size tokens before it (fewer only in the first window).
                        stride = block_size is the old cheap figure (non-overlapping windows); stride = 1 gives
                        every token its full context at one forward pass per token. Default: block_size // 2.
    LSTM (recurrent)    one pass over the whole stream in chunks of block_size with the state carried, so a
                        token sees the whole split before it (it has no fixed length; `stride` does not apply).
    n-gram              each document from <s>: its tokens, then </s> for the <|endoftext|> that ends it (a
                        last document without one gets no </s>); these are exactly the N stream tokens.
    add-one unigram     every token without context.
    BERT (encoder)      masked-LM loss over its masked tokens in non-overlapping windows: not next-token
                        perplexity, so no bits per byte.

Every result carries `method`, saying which of these produced it, and `tokens`, the scored-token count.
Validation during training (train/loop.py, Trainer.evaluate; metrics.csv val_loss) is the cheap estimate:
the first train.eval_batches x micro_batch_size non-overlapping windows of block_size + 1 tokens, no BOS,
a zero state for an LSTM. It tracks progress; compare models with `choicelm evaluate`.

Bits per byte = loss in bits x tokens / UTF-8 bytes of the text they encode (the manifest's bytes per
split, <|endoftext|> excluded): it compares models with different tokenizers, where perplexity (per token
of the model's own tokenizer) does not.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ChoicelmError
from ..core.runtime import autocast, use_bf16
from ..data.loader import TokenDataset, eval_batches
from ..models import registry
from ..models.moe import CAUSAL_RULES
from ..objectives import causal_lm, score_split, summed_loss

METRICS = ("ppl",)


def check_stride(stride: int | None, block_size: int | None = None) -> None:
    """None (the default) or 1..block_size; else one ChoicelmError line."""
    if stride is None:
        return
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ChoicelmError(f"--stride {stride!r} must be a positive number of tokens (at most the model's block size)")
    if block_size is not None and stride > block_size:
        raise ChoicelmError(f"--stride {stride} is longer than the model's block size {block_size}: tokens would be "
                            f"skipped; use a stride of 1..{block_size} (default {max(1, block_size // 2)})")


def stream_reader(data: TokenDataset):
    """read(a, b) -> tokens a..b-1 (int64) of the stream <|endoftext|> + the split's shards joined."""
    offsets = np.cumsum([0] + data.shard_tokens)

    def read(a: int, b: int) -> np.ndarray:
        parts = [np.array([data.eot_id], dtype=np.int64)] if a == 0 else []
        lo, hi = max(a - 1, 0), b - 1  # the same range in split positions (stream position 0 is the BOS)
        for shard, start, end in zip(data.shards, offsets[:-1], offsets[1:]):
            if max(lo, start) < min(hi, end):
                parts.append(np.asarray(shard[max(lo, start) - start:min(hi, end) - start], dtype=np.int64))
        return np.concatenate(parts)

    return read


def strided_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, skip) of each window over a stream of n_tokens + 1 (the BOS first): inputs are stream[start:
    start+L], targets stream[start+1:start+L+1] (L = min(block_size, n_tokens)), of which the first `skip`
    were scored by an earlier window. The last window ends at the end of the stream rather than being cut
    short (Hugging Face's recipe): every window has one shape, and the last tokens keep a long context."""
    L = min(block_size, n_tokens)
    windows, scored_to = [], 0
    for start in list(range(0, n_tokens - L, stride)) + [n_tokens - L]:
        windows.append((start, scored_to - start))
        scored_to = start + L
    return windows


def strided_batches(data: TokenDataset, block_size: int, stride: int, batch_size: int, max_windows: int | None):
    """(x_BT, y_BT) batches of the split's strided windows; targets scored by an earlier window are -100."""
    read = stream_reader(data)
    L = min(block_size, len(data))
    windows = strided_windows(len(data), block_size, stride)[:max_windows]
    for i in range(0, len(windows), batch_size):
        rows = [read(start, start + L + 1) for start, _ in windows[i:i + batch_size]]
        x_BT = torch.from_numpy(np.stack([r[:-1] for r in rows]))
        y_BT = torch.from_numpy(np.stack([r[1:] for r in rows]))
        for row, (_, skip) in enumerate(windows[i:i + batch_size]):
            y_BT[row, :skip] = -100
        yield x_BT, y_BT


@torch.no_grad()
def recurrent_loss(model, data: TokenDataset, chunk: int, max_chunks: int | None, device, bf16: bool):
    """(summed loss, tokens) of one pass over the stream in chunks, carrying the recurrent state."""
    read = stream_reader(data)
    loss_sum, count, state = 0.0, 0, None
    for start in range(0, len(data), chunk)[:max_chunks]:
        ids = torch.from_numpy(read(start, min(start + chunk, len(data)) + 1)).to(device)
        with autocast(device, bf16):
            out = model(ids[None, :-1], ids[None, 1:], state=state, loss_reduction="sum", return_logits=False)
        loss_sum, count, state = loss_sum + float(out.loss), count + len(ids) - 1, out.state
    return loss_sum, count


@torch.no_grad()
def perplexity(lm, data_dir: str | Path, split: str = "val", batch_size: int = 8, max_batches: int | None = None,
               precision: str = "fp32", stride: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of `lm` over every token of the split (see the module doc for how
    each model kind scores). max_batches caps the windows (LSTM: chunks) at max_batches x batch_size, for a
    quick estimate over the start of the split; the result's `method` then says so."""
    check_stride(stride)
    data = TokenDataset(Path(data_dir), split)
    spec = registry.get(lm.config.model.kind)
    if spec.counted:
        return ngram_perplexity(lm, data)
    if data.manifest["tokenizer"]["sha256"] != lm.tokenizer.sha256():
        raise ChoicelmError(f"--data {data_dir} was encoded with a different tokenizer than the checkpoint's; "
                            "re-run `choicelm prepare` with the checkpoint's tokenizer folder")
    if max_batches is not None and (max_batches < 1 or batch_size < 1):
        raise ChoicelmError(f"max_batches={max_batches} and batch_size={batch_size} must be >= 1")
    if len(data) == 0:
        raise ChoicelmError(f"split '{split}' of {data_dir} has no tokens to score")
    T = lm.config.model.block_size
    cap = None if max_batches is None else max_batches * batch_size
    bf16 = use_bf16(precision, lm.device)
    if spec.encodes:
        return masked_lm_perplexity(lm, data, batch_size, max_batches, bf16)
    if spec.recurrent:
        loss_sum, count = recurrent_loss(lm.model, data, T, cap, lm.device, bf16)
        method = f"state carried through the split, chunks of {T}"
        total = math.ceil(len(data) / T)
    else:
        check_stride(stride, T)
        stride = stride or max(1, T // 2)
        batches = strided_batches(data, T, stride, batch_size, cap)
        loss_sum, count = summed_loss(causal_lm, lm.model, batches, lm.device, bf16)
        method = f"strided, stride {stride}, block {T}"
        total = len(strided_windows(len(data), T, stride))
    if cap is not None and cap < total:
        method += f", first {cap} of {total} {'chunks' if spec.recurrent else 'windows'}"
    loss = loss_sum / count
    result = {"split": split, "tokens": count, "loss": loss, "ppl": math.exp(loss), "method": method}
    if getattr(lm.model, "moe_config", None) is not None:  # say which MoE routing produced the number
        result["routing"] = lm.model.current_routing()
        result["routing_causal"] = result["routing"] in CAUSAL_RULES
    if split != "train" and "train" in data.manifest["splits"]:
        result["unigram_ppl"] = unigram_perplexity(TokenDataset(Path(data_dir), "train"), data)
    if data.bytes:  # per byte of the split's text: exact when every token is scored, else the split's average
        result["bits_per_byte"] = loss / math.log(2) * len(data) / data.bytes
    return result


def masked_lm_perplexity(lm, data: TokenDataset, batch_size: int, max_batches: int | None, bf16: bool) -> dict:
    """An encoder's masked-LM loss over non-overlapping windows, masked as its validation during training was.
    Not comparable with next-token perplexity, the unigram or bits per byte: the result says so."""
    T = lm.config.model.block_size
    objective = masked_lm_objective(lm)
    loss_sum, count = summed_loss(objective, lm.model, eval_batches(data, T, batch_size, max_batches), lm.device,
                                  bf16)
    if count == 0:
        raise ChoicelmError(f"split '{data.split}' of {data.dir} has no complete window of {T + 1} tokens")
    loss = loss_sum / count
    nsp = lm.config.model.nsp
    return {"split": data.split, "tokens": count, "loss": loss, "ppl": math.exp(loss),
            "method": f"masked-LM, non-overlapping windows of {T}",
            "objective": "mlm+nsp" if nsp else "mlm",
            "note": ("masked-LM loss and perplexity over the masked tokens only (BERT masking: 15% of tokens, "
                     "80/10/10; masks seeded by train.seed and each window's tokens), not next-token perplexity"
                     + ("; the loss adds the mean next-sentence loss, as the training run's val_loss does"
                        if nsp else ""))}


def masked_lm_objective(lm):
    """The MLM objective for an encoder checkpoint, masking as its validation during training did."""
    from ..data.mlm import MLMMasker
    from ..objectives import MaskedLM

    if lm.config.model.n_labels:
        raise ChoicelmError("this encoder is a classifier (model.n_labels > 0): it has no masked-LM loss to report; "
                            "evaluate the pretrained (masked-LM) checkpoint, or score the classifier on labelled data")
    return MaskedLM(MLMMasker.from_tokenizer(lm.tokenizer), lm.config.train.seed, nsp=lm.config.model.nsp)


def ngram_perplexity(lm, data: TokenDataset) -> dict:
    """A counted model scores the whole split as documents (its </s> predicts <|endoftext|>), so it scores the
    same tokens as a neural model on the same shards."""
    if lm.model.kind == "ids" and data.manifest["tokenizer"]["sha256"] != lm.model.tokenizer_sha256:
        raise ChoicelmError(f"--data {data.dir} was encoded with a different tokenizer than the n-gram model "
                            "was counted on; re-run `choicelm prepare` with the checkpoint's tokenizer folder")
    return score_split(lm.model, data, data.manifest["eot_id"])


def unigram_nats(train: TokenDataset, test: TokenDataset) -> float:
    """Summed negative log-likelihood (nats) of every token of `test` under the add-one unigram of `train`."""
    counts = sum(np.bincount(np.asarray(s), minlength=train.vocab_size) for s in train.shards).astype(np.float64)
    log_probs = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    return -sum(float(log_probs[np.asarray(s)].sum()) for s in test.shards)


def unigram_perplexity(train: TokenDataset, test: TokenDataset) -> float:
    """Perplexity of the add-one unigram model counted on `train`, over all of `test`: the floor a
    trained model must clearly beat."""
    return math.exp(unigram_nats(train, test) / test.tokens)


def evaluate(checkpoint: str | Path, data_dir: str | Path, metrics: list[str], split: str = "val",
             batch_size: int = 8, max_batches: int | None = None, device: str = "auto",
             routing: str | None = None, stride: int | None = None) -> dict:
    """perplexity() of one checkpoint. routing: an MoE model's routing rule for this evaluation (e.g. topk, to
    compare with the causal default); the result says which rule produced it and whether that rule is causal."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ChoicelmError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    check_stride(stride)
    from ..api import load

    lm = load(checkpoint, device)
    if routing is None:
        return perplexity(lm, data_dir, split, batch_size, max_batches, stride=stride)
    if not registry.get(lm.config.model.kind).moe:
        raise ChoicelmError(f"--routing {routing} needs an MoE GPT checkpoint; {checkpoint} is a {lm.config.model.kind}")
    with lm.model.routing_as(routing):
        return perplexity(lm, data_dir, split, batch_size, max_batches, stride=stride)


def compare(checkpoints: list[str | Path], data_dir: str | Path, split: str = "val", batch_size: int = 8,
            max_batches: int | None = None, device: str = "auto", routing: str | None = None,
            stride: int | None = None) -> list[dict]:
    """Rows {model, tokens, ppl, bits_per_byte, method} for the add-one unigram (when the data has a train
    split) and each checkpoint, all on the same split: print them with format_table."""
    check_stride(stride)
    data = TokenDataset(Path(data_dir), split)
    rows = []
    if split != "train" and "train" in data.manifest["splits"]:
        nats = unigram_nats(TokenDataset(Path(data_dir), "train"), data)
        rows.append({"model": "add-one unigram", "tokens": len(data), "ppl": math.exp(nats / len(data)),
                     "bits_per_byte": nats / math.log(2) / data.bytes if data.bytes else None,
                     "method": "no context, counted on train"})
    for checkpoint in checkpoints:
        r = evaluate(checkpoint, data_dir, ["ppl"], split, batch_size, max_batches, device, routing, stride)
        rows.append({"model": str(checkpoint), "tokens": r["tokens"], "ppl": r["ppl"],
                     "bits_per_byte": r.get("bits_per_byte"), "method": r["method"]})
    return rows


def format_table(rows: list[dict]) -> str:
    """compare()'s rows as a Markdown table."""
    lines = ["| model | scored tokens | ppl | bits per byte | method |", "| --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        bpb = "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.3f}"
        lines.append(f"| {r['model']} | {r['tokens']:,} | {r['ppl']:.2f} | {bpb} | {r['method']} |")
    return "\n".join(lines)
