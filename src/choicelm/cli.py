"""The `choicelm` command. Each verb parses its flags and calls one library function.

    choicelm tokenizer train --input PATH --vocab-size N --out DIR [--kind bpe|char]
    choicelm prepare  --input PATH --tokenizer DIR --out DIR [--val-files a,b | --val-fraction F]
    choicelm pretrain --config configs/X.yaml --data DIR --out RUN [--section.key=value ...] [--resume auto]
    choicelm finetune --task classify|seq2seq|sft --from CKPT --train FILE [--val FILE] --out RUN
                      [--config YAML --tokenizer DIR (a fresh model)] [--section.key=value ...] [--resume auto]
    choicelm evaluate --checkpoint RUN [RUN ...] --data DIR --metrics ppl [--stride N]   # several: a table
    choicelm evaluate --checkpoint RUN --data FILE [--metrics accuracy,f1 | bleu,rouge] [--num-beams N]
    choicelm generate --checkpoint RUN --prompt "..." [--max-new-tokens --temperature --top-k --top-p --min-p
                      --repetition-penalty --presence-penalty --frequency-penalty --no-repeat-ngram-size
                      --num-beams --length-penalty --seed --stop S ... --stream --num-samples N]
    choicelm chat     --checkpoint RUN [same options]       # terminal chat; /reset, /quit
    choicelm serve    --checkpoint RUN [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 16 --max-queue 64]
    choicelm plot     RUN
    choicelm study    routing --data DIR --config YAML --arms dense,tc2,ec_threshold,... --seeds N
                      (--max-time S | --max-tokens N) --out DIR [--section.key=value ...] [--overwrite]
    choicelm convert  from-hf HF_DIR OUT [--tokenizer DIR] | to-hf CHECKPOINT OUT   [--overwrite]

Bad input, including a full disk, a read-only target or a missing optional package, ends with one line
`choicelm: error: ...` on stderr and exit status 2. SIGINT / SIGTERM stop a training run after the current step
and a checkpoint, with one line saying how to continue, and exit status 130 / 143.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import sys

from .core.errors import ChoicelmError, StoppedBySignal, as_os_error


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_tokenizer_train(args) -> None:
    from .text import Tokenizer

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
    from .core.config import load_config
    from .train.loop import pretrain

    extra = list(overrides)
    if args.data:
        extra.append(f"--data.path={args.data}")
    cfg = load_config(args.config, extra)
    final = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {final}")


def cmd_finetune(args, overrides: list[str]) -> None:
    from .core.config import load_config
    from .finetune.run import finetune

    extra = [f"--finetune.task={args.task}"] + list(overrides)
    for key, value in (("init", args.init), ("train_file", args.train), ("val_file", args.val),
                       ("tokenizer", args.tokenizer)):
        if value:
            extra.append(f"--finetune.{key}={value}")
    final = finetune(load_config(args.config, extra), args.out, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {final}")
    report = final.parent / "eval.json"
    if report.is_file():
        from .evaluation.tasks import summary

        print(f"validation: {summary(json.loads(report.read_text()))} (all figures: {report})")


def cmd_evaluate(args) -> None:
    from pathlib import Path

    metrics = _comma_list(args.metrics) if args.metrics else []
    several = len(args.checkpoint) > 1
    if Path(args.data).is_file() and Path(args.data).suffix.lower() not in TASK_FILE_SUFFIXES:
        raise ChoicelmError(_text_file_hint(args.data, args.checkpoint[0]))
    if Path(args.data).is_file():  # a task file: fine-tuning metrics
        from . import load
        from .evaluation.tasks import evaluate_file

        if several:
            raise ChoicelmError("a task file is scored one --checkpoint at a time; several checkpoints are "
                                "compared on prepared data (--metrics ppl)")
        result = evaluate_file(load(args.checkpoint[0], args.device), args.data, metrics, num_beams=args.num_beams,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        print(json.dumps(result, indent=1))
        return
    from .evaluation.perplexity import compare, evaluate, format_table

    options = dict(split=args.split, batch_size=args.batch_size, max_batches=args.max_batches, device=args.device,
                   routing=args.routing, stride=args.stride)
    if several:  # one table, every model on the same tokens
        if set(metrics) - {"ppl"}:
            raise ChoicelmError(f"several checkpoints are compared on perplexity only, not {','.join(metrics)}")
        print(format_table(compare(args.checkpoint, args.data, **options)))
        return
    print(json.dumps(evaluate(args.checkpoint[0], args.data, metrics or ["ppl"], **options), indent=1))


TASK_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _text_file_hint(data: str, checkpoint: str) -> str:
    """What to run when `evaluate --data` names a plain text file: perplexity reads a prepared folder."""
    from .core.checkpoint import resolve_checkpoint

    try:
        tokenizer = resolve_checkpoint(checkpoint) / "tokenizer"
    except ChoicelmError:
        tokenizer = "CHECKPOINT/step-XXXXXXXX/tokenizer"
    return (f"--data {data} is a plain file, but perplexity is measured on a folder written by `choicelm prepare` "
            f"with the model's tokenizer: run `choicelm prepare --input {data} --tokenizer {tokenizer} --out DIR`, "
            f"then `choicelm evaluate --checkpoint {checkpoint} --data DIR --split train` (all of its tokens); a task "
            "file (.csv, .tsv, .jsonl) scores a fine-tuned model")


def cmd_generate(args) -> None:
    from . import load
    from .generation.config import NUM_SAMPLES, GenerationConfig, generation_arguments

    num_samples = NUM_SAMPLES.check(args.num_samples)
    options = generation_arguments(args)
    GenerationConfig(**options)  # a bad option fails before the model is loaded
    seed = options.pop("seed")
    lm = load(args.checkpoint, args.device)
    lm.generation_config(seed=seed, **options)  # and anything this model cannot do before anything is printed
    for i in range(num_samples):
        seed_i = None if seed is None else seed + i
        if num_samples > 1:
            print(f"--- sample {i + 1}")
        if args.stream:
            print(args.prompt, end="", flush=True)
            for delta in lm.stream(args.prompt, seed=seed_i, **options):
                print(delta, end="", flush=True)
            print()
        else:
            print(args.prompt + lm.generate(args.prompt, seed=seed_i, **options))


def cmd_chat(args) -> None:
    from . import load
    from .generation.chat import ChatSession
    from .generation.config import generation_arguments

    lm = load(args.checkpoint, args.device)
    session = ChatSession(lm, system=args.system, **generation_arguments(args))
    lm.generation_config(**session.options)  # a bad option fails before the first prompt
    print("chat with the model; /reset clears the history, /quit (or Ctrl-D) leaves", flush=True)
    while True:
        try:
            message = input("you> ")
        except EOFError:
            print()
            return
        command = message.strip()
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
            continue
        if not command:
            continue
        print("model> ", end="", flush=True)
        for delta in session.reply(message):
            print(delta, end="", flush=True)
        print(flush=True)


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    from .generation.config import add_generation_arguments

    add_generation_arguments(p)
    p.add_argument("--device", default="auto")


def _num_samples_flag(p: argparse.ArgumentParser) -> None:
    from .generation.config import NUM_SAMPLES

    NUM_SAMPLES.add_argument(p)


def cmd_serve(args) -> None:
    from .serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, device=args.device, dtype=args.dtype, model_name=args.model_name,
          max_body_mb=args.max_body_mb, allowed_hosts=args.allowed_hosts)


def cmd_plot(args) -> None:
    from .plots import plot_run

    for path in plot_run(args.run, args.out):
        print(f"wrote {path}")


def cmd_study_routing(args, overrides: list[str]) -> None:
    from .study import run_routing_study

    command = " ".join(shlex.quote(a) for a in ["choicelm", *sys.argv[1:]]) if sys.argv[1:2] == ["study"] else None
    report = run_routing_study(args.config, args.data, args.out, args.arms, args.seeds, max_time=args.max_time,
                               max_tokens=args.max_tokens, overrides=overrides, overwrite=args.overwrite,
                               command=command)
    print(f"done: {report}")


def cmd_convert_from_hf(args) -> None:
    from .interop import from_hf

    out = from_hf(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {out} (load it with choicelm.load or --checkpoint {out})")


def cmd_convert_to_hf(args) -> None:
    from .interop import to_hf

    out = to_hf(args.src, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained load it)")


def cmd_convert_to_arpa(args) -> None:
    from .interop.arpa import to_arpa

    print(f"wrote {to_arpa(args.src, args.out, overwrite=args.overwrite)}")


def _study_arms() -> dict:
    from .study.arms import ARMS

    return ARMS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (`choicelm: error: ...`, exit 2)."""

    def error(self, message: str):
        verb = self.prog.removeprefix("choicelm").strip()
        print(f"choicelm: error: {f'{verb}: ' if verb else ''}{message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def _int_at_least(low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; use an integer from {low}"
                                             f"{f' to {high}' if high is not None else ' up'}")
        return number

    parse.__name__ = "integer"
    return parse


_port = _int_at_least(1, 65535)
_positive_int = _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="choicelm", description="From raw text to a trained language model.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verb in (_tokenizer_parser, _prepare_parser, _pretrain_parser, _finetune_parser, _evaluate_parser,
                     _generate_parser, _chat_parser, _serve_parser, _plot_parser, _study_parser, _convert_parser):
        add_verb(verbs)
    return parser


def _tokenizer_parser(verbs) -> None:
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


def _prepare_parser(verbs) -> None:
    p = verbs.add_parser("prepare", help="encode text files into token shards for training")
    p.add_argument("--input", nargs="+", required=True, help="text files or directories")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--val-files", type=_comma_list, default=None, help="comma-separated file names held out for validation")
    p.add_argument("--val-fraction", type=_finite_float, default=0.0, help="share of the data held out for validation")
    p.add_argument("--errors", choices=("strict", "skip"), default="strict")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_prepare)


def _run_epilog() -> str:
    from .core.config import config_help

    return "config keys (override any with --section.key=value):\n" + config_help()


def _add_run_dir_args(p) -> None:
    """--out, --resume and --overwrite: the run directory of a training verb."""
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", help="auto (newest complete checkpoint in --out, if any) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out and start over")


def _pretrain_parser(verbs) -> None:
    p = verbs.add_parser("pretrain", help="train a model from scratch on prepared shards",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_run_epilog())
    p.add_argument("--config", help="YAML config, e.g. configs/shakespeare.yaml (defaults: GPT-2 124M)")
    p.add_argument("--data", help="directory written by `choicelm prepare`")
    _add_run_dir_args(p)
    p.set_defaults(func=cmd_pretrain, takes_overrides=True)


def _finetune_parser(verbs) -> None:
    p = verbs.add_parser("finetune", help="fine-tune for a task: classify, seq2seq or sft (chat replies)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_run_epilog())
    p.add_argument("--task", required=True, choices=("classify", "seq2seq", "sft"))
    p.add_argument("--from", dest="init", help="checkpoint to start from (run or step folder); its model is used")
    p.add_argument("--train", required=True, help="training examples: .csv/.jsonl (classify), .tsv/.jsonl "
                                                  "(seq2seq), .jsonl (sft)")
    p.add_argument("--val", help="held-out examples: validation loss while training, task metrics at the end")
    p.add_argument("--config", help="YAML config (optim, train, finetune sections; the model section for a fresh "
                                    "model)")
    p.add_argument("--tokenizer", help="tokenizer folder, for a fresh model (no --from)")
    _add_run_dir_args(p)
    p.set_defaults(func=cmd_finetune, takes_overrides=True)


def _evaluate_parser(verbs) -> None:
    p = verbs.add_parser("evaluate", help="score a checkpoint on prepared data, or on a task file")
    p.add_argument("--checkpoint", required=True, nargs="+", help="run directory or step-XXXXXXXX folder; several "
                   "print a table comparing them (and the add-one unigram) on the same tokens")
    p.add_argument("--data", required=True, help="directory written by `choicelm prepare`, or a task file "
                                                 "(.csv/.tsv/.jsonl as for finetune)")
    p.add_argument("--metrics", default="", help="comma-separated: ppl (prepared data; perplexity and bits per byte); "
                                                 "accuracy, precision, recall, f1 (classifier); bleu, rouge "
                                                 "(encoder-decoder). Default: ppl, or all of the task's")
    p.add_argument("--num-beams", type=_positive_int, default=1, help="seq2seq: beam search width (1 = greedy)")
    p.add_argument("--max-new-tokens", type=_int_at_least(0), default=0, help="seq2seq: longest output (0 = the "
                                                                              "run's max_target_length, else 64)")
    p.add_argument("--split", default="val", help="val or train")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-batches", type=_positive_int, default=None, help="stop after this many batches "
                                                                           "(default: all)")
    p.add_argument("--stride", type=int, default=None, help="ppl of a GPT: score windows of block_size "
                   "tokens every STRIDE tokens, each token once (default block_size // 2; block_size = "
                   "non-overlapping windows)")
    p.add_argument("--device", default="auto")
    p.add_argument("--routing", default=None, help="MoE models: route with this rule (topk | threshold | predictor | "
                                                   "capacity | dropless); default: the causal rule generation uses")
    p.set_defaults(func=cmd_evaluate)


def _generate_parser(verbs) -> None:
    p = verbs.add_parser("generate", help="continue a prompt")
    p.add_argument("--checkpoint", required=True, help="run directory or step-XXXXXXXX folder")
    p.add_argument("--prompt", required=True)
    _add_generation_flags(p)
    _num_samples_flag(p)
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(func=cmd_generate)


def _chat_parser(verbs) -> None:
    p = verbs.add_parser("chat", help="chat with a model in the terminal (/reset, /quit)")
    p.add_argument("--checkpoint", required=True, help="run directory or step-XXXXXXXX folder")
    p.add_argument("--system", default=None, help="text put before the conversation")
    _add_generation_flags(p)
    p.set_defaults(func=cmd_chat)


def _serve_parser(verbs) -> None:
    p = verbs.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /")
    p.add_argument("--checkpoint", required=True, help="run directory or step-XXXXXXXX folder (a GPT, dense or MoE)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1 to 65535")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=_positive_int, default=64, help="requests allowed to wait; more get HTTP 429")
    p.add_argument("--max-body-mb", type=_finite_float, default=8.0, help="largest request body; larger ones get HTTP 413")
    p.add_argument("--allowed-hosts", type=_comma_list, default=None,
                   help="Host names answered when bound to a loopback address without --api-key (comma list; "
                        "default: localhost, 127.0.0.1, [::1]; '*' = any)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run's folder name)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weights' precision (default: as stored)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)


def _plot_parser(verbs) -> None:
    p = verbs.add_parser("plot", help="draw a run's loss and throughput curves as PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.set_defaults(func=cmd_plot)


def _study_parser(verbs) -> None:
    study = verbs.add_parser("study", help="compare training recipes over seeds (MoE routing rules)")
    study = study.add_subparsers(dest="action", required=True, metavar="{routing}")
    p = study.add_parser("routing", help="dense vs token choice vs expert choice at equal active FLOPs, equal tokens "
                                         "and equal wall-clock; report.md, runs.csv, curves", epilog="arms: " +
                         "; ".join(f"{name}: {arm.what}" for name, arm in _study_arms().items()))
    p.add_argument("--data", required=True, help="directory written by `choicelm prepare` (with a val split)")
    p.add_argument("--config", required=True, help="the dense recipe, e.g. configs/shakespeare.yaml")
    p.add_argument("--arms", required=True, help="comma-separated: " + ",".join(_study_arms()))
    p.add_argument("--seeds", type=int, default=3, help="runs per training recipe (train.seed = 1..N)")
    p.add_argument("--max-time", type=_finite_float, default=None, help="about S seconds of dense training per run "
                                                                        "(measured by a short probe, turned into steps)")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens per run (sets max_steps)")
    p.add_argument("--out", required=True, help="study directory (rerun the same command to resume)")
    p.add_argument("--overwrite", action="store_true", help="replace a study made by another command in --out")
    p.set_defaults(func=cmd_study_routing, takes_overrides=True)


def _convert_parser(verbs) -> None:
    conv = verbs.add_parser("convert", help="convert checkpoints to and from Hugging Face (and ARPA)")
    conv = conv.add_subparsers(dest="action", required=True, metavar="{from-hf,to-hf,to-arpa}")
    p = conv.add_parser("from-hf", help="a Hugging Face GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM, "
                                        "Bert* (BertModel, BertForMaskedLM, BertForPreTraining, "
                                        "BertForSequenceClassification) or MarianMTModel folder -> choicelm checkpoint")
    p.add_argument("src", metavar="HF_DIR", help="folder with config.json, model.safetensors (or pytorch_model.bin) "
                                                 "and tokenizer.json or vocab.json + merges.txt")
    p.add_argument("out", metavar="OUT", help="checkpoint folder to write (must not exist or be empty)")
    p.add_argument("--tokenizer", default=None, help="take the tokenizer from this folder instead of HF_DIR (Marian "
                                                     "needs one: its SentencePiece model has no tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert_from_hf)
    p = conv.add_parser("to-hf", help="a choicelm checkpoint -> Hugging Face folder (safetensors, config.json, tokenizer)")
    p.add_argument("src", metavar="CHECKPOINT", help="run directory (newest complete checkpoint) or step-XXXXXXXX folder")
    p.add_argument("out", metavar="OUT", help="folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert_to_hf)
    p = conv.add_parser("to-arpa", help="an n-gram checkpoint -> ARPA file (KenLM and SRILM load it)")
    p.add_argument("src", metavar="CHECKPOINT", help="n-gram run directory or step-XXXXXXXX folder")
    p.add_argument("out", metavar="OUT", help="the .arpa file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert_to_arpa)


# Optional dependencies: the module a verb imports -> the extra that installs it.
EXTRAS = {"matplotlib": "plot", "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "transformers": "hf",
          "peft": "finetune", "sklearn": "finetune", "sacrebleu": "finetune", "rouge_score": "finetune"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0 done, 2 bad input (one line on stderr), 130 / 143 stopped
    by SIGINT / SIGTERM (a run saves a checkpoint first and says how to resume)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
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
        return _fail(str(e))
    except StoppedBySignal as e:
        print(f"choicelm: {e}; to continue: {_resume_command(argv)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"choicelm: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        return _fail(f"`choicelm {args.verb}` needs the optional package {top}, which is not installed; install it "
                     f"with: pip install 'choicelm[{EXTRAS[top]}]'")
    except Exception as e:  # OSError, or one a Rust library turned into its own type (safetensors' full disk)
        os_error = as_os_error(e)
        if os_error is None:
            raise
        return _fail(os_error_message(os_error))
    return 0


def _fail(message: str) -> int:
    print(f"choicelm: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return 2


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_HINTS = {errno.ENOSPC: "free some space or write somewhere else", errno.EDQUOT: "free some space or write somewhere "
          "else", errno.EROFS: "write somewhere else", errno.EACCES: "check its permissions or write somewhere else",
          errno.EPERM: "check its permissions or write somewhere else"}


def os_error_message(e: OSError) -> str:
    """`cannot write PATH: No space left on device; free some space ...` for an OSError from any verb."""
    meaning = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
    path = e.filename if e.filename is not None else None
    action = "write" if e.errno in _WRITE_ERRNOS else "access"
    where = f"cannot {action} {path}" if path is not None else f"cannot {action} a file"
    if e.filename2 is not None:
        where += f" (or {e.filename2})"
    hint = _HINTS.get(e.errno)
    return f"{where}: {meaning}{f'; {hint}' if hint else ''}"


def _resume_command(argv: list[str]) -> str:
    """The command line that continues a stopped run: the same flags with --resume auto, without --overwrite (a
    study resumes its runs when the same command runs again)."""
    if argv[:1] not in (["pretrain"], ["finetune"]):
        return shlex.join(["choicelm", *argv])
    out, skip = ["choicelm"], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--overwrite" or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            skip = True
            continue
        out.append(arg)
    return shlex.join(out + ["--resume", "auto"])


if __name__ == "__main__":
    sys.exit(main())
