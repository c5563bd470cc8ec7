"""The `choicelm` command. Each verb parses its flags and calls one library function.

    choicelm tokenizer train --input PATH --vocab-size N --out DIR [--kind bpe|char]
    choicelm prepare  --input PATH --tokenizer DIR --out DIR [--val-files a,b | --val-fraction F]
    choicelm pretrain --config configs/X.yaml --data DIR --out RUN [--section.key=value ...] [--resume auto]
    choicelm evaluate --checkpoint RUN --data DIR --metrics ppl
    choicelm generate --checkpoint RUN --prompt "..." [--max-new-tokens --temperature --top-k --top-p --seed]
    choicelm plot     RUN

Bad input ends with one line `choicelm: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ChoicelmError


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_tokenizer_train(args) -> None:
    from .tokenizer import Tokenizer

    tok = Tokenizer.train(args.input, args.vocab_size, kind=args.kind, errors=args.errors)
    tok.save(args.out, overwrite=args.overwrite)
    print(f"trained a {tok.kind} tokenizer with {tok.vocab_size} tokens -> {args.out}/tokenizer.json")


def cmd_prepare(args) -> None:
    from .data.prepare import prepare

    manifest = prepare(args.input, args.tokenizer, args.out, val_files=args.val_files,
                       val_fraction=args.val_fraction, errors=args.errors, overwrite=args.overwrite)
    splits = ", ".join(f"{name}: {info['tokens']:,} tokens" for name, info in manifest["splits"].items())
    print(f"wrote {args.out} ({splits}; dtype {manifest['dtype']})")


def cmd_pretrain(args, overrides: list[str]) -> None:
    from .config import load_config
    from .train.loop import pretrain

    extra = list(overrides)
    if args.data:
        extra.append(f"--data.path={args.data}")
    cfg = load_config(args.config, extra)
    final = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {final}")


def cmd_evaluate(args) -> None:
    from .evaluation import evaluate

    result = evaluate(args.checkpoint, args.data, _comma_list(args.metrics), split=args.split,
                      batch_size=args.batch_size, max_batches=args.max_batches, device=args.device)
    print(json.dumps(result, indent=1))


def cmd_generate(args) -> None:
    from . import load

    lm = load(args.checkpoint, args.device)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = lm.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k or None, top_p=args.top_p, seed=seed)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + text)


def cmd_plot(args) -> None:
    from .plots import plot_run

    for path in plot_run(args.run, args.out):
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    from .config import config_help

    parser = argparse.ArgumentParser(prog="choicelm", description="From raw text to a trained language model.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    tok = verbs.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE or char tokenizer on text files")
    p.add_argument("--input", nargs="+", required=True, help="text files or directories")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokens including special tokens (bpe)")
    p.add_argument("--kind", choices=("bpe", "char"), default="bpe", help="byte-level BPE or characters")
    p.add_argument("--out", required=True, help="directory for tokenizer.json")
    p.add_argument("--errors", choices=("strict", "skip"), default="strict",
                   help="strict: stop at a non-UTF-8 file; skip: leave such files out and count them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in --out")
    p.set_defaults(func=cmd_tokenizer_train)

    p = verbs.add_parser("prepare", help="encode text files into token shards for training")
    p.add_argument("--input", nargs="+", required=True, help="text files or directories")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--val-files", type=_comma_list, default=None, help="comma-separated file names held out for validation")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of the data held out for validation")
    p.add_argument("--errors", choices=("strict", "skip"), default="strict")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prepare)

    p = verbs.add_parser("pretrain", help="train a model from scratch on prepared shards",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="config keys (override any with --section.key=value):\n" + config_help())
    p.add_argument("--config", help="YAML config, e.g. configs/shakespeare.yaml (defaults: GPT-2 124M)")
    p.add_argument("--data", help="directory written by `choicelm prepare`")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", help="auto (newest complete checkpoint in --out, if any) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")
    p.set_defaults(func=cmd_pretrain, takes_overrides=True)

    p = verbs.add_parser("evaluate", help="score a checkpoint on prepared data")
    p.add_argument("--checkpoint", required=True, help="run directory or step-XXXXXXXX folder")
    p.add_argument("--data", required=True, help="directory written by `choicelm prepare`")
    p.add_argument("--metrics", default="ppl", help="comma-separated: ppl (perplexity and bits per byte)")
    p.add_argument("--split", default="val", help="val or train")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (default: all)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("generate", help="continue a prompt")
    p.add_argument("--checkpoint", required=True, help="run directory or step-XXXXXXXX folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("plot", help="draw a run's loss and throughput curves as PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, rest)
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            args.func(args)
    except ChoicelmError as e:
        print(f"choicelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("choicelm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
