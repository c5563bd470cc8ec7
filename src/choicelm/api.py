"""`choicelm.load(path)`: a trained model with its tokenizer, ready to score and generate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .core import checkpoint as ckpt
from .core.config import Config
from .core.errors import ChoicelmError
from .core.runtime import pick_device
from .data.tasks import ClassificationDataset, classification_ids, decoder_start_id, source_ids
from .generation import GenerationConfig, generate_text, stream_text
from .models.weight_layout import prepare_for_decoding
from .models import build_model, padding_mask, registry
from .text import Tokenizer


@dataclass
class LanguageModel:
    """What `load` returns: `.model` (forward(ids) -> output with .logits, .loss given targets),
    `.tokenizer`, `.config` (the run config), `.checkpoint` (the step directory loaded), `.labels` (a
    classifier's class names, index = class id; None otherwise)."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: Config
    checkpoint: Path
    labels: list[str] | None = None

    @property
    def is_classifier(self) -> bool:
        return bool(getattr(self.model.config, "n_labels", 0))

    @torch.no_grad()
    def classify(self, text: str | list[str], *, batch_size: int = 32, return_probs: bool = False):
        """The label of `text` (or of each text of a list). return_probs: (label, {label: probability}) instead."""
        if not self.is_classifier:
            raise ChoicelmError("this model has no classification head; fine-tune one with "
                                "`choicelm finetune --task classify`")
        texts = [text] if isinstance(text, str) else list(text)
        results = classify_texts(self, texts, batch_size)
        results = results if return_probs else [label for label, _ in results]
        return results[0] if isinstance(text, str) else results

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generation_config(self, stop_at_eos: bool = True, **options) -> GenerationConfig:
        """GenerationConfig from keyword options (see its docstring); EOS is the tokenizer's <|endoftext|>."""
        if not registry.get(self.config.model.kind).generates:
            generators = [s.kind for s in registry.SPECS.values() if s.generates]
            raise ChoicelmError(f"a {self.config.model.kind} model does not generate text (an encoder fills masks and "
                                f"classifies); generate with a {', '.join(generators[:-1])} or {generators[-1]} "
                                "checkpoint")
        if self.is_classifier:
            raise ChoicelmError("a classifier does not generate text; call lm.classify(text)")
        if stop_at_eos:
            options.setdefault("eos_token_id", self.tokenizer.eot_id)
        return GenerationConfig.from_options(**options)

    def generate(self, prompt: str | list[str], *, stop_at_eos: bool = True, **options) -> str | list:
        """Continue `prompt` (or each prompt of a list, batched with left padding); returns only the new text.

        options: max_new_tokens, temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, no_repeat_ngram_size, num_beams, length_penalty, early_stopping,
        num_return_sequences, seed, stop (see choicelm.generation.config.OPTIONS). One prompt gives a str, a list gives a list of str;
        with num_return_sequences = n > 1 each prompt gives a list of n str instead.
        """
        cfg = self.generation_config(stop_at_eos, **options)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise ChoicelmError("generate() takes a prompt string or a list of prompt strings")
        if registry.get(self.config.model.kind).encoder_decoder:  # the prompt is the source (cut, then EOS)
            from .generation.seq2seq import generate_seq2seq

            sources = [source_ids(self.tokenizer, p, self.config.model.block_size) for p in prompts]
            completions = generate_seq2seq(self.model, sources, cfg, start_id=decoder_start_id(self.tokenizer),
                                           pad_id=self.tokenizer.pad_id_or_eos, tokenizer=self.tokenizer)
        else:
            completions = generate_text(self.model, self.tokenizer, [self.tokenizer.encode(p) for p in prompts], cfg)
        texts = [c.text for c in completions]
        n = cfg.num_return_sequences
        if n > 1:
            texts = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str | list[int], *, stop_at_eos: bool = True, **options) -> Iterator[str]:
        """Yield the continuation of `prompt` (text, or token ids as they are) as text deltas while it is generated
        (same options as generate, one sequence). A delta never splits a UTF-8 character or shows part of a stop
        string."""
        cfg = self.generation_config(stop_at_eos, **options)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        return stream_text(self.model, self.tokenizer, ids, cfg)


def load(path: str | Path, device: str = "auto", dtype: str | None = None) -> LanguageModel:
    """Load a run directory (its newest complete checkpoint) or one step-XXXXXXXX directory, in eval mode,
    with its weights in the decode-friendly layout (models/weight_layout.py: same values, faster decoding).
    dtype: None keeps the stored precision; "bf16" halves the bytes read per token (faster decoding on CPUs
    with bf16 support, logits rounded to bf16); "fp32"."""
    dtypes = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ChoicelmError(f"dtype={dtype!r} is not allowed; choose fp32 or bf16 (or leave it unset)")
    step_dir = ckpt.resolve_checkpoint(path)
    cfg = ckpt.read_config(step_dir)
    if registry.get(cfg.model.kind).counted:
        return _load_ngram(step_dir, cfg)
    model = build_from_checkpoint(step_dir, cfg)
    model.to(pick_device(device)).eval()
    if dtype is not None:
        model.to(dtypes[dtype])
    prepare_for_decoding(model)
    tok_dir = step_dir / "tokenizer"
    if not tok_dir.is_dir():
        raise ChoicelmError(f"{step_dir} has no tokenizer/ folder; the checkpoint was written without its tokenizer")
    labels_file = step_dir / "labels.json"
    labels = json.loads(labels_file.read_text())["labels"] if labels_file.is_file() else None
    return LanguageModel(model, Tokenizer.load(tok_dir), cfg, step_dir, labels)


def build_from_checkpoint(step_dir: Path, cfg: Config) -> torch.nn.Module:
    """The model of `cfg` with the weights of `step_dir` (fp32, CPU). A LoRA run's adapters are merged into the
    base weights, so the result is a plain model."""
    model = build_model(cfg.model, cfg.moe)
    if not cfg.finetune.lora_r:
        ckpt.load_weights(model, step_dir)
        return model
    from .models.lora import apply_lora, lora_settings, merge_lora

    model = apply_lora(model, lora_settings(cfg))
    ckpt.load_weights(model, step_dir)
    return merge_lora(model)


class CountedLanguageModel(LanguageModel):
    """What `load` returns for an n-gram checkpoint: `.model` is the NGramLM (numpy, no forward);
    `.tokenizer` the data's tokenizer (or the model's word vocabulary); generate samples from it on the same
    engine and options as a neural model, one sequence at a time (no beam search)."""

    @property
    def is_classifier(self) -> bool:
        return False  # an n-gram model has no classification head (and no .config)

    NEURAL_ONLY = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")

    def generation_config(self, stop_at_eos: bool = True, **options) -> GenerationConfig:
        """GenerationConfig from keyword options; EOS is the model's </s> (stop_at_eos=False: </s> is never drawn)."""
        cfg = GenerationConfig.from_options(**options)
        unsupported = [k for k in self.NEURAL_ONLY if getattr(cfg, k) != GenerationConfig.__dataclass_fields__[k].default]
        if unsupported:
            raise ChoicelmError(f"an n-gram model samples one sequence (no beam search); {', '.join(unsupported)} "
                                f"need a neural model")
        if stop_at_eos and cfg.eos_token_id is None:
            cfg.eos_token_id = [self.model.eos_id]
        return cfg

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(self, prompt: str, *, stop_at_eos: bool = True, **options) -> str:
        """Sample a continuation of `prompt` (temperature 0 = greedy, top_k, top_p, penalties ...; one sequence)."""
        return "".join(self.stream(prompt, stop_at_eos=stop_at_eos, **options))

    def stream(self, prompt: str, *, stop_at_eos: bool = True, **options) -> Iterator[str]:
        from .generation.step import NGramDecoder

        cfg = self.generation_config(stop_at_eos, **options)
        if not isinstance(prompt, str):
            raise ChoicelmError("an n-gram model generates for one prompt at a time")
        context = [int(t) for t in self.tokenizer.encode(prompt)]
        deltas = stream_text(NGramDecoder(self.model, allow_eos=stop_at_eos), self.tokenizer, context, cfg)
        if self.model.kind == "words" and prompt and not prompt[-1].isspace():  # words are joined by spaces
            deltas = _after_first(deltas, " ")
        return deltas


def _after_first(deltas: Iterator[str], prefix: str) -> Iterator[str]:
    """The deltas, the first one with `prefix` in front."""
    for i, delta in enumerate(deltas):
        yield prefix + delta if i == 0 else delta


def _load_ngram(step_dir: Path, cfg: Config) -> CountedLanguageModel:
    from .models.ngram import NGramLM

    lm = NGramLM.load(step_dir)
    tokenizer = lm.words if lm.kind == "words" else Tokenizer.load(step_dir / "tokenizer")
    return CountedLanguageModel(lm, tokenizer, cfg, step_dir)


@torch.no_grad()
def classify_texts(lm, texts: list[str], batch_size: int = 32) -> list[tuple[str, dict[str, float]]]:
    """(label, {label: probability}) per text."""
    if lm.labels is None:
        raise ChoicelmError(f"{lm.checkpoint} has no labels.json naming its classes; it was not written by "
                            "`choicelm finetune --task classify`")
    kind, max_len = lm.config.model.kind, lm.config.model.block_size
    data = ClassificationDataset([classification_ids(lm.tokenizer, t, kind, max_len) for t in texts],
                                    [0] * len(texts), lm.tokenizer.pad_id_or_eos)
    out = []
    for i in range(0, len(texts), batch_size):
        ids_BT, mask_BT, _ = data.collate(list(range(i, min(i + batch_size, len(texts)))))
        logits_BL = lm.model(ids_BT.to(lm.device), **padding_mask(lm.model, mask_BT.to(lm.device))).logits
        for probs in logits_BL.float().softmax(-1).tolist():
            best = max(range(len(probs)), key=probs.__getitem__)
            out.append((lm.labels[best], dict(zip(lm.labels, probs))))
    return out
