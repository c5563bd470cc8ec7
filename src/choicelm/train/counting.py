"""Training by counting: `choicelm pretrain` for model.kind=ngram.

An n-gram model needs no gradient steps: it counts the training split once (models/ngram.py), scores
the validation split, and writes the same run directory as every other model: config.yaml,
metrics.csv (one row, step 1), summary.json and RUN/step-00000001/ (ngram.npz, ngram.json,
config.yaml, tokenizer/, COMPLETE), written atomically by the shared checkpoint code.

Two vocabularies (config `ngram.tokenizer`):
    data    the prepared shards' token ids; documents end at <|endoftext|>, which the model predicts as </s>
    words   whitespace words of the split's source text files, one sentence per line (KenLM's convention)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import yaml

from ..config import Config
from ..data.loader import TokenDataset
from ..errors import ChoicelmError
from ..models.ngram import NGramLM
from ..tokenizer import Tokenizer
from . import checkpoint as ckpt
from .metrics import MetricsLog


def split_documents(data: TokenDataset, eot_id: int) -> list[np.ndarray]:
    """The split's token stream cut at <|endoftext|> (dropped: the model's </s> stands for it)."""
    docs = []
    for shard in data.shards:
        ids = np.asarray(shard, dtype=np.int64)
        cuts = np.flatnonzero(ids == eot_id)
        start = 0
        for cut in cuts:
            docs.append(ids[start:cut])
            start = cut + 1
        if start < len(ids):
            docs.append(ids[start:])
    return docs


def text_lines(data: TokenDataset) -> list[str]:
    """The non-blank lines of the split's source text files (word models)."""
    lines = []
    for name in data.manifest["splits"][data.split]["files"]:
        path = Path(name)
        if not path.is_file():
            raise ChoicelmError(f"a word n-gram reads the source text, but {path} (listed in {data.dir}/manifest.json) "
                                "is gone; restore it or use ngram.tokenizer=data")
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines


def score_stream(lm: NGramLM, ids: np.ndarray, eot_id: int) -> tuple[float, int]:
    """(total natural-log probability, predictions) of a token stream as documents cut at <|endoftext|>:
    each document's tokens, then </s> for the <|endoftext|> that ends it. After the last one comes either
    nothing or a document the stream cuts off, whose tokens are scored but not an end it does not have;
    so the predictions are exactly the stream's tokens, as for a neural model (evaluation.py)."""
    cuts = np.flatnonzero(ids == eot_id)
    docs = [ids[a:b] for a, b in zip(np.r_[0, cuts + 1], np.r_[cuts, len(ids)])]
    total, count = lm.score(docs[:-1])
    rest_total, rest_count = lm.score(docs[-1:], eos=False)
    return total + rest_total, count + rest_count


def score_split(lm: NGramLM, data: TokenDataset, eot_id: int) -> dict:
    """Per-prediction loss (nats; </s> counted, as KenLM does), perplexity and bits per byte of a split.

    A token model predicts exactly the split's tokens (an <|endoftext|> as </s>), as a neural model's
    `choicelm evaluate` does; a word model predicts the split's words and one </s> per line."""
    if lm.kind == "words":
        logp_total, count = lm.score([lm.words.encode(line) for line in text_lines(data)])
        method = f"lines of words ({lm.order}-gram, {lm.smoothing})"
    else:
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in data.shards])  # a document may span shards
        logp_total, count = score_stream(lm, ids, eot_id)
        method = f"documents ({lm.order}-gram, {lm.smoothing})"
    nats = -logp_total
    if count == 0:
        raise ChoicelmError(f"split '{data.split}' of {data.dir} has nothing to score")
    loss = nats / count
    n_bytes = data.manifest["splits"][data.split].get("bytes")
    result = {"split": data.split, "tokens": count, "loss": loss, "ppl": math.exp(loss), "method": method}
    if n_bytes:
        result["bits_per_byte"] = nats / math.log(2) / n_bytes
    return result


def count_ngram(cfg: Config, out_dir: Path, resume: str | None, overwrite: bool) -> Path:
    """Count cfg.data.path's training split into an n-gram model and write the run to out_dir."""
    from .loop import prepare_run_dir  # the same rules for an existing --out as gradient training

    if not cfg.data.path:
        raise ChoicelmError("no training data: pass --data DIR (a directory written by `choicelm prepare`)")
    data_dir = Path(cfg.data.path)
    train = TokenDataset(data_dir, "train")
    resume_from = prepare_run_dir(out_dir, resume, overwrite, True)
    if resume_from is not None:  # counting is one step: a complete checkpoint is the whole run
        return resume_from
    manifest = train.manifest
    tokenizer_dir = data_dir / manifest["tokenizer"]["dir"]
    n = cfg.ngram
    words = n.tokenizer == "words"
    options = dict(smoothing=n.smoothing, prune_singletons=n.prune_singletons, k=n.k,
                   discount_fallback=n.discount_fallback)

    t0 = time.perf_counter()
    if words:
        lines = text_lines(train)
        lm = NGramLM.fit_words(lines, n.order, min_count=n.min_count, max_vocab=n.max_vocab or None, **options)
        tokens = sum(len(line.split()) for line in lines)
    else:
        tok = Tokenizer.load(tokenizer_dir)
        lm = NGramLM.fit(split_documents(train, manifest["eot_id"]), n.order, vocab_size=manifest["vocab_size"],
                         tokenizer=tok, **options)
        tokens = len(train)
    elapsed = time.perf_counter() - t0
    val = score_split(lm, TokenDataset(data_dir, "val"), manifest["eot_id"]) if "val" in manifest["splits"] else None

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(out_dir / "config.yaml")
    log = MetricsLog(out_dir, None)
    log.write({"step": 1, "tokens": tokens, "val_loss": val and val["loss"], "val_ppl": val and val["ppl"],
               "tokens_per_s": tokens / max(elapsed, 1e-9), "elapsed_s": elapsed})
    log.close()
    path = ckpt.save_checkpoint(out_dir, 1, lm, None, {"step": 1, "tokens": tokens, "elapsed": elapsed},
                                yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                                tokenizer_dir if tokenizer_dir.is_dir() else None, val and val["loss"])
    summary = {"step": 1, "tokens": tokens, "elapsed_s": round(elapsed, 3), "ngrams": lm.num_ngrams(),
               "best_val_loss": val and val["loss"], "val": val}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return path
