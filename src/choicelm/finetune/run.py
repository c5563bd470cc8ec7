"""`choicelm finetune`: a task's files + a starting model -> RunInputs for the one training loop.

    finetune(load_config("configs/bert-tiny.yaml", ["--finetune.task=classify", "--finetune.init=runs/mlm",
             "--finetune.train_file=train.csv", "--finetune.val_file=val.csv"]), "runs/cls")

The starting model is a choicelm checkpoint (its model and moe sections replace the config's), or a fresh
model from the config's model section and a tokenizer folder. Then the task's own part, one function each,
chosen by the table TASKS (which families fit a task is the model registry's `ModelSpec.tasks`):

    classify   a bert or gpt model; a fresh classification head over the training file's labels (sorted; the
               names go into every checkpoint as labels.json)
    seq2seq    a seq2seq model; targets end with EOS, the decoder starts from BOS (or pad, as Marian)
    sft        a gpt model; conversations under a chat template, loss on the assistant replies only; the template
               is saved in the checkpoint's tokenizer folder, where `choicelm chat` and `serve` read it

Optionally LoRA (models/lora.py: only adapters and a new head train; checkpoints hold the adapters, and
`choicelm.load` merges them into the base weights) and adversarial training (finetune/adversarial.py).
At the end the task metrics on the validation file go to RUN/eval.json (evaluation/tasks.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..core import checkpoint as ckpt
from ..core.config import Config
from ..core.errors import ChoicelmError
from ..data import tasks as fd
from ..models import registry
from ..objectives import OBJECTIVES
from ..text import Tokenizer
from ..train.loop import RunInputs, Trainer, resolve_vocab_size


def finetune(cfg: Config, out_dir: str | Path, resume: str | None = None, overwrite: bool = False) -> Path:
    """Fine-tune for cfg.finetune.task; returns the final checkpoint. The validation metrics land in RUN/eval.json."""
    from ..train.distributed import init_distributed, shutdown
    from ..core.runtime import keep_freed_memory, pick_device

    inputs = finetuning_inputs(cfg)
    if cfg.train.tune_allocator:
        keep_freed_memory()
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device.type)
    try:
        final = Trainer(cfg, Path(out_dir), dist_info, device, resume, overwrite, inputs).run()
        if dist_info.is_main and cfg.finetune.val_file:
            from .. import load
            from ..evaluation.tasks import evaluate_file

            result = evaluate_file(load(final, device=str(device)), cfg.finetune.val_file)
            (Path(out_dir) / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        return final
    finally:
        shutdown(dist_info)


def base_checkpoint(cfg: Config) -> tuple[Path | None, Config | None]:
    """The starting checkpoint and its config; its model and moe sections become the run's."""
    if not cfg.finetune.init:
        return None, None
    step_dir = ckpt.resolve_checkpoint(cfg.finetune.init)
    base = ckpt.read_config(step_dir, hint="--from needs a choicelm checkpoint (convert a Hugging Face folder "
                                           "first: choicelm convert from-hf HF_DIR OUT)")
    cfg.model, cfg.moe = dataclasses.replace(base.model), dataclasses.replace(base.moe)  # copies: a head changes cfg's
    return step_dir, base


def check_fit(task: str, kind: str) -> None:
    if task not in registry.get(kind).tasks:
        raise ChoicelmError(f"--task {task} does not fit a {kind} model; it needs {TASKS[task].fits}")


def finetuning_inputs(cfg: Config) -> RunInputs:
    """RunInputs for cfg.finetune.task: the starting model and its tokenizer, then the task's own part (TASKS)."""
    f = cfg.finetune
    if not f.task:
        raise ChoicelmError(f"no task: pass --task {' | '.join(fd.TASKS)}")
    if not f.train_file:
        raise ChoicelmError("no training examples: pass --train FILE")
    if f.init and f.tokenizer:
        raise ChoicelmError("--tokenizer is for a fresh model; a --from checkpoint brings its own tokenizer, so drop "
                            "one of them")
    step_dir, base = base_checkpoint(cfg)
    if step_dir is None:
        if not f.tokenizer:
            raise ChoicelmError("a fresh model needs a tokenizer: pass --tokenizer DIR, or start from a checkpoint "
                                "with --from CKPT")
        tokenizer_dir = Path(f.tokenizer)
        tokenizer = Tokenizer.load(tokenizer_dir)
        resolve_vocab_size(cfg, tokenizer.vocab_size)
    else:
        tokenizer_dir = step_dir / "tokenizer"
        tokenizer = Tokenizer.load(tokenizer_dir)
    check_fit(f.task, cfg.model.kind)
    start = Start(cfg, tokenizer, tokenizer_dir, step_dir, base,
                  max_len=min(f.max_length or cfg.model.block_size, cfg.model.block_size))
    task = TASKS[f.task].inputs(start)

    train = task.dataset(f.train_file)
    val = task.dataset(f.val_file) if f.val_file else None
    if f.epochs:
        global_batch = cfg.train.global_batch_size or cfg.train.micro_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
        cfg.train.max_steps = max(1, math.ceil(f.epochs * len(train) / global_batch))

    def build():
        return build_finetune_model(cfg, step_dir, base, task.head)

    def objective_for(sampler):
        objective = OBJECTIVES[f.task]
        if f.adversarial == "none":
            return objective
        from .adversarial import AdversarialObjective

        pgd = dict(steps=f.adv_steps, step_size=f.adv_step_size or None) if f.adversarial == "pgd" else {}
        return AdversarialObjective(objective, f.adversarial, f.adv_epsilon, **pgd)

    return RunInputs(train, val, build, objective_for, tokenizer_dir, tokenizer.sha256(), fd.ExampleBatchSampler,
                     task.extra_files)


# ----------------------------------------------------------------------------- the tasks


@dataclass
class Start:
    """What every task starts from: the run config (its model section is the starting model's), the tokenizer and
    its folder, the starting checkpoint and its config (None for a fresh model), the longest input in tokens."""

    cfg: Config
    tokenizer: Tokenizer
    tokenizer_dir: Path
    step_dir: Path | None
    base: Config | None
    max_len: int


@dataclass
class TaskInputs:
    """What a task adds to the run: a task file -> its dataset, the classes of a fresh classification head (None:
    no new head), and files written into every checkpoint (name -> text)."""

    dataset: Callable[[str | Path], object]
    head: int | None = None
    extra_files: dict[str, str] = field(default_factory=dict)


def classify_inputs(start: Start) -> TaskInputs:
    """A fresh head over the training file's labels (sorted), unless the starting classifier has these labels;
    the names go into every checkpoint as labels.json."""
    cfg, f, tokenizer, step_dir = start.cfg, start.cfg.finetune, start.tokenizer, start.step_dir
    train_rows = fd.read_classification(f.train_file, f.text_column, f.label_column)
    names = fd.label_names([label for _, label in train_rows])
    held = base_labels(step_dir) if start.base is not None and start.base.model.n_labels else None
    if held is not None and held != names:
        raise ChoicelmError(f"--from {step_dir} already classifies into {held}; the training file's labels are "
                            f"{names}. Start from its language-model checkpoint to train a new head")
    cfg.model.n_labels = len(names)

    def dataset(path):
        rows = fd.read_classification(path, f.text_column, f.label_column)
        ids = [fd.classification_ids(tokenizer, text, cfg.model.kind, start.max_len) for text, _ in rows]
        return fd.ClassificationDataset(ids, fd.label_ids([lb for _, lb in rows], names, str(path)),
                                        tokenizer.pad_id_or_eos)

    return TaskInputs(dataset, head=len(names) if held is None else None,
                      extra_files={"labels.json": json.dumps({"labels": names}, indent=1) + "\n"})


def seq2seq_inputs(start: Start) -> TaskInputs:
    """Source -> target pairs: targets end with EOS, the decoder starts from BOS (or pad, as Marian)."""
    cfg, f, tokenizer = start.cfg, start.cfg.finetune, start.tokenizer
    max_tgt = min(f.max_target_length or cfg.model.block_size - 1, cfg.model.block_size - 1)

    def dataset(path):
        pairs = [(fd.source_ids(tokenizer, s, start.max_len), tokenizer.encode(t))
                 for s, t in fd.read_pairs(path, f.source_column, f.target_column)]
        return fd.PairExamples(fd.PairDataset(pairs, start_id=fd.decoder_start_id(tokenizer),
                                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id_or_eos,
                                              max_tgt_len=max_tgt, vocab_size=cfg.model.vocab_size))

    return TaskInputs(dataset)


def sft_inputs(start: Start) -> TaskInputs:
    """Conversations under a chat template, the loss on the assistant replies only; the template is saved in the
    checkpoint's tokenizer folder."""
    f, tokenizer, max_len = start.cfg.finetune, start.tokenizer, start.max_len
    template = read_template(f.chat_template)
    tokenizer.chat_template = template

    def dataset(path):
        encoded = [fd.sft_ids(tokenizer, template, messages, max_len) for messages in fd.read_conversations(path)]
        kept = [(ids, learn) for ids, learn in encoded if any(learn[1:])]
        if not kept:
            raise ChoicelmError(f"{path}: no conversation keeps a reply within {max_len} tokens; raise "
                                "--finetune.max_length or shorten the prompts")
        return fd.SFTDataset([i for i, _ in kept], [lr for _, lr in kept], tokenizer.pad_id_or_eos)

    extra = {"tokenizer/tokenizer_config.json": tokenizer_config_with(start.tokenizer_dir, template)}
    return TaskInputs(dataset, extra_files=extra)


@dataclass(frozen=True)
class Task:
    fits: str  # the model it needs, in words (which families fit is the registry's ModelSpec.tasks)
    inputs: Callable[[Start], TaskInputs]


TASKS = {"classify": Task("a bert encoder or a gpt decoder (last-token pooling)", classify_inputs),
         "seq2seq": Task("an encoder-decoder (model.kind=seq2seq, e.g. configs/seq2seq-tiny.yaml, or a Marian "
                         "import)", seq2seq_inputs),
         "sft": Task("a gpt decoder", sft_inputs)}


def build_finetune_model(cfg: Config, step_dir: Path | None, base: Config | None, head: int | None):
    """The starting model (fresh, or the checkpoint's weights), a fresh classification head if `head`, then LoRA."""
    from ..api import build_from_checkpoint
    from ..models import build_model

    if step_dir is None:
        model = build_model(cfg.model, cfg.moe)
    else:
        model = build_from_checkpoint(step_dir, base)
        if head is not None:
            model.add_classifier(head)
    if cfg.finetune.lora_r:
        from ..models.lora import apply_lora, lora_settings

        model = apply_lora(model, lora_settings(cfg))
    return model


def base_labels(step_dir: Path) -> list[str] | None:
    file = step_dir / "labels.json"
    return json.loads(file.read_text())["labels"] if file.is_file() else None


def read_template(path: str) -> str:
    from ..text.chat_template import SFT_TEMPLATE, render_chat

    if not path:
        return SFT_TEMPLATE
    file = Path(path)
    if not file.is_file():
        raise ChoicelmError(f"--finetune.chat_template {path} does not exist; give a Jinja template file")
    template = file.read_text(encoding="utf-8")
    render_chat(template, [{"role": "user", "content": "hi"}], add_generation_prompt=True)  # fails early if broken
    return template


def tokenizer_config_with(tokenizer_dir: Path, template: str) -> str:
    """The tokenizer folder's tokenizer_config.json with the chat template added."""
    file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    config["chat_template"] = template
    return json.dumps(config, indent=2) + "\n"
