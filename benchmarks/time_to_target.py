"""Time to target: how long a GPT trains before it predicts held-out text as well as a Kneser-Ney 5-gram.

    python benchmarks/time_to_target.py --data demo/data                          # configs/shakespeare.yaml
    python benchmarks/time_to_target.py --data demo/data --eval-every 25 --eval-windows 0 --model.n_layer=6

One process: count the n-gram on the training split (seconds), then train the GPT with the project's own
loop (Trainer.train_step, the same steps `choicelm pretrain` takes, no checkpoints) and every --eval-every
steps score the validation split with the fair perplexity of `choicelm evaluate` (evaluation/perplexity.py: strided
windows, every token once). --eval-windows caps that to the first windows of the split for speed (0 = the
whole split); the n-gram target is then scored on exactly those tokens too. Seconds are training time only
(evaluation excluded); tokens are training tokens (optimizer steps x global batch x block_size).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from choicelm.api import LanguageModel
from choicelm.core.config import load_config
from choicelm.data.loader import TokenDataset
from choicelm.evaluation.perplexity import perplexity
from choicelm.models.ngram import NGramLM
from choicelm.text import Tokenizer
from choicelm.data.loader import split_documents
from choicelm.models.ngram import score_stream
from choicelm.train.distributed import DistInfo
from choicelm.train.loop import Trainer, pretraining_inputs
from choicelm.core.runtime import keep_freed_memory, pick_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder written by `choicelm prepare` (with a val split)")
    ap.add_argument("--config", default="configs/shakespeare.yaml")
    ap.add_argument("--order", type=int, default=5, help="the Kneser-Ney n-gram's order")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    ap.add_argument("--eval-windows", type=int, default=64, help="score the first N strided windows, rounded up to "
                    "batches of 8 (0 = all)")
    ap.add_argument("--stride", type=int, default=None, help="evaluation stride (default block_size // 2)")
    ap.add_argument("--max-steps", type=int, default=None, help="default: the config's train.max_steps")
    ap.add_argument("--keep-going", action="store_true", help="train to max-steps after reaching the target")
    args, overrides = ap.parse_known_args()

    overrides += [f"--data.path={args.data}", "--train.eval_every=0"]  # evaluation is done here, fairly
    cfg = load_config(args.config, overrides + ([f"--train.max_steps={args.max_steps}"] if args.max_steps else []))
    if cfg.train.tune_allocator:
        keep_freed_memory()
    val = TokenDataset(args.data, "val")
    val_ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in val.shards])

    t0 = time.perf_counter()
    train = TokenDataset(args.data, "train")
    tok = Tokenizer.load(Path(args.data) / train.manifest["tokenizer"]["dir"])
    ngram = NGramLM.fit(split_documents(train, train.eot_id), args.order, vocab_size=train.vocab_size, tokenizer=tok)
    count_s = time.perf_counter() - t0

    device = pick_device(cfg.train.device)
    out = Path(tempfile.mkdtemp(prefix="time_to_target-"))
    trainer = Trainer(cfg, out, DistInfo(), device, None, True, pretraining_inputs(cfg))
    lm = LanguageModel(trainer.model, tok, cfg, out)
    cap = args.eval_windows or None
    print(f"{cfg.model.kind} {cfg.model.n_layer}x{cfg.model.n_embd}, block {cfg.model.block_size}, "
          f"{trainer.sampler.tokens_per_step:,} tokens/step, precision {cfg.train.precision}; "
          f"KN {args.order}-gram counted in {count_s:.1f} s")

    rows, reached, target = [], None, None
    while trainer.step < cfg.train.max_steps:
        t = time.perf_counter()
        trainer.train_step()
        trainer.elapsed += time.perf_counter() - t
        trainer.step += 1
        trainer.tokens += trainer.sampler.tokens_per_step
        if trainer.step % args.eval_every and trainer.step < cfg.train.max_steps:
            continue
        trainer.model.eval()
        result = perplexity(lm, args.data, "val", batch_size=8, max_batches=cap and -(-cap // 8),
                            stride=args.stride)
        trainer.model.train()
        if target is None:  # the n-gram on exactly the tokens the GPT is scored on
            logp, n = score_stream(ngram, val_ids[:result["tokens"]], val.eot_id)
            assert n == result["tokens"]
            target = float(np.exp(-logp / n))
            print(f"scored: {n:,} of {len(val):,} val tokens ({result['method']}); KN {args.order}-gram ppl "
                  f"{target:.2f} on them\n")
            print("| step | train tokens | train s | GPT val ppl | KN ppl |")
            print("| ---: | ---: | ---: | ---: | ---: |")
        rows.append((trainer.step, trainer.tokens, trainer.elapsed, result["ppl"]))
        print(f"| {trainer.step} | {trainer.tokens:,} | {trainer.elapsed:.1f} | {result['ppl']:.2f} | {target:.2f} |",
              flush=True)
        if reached is None and result["ppl"] <= target:
            reached = rows[-1]
            if not args.keep_going:
                break
    if reached:
        step, tokens, seconds, ppl = reached
        print(f"\nreached the KN {args.order}-gram ({target:.2f}) at step {step}: {seconds:.1f} s of training, "
              f"{tokens:,} tokens (ppl {ppl:.2f}); measured every {args.eval_every} steps")
    else:
        print(f"\nnot reached in {trainer.step} steps ({trainer.elapsed:.1f} s, {trainer.tokens:,} tokens): "
              f"best ppl {min(r[3] for r in rows):.2f} vs KN {args.order}-gram {target:.2f}")
    shutil.rmtree(out, ignore_errors=True)  # nothing is saved: the run exists only to be timed


if __name__ == "__main__":
    main()
