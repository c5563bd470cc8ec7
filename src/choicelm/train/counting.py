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
import time
from pathlib import Path

import yaml

from ..core import checkpoint as ckpt
from ..core.config import Config
from ..core.errors import ChoicelmError
from ..core.run_dir import prepare_run_dir
from ..data.loader import TokenDataset, split_documents, text_lines
from ..models.ngram import NGramLM
from ..objectives import score_split
from ..text import Tokenizer
from .run_log import MetricsLog


def count_ngram(cfg: Config, out_dir: Path, resume: str | None, overwrite: bool) -> Path:
    """Count cfg.data.path's training split into an n-gram model and write the run to out_dir."""
    if not cfg.data.path:
        raise ChoicelmError("no training data: pass --data DIR (a directory written by `choicelm prepare`)")
    data_dir = Path(cfg.data.path)
    train = TokenDataset(data_dir, "train")
    plan = prepare_run_dir(out_dir, resume, overwrite, True)  # the same rules (and lock) as gradient training
    try:
        if plan.resume_from is not None:  # counting is one step: a complete checkpoint is the whole run
            return plan.resume_from
        return _count(cfg, out_dir, data_dir, train)
    finally:
        plan.release()


def _count(cfg: Config, out_dir: Path, data_dir: Path, train: TokenDataset) -> Path:
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
