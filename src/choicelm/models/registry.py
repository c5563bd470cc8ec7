"""The model registry: what each model family is and can do, by its `model.kind`.

    spec = registry.get(cfg.model.kind)   # or spec_of(model) for a built (or DDP / torch.compile wrapped) one
    spec.build(cfg.model, cfg.moe)        # build_model(cfg.model, cfg.moe) checks first, then calls this
    spec.generates, spec.classifies, spec.encodes, spec.servable, spec.exportable, ...
    spec.hf                               # its Hugging Face mapping (models/<family>_hf.py), or None

Callers ask a capability, never compare kind strings: a new family is one entry in SPECS (core/config.py's
model.kind choices name the same kinds; tests/test_registry.py holds them to it and checks every capability
against what the family really does).

    kind     sections   generates  classifies  also                   fine-tuning     Hugging Face
    gpt      model moe  yes        yes         servable               classify, sft   GPT-2, Llama, Mixtral (in, out)
    bert     model moe  -          yes         encodes                classify        BERT (in)
    seq2seq  model      yes        -           encoder_decoder        seq2seq         Marian (in)
    lstm     model      yes        -           recurrent              -               -
    ngram    ngram      yes        -           counted (no nn.Module) -               - (ARPA: interop/arpa.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..core.config import ConfigError, ModelConfig, MoEConfig
from . import bert_hf, gpt_hf, seq2seq_hf
from .bert import BERT
from .gpt import GPT
from .hf_mapping import ConversionError, HFAdapter
from .lstm import LSTMLM
from .ngram import NGramLM
from .seq2seq import Seq2Seq


@dataclass(frozen=True)
class ModelSpec:
    """One model family: how it is configured and built, what it can do, and its Hugging Face mapping."""

    kind: str                        # model.kind
    model_class: type                # what build returns (spec_of finds a model's family by it)
    build: Callable[[ModelConfig, MoEConfig | None], nn.Module] | None  # None: counted, not built
    sections: tuple[str, ...]        # the config sections that describe it (besides model.kind)
    generates: bool = False          # continues text: lm.generate / stream, `choicelm generate` and `chat`
    classifier_modules: tuple[str, ...] = ()  # its classification head (model.n_labels > 0); () = none
    encodes: bool = False            # a bidirectional encoder: pretrains by masked LM, pools its first token
    encoder_decoder: bool = False    # reads a source and decodes a target (a prompt is the source)
    recurrent: bool = False          # carries a state along a stream (truncated BPTT, parallel streams)
    counted: bool = False            # trained by counting (train/counting.py); loads as a CountedLanguageModel
    servable: bool = False           # the server's batched KV cache holds it (`choicelm serve`)
    tasks: tuple[str, ...] = ()      # the fine-tuning tasks it fits (finetune/run.py)
    without_moe: str = ""            # why it takes no Mixture-of-Experts layers (when "moe" is not a section)
    embedding: Callable[[nn.Module], nn.Embedding] | None = None  # the token embedding of its input (source)
    hf: HFAdapter | None = None      # its Hugging Face mapping; None = no Hugging Face counterpart

    @property
    def classifies(self) -> bool:
        """Takes a classification head (model.n_labels > 0)."""
        return bool(self.classifier_modules)

    @property
    def moe(self) -> bool:
        """Takes Mixture-of-Experts layers (moe.experts > 0)."""
        return "moe" in self.sections

    @property
    def exportable(self) -> bool:
        """to_hf writes it as a Hugging Face folder (when its config has an equivalent)."""
        return self.hf is not None and bool(self.hf.exports)


SPECS: dict[str, ModelSpec] = {spec.kind: spec for spec in (
    ModelSpec("gpt", GPT, GPT, ("model", "moe"), generates=True, classifier_modules=("classifier",),
              servable=True, tasks=("classify", "sft"), embedding=lambda m: m.transformer.wte, hf=gpt_hf.ADAPTER),
    ModelSpec("bert", BERT, BERT, ("model", "moe"), classifier_modules=("classifier", "pooler"), encodes=True,
              tasks=("classify",), embedding=lambda m: m.embeddings.wte, hf=bert_hf.ADAPTER),
    ModelSpec("seq2seq", Seq2Seq, lambda config, moe: Seq2Seq(config), ("model",), generates=True,
              encoder_decoder=True, tasks=("seq2seq",), without_moe="has no Mixture-of-Experts layers yet",
              embedding=lambda m: m.src_embedding, hf=seq2seq_hf.ADAPTER),
    ModelSpec("lstm", LSTMLM, lambda config, moe: LSTMLM(config), ("model",), generates=True, recurrent=True,
              without_moe="has no MLP to turn into experts", embedding=lambda m: m.embed),
    ModelSpec("ngram", NGramLM, None, ("ngram",), generates=True, counted=True,
              without_moe="is counted, not a network with MLPs"),
)}


def kinds() -> tuple[str, ...]:
    return tuple(SPECS)


def get(kind: str) -> ModelSpec:
    """The family named `kind` (model.kind); one clear error naming the known ones otherwise."""
    spec = SPECS.get(kind)
    if spec is None:
        raise ConfigError(f"model.kind={kind!r} is not a known model family; choose one of {', '.join(SPECS)}")
    return spec


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (.module) and torch.compile (._orig_mod) wrappers, however nested."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def find(model) -> ModelSpec | None:
    """The family of a built model (through DDP and torch.compile wrappers), or None for a foreign one."""
    inner = unwrap(model) if isinstance(model, nn.Module) else model
    return next((spec for spec in SPECS.values() if isinstance(inner, spec.model_class)), None)


def spec_of(model) -> ModelSpec:
    """The family of a built model (through DDP and torch.compile wrappers)."""
    spec = find(model)
    if spec is None:
        raise ConfigError(f"{type(model).__name__} is not a choicelm model; the families are "
                          f"{', '.join(s.model_class.__name__ for s in SPECS.values())}")
    return spec


def build_model(config: ModelConfig, moe: MoEConfig | None = None) -> nn.Module:
    """A freshly initialised model for `config` (initialisation follows torch's global seed); `moe`
    (the run's moe section) turns MLPs into Mixture-of-Experts layers when moe.experts > 0."""
    spec = get(config.kind)
    if spec.build is None:
        raise ConfigError(f"model.kind={config.kind} is counted, not built: `choicelm pretrain` counts it and "
                          f"choicelm.load reads it")
    if moe is not None and moe.experts and not spec.moe:
        raise ConfigError(f"model.kind={config.kind} {spec.without_moe}; set --moe.experts=0")
    return spec.build(config, moe)


# ----------------------------------------------------------------------------- Hugging Face


def hf_architectures() -> tuple[str, ...]:
    """Every Hugging Face architecture some family reads (from_hf)."""
    return tuple(arch for spec in SPECS.values() if spec.hf for arch in spec.hf.architectures)


def hf_exports() -> tuple[str, ...]:
    """Every Hugging Face architecture some family writes (to_hf)."""
    return tuple(arch for spec in SPECS.values() if spec.hf for arch in spec.hf.exports)


def hf_adapter_for(arch: str) -> HFAdapter:
    """The mapping that reads the Hugging Face architecture `arch`."""
    for spec in SPECS.values():
        if spec.hf is not None and arch in spec.hf.architectures:
            return spec.hf
    adapters = [spec.hf for spec in SPECS.values() if spec.hf is not None]
    dense = [a for hf in adapters for a in hf.architectures if a not in hf.moe_architectures]
    moe = [a for hf in adapters for a in hf.moe_architectures]
    raise ConversionError(f"architecture {arch} is not supported; choicelm converts {', '.join(dense[:-1])} "
                          f"and {dense[-1]}, and the Mixture-of-Experts {' and '.join(moe)}")


def hf_model_type(model_type: str) -> str | None:
    """The architecture config.json's model_type stands for, when it names no architectures."""
    return next((spec.hf.model_types[model_type] for spec in SPECS.values()
                 if spec.hf is not None and model_type in spec.hf.model_types), None)
