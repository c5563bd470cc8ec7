"""What every family's Hugging Face mapping shares: the adapter the registry holds, the conversion result, the error.

A family's mapping lives beside it, models/<family>_hf.py (gpt_hf: GPT-2, Llama, Mixtral; bert_hf: BERT;
seq2seq_hf: Marian). It turns a parsed config.json into a ModelConfig and Hugging Face tensors into the family's
names, and back for the families that export. It reads and writes no files: interop/hf.py does (config.json,
safetensors and .bin shards, tokenizer files, atomic output folders) and finds the mapping through the
registry (models/registry.py: `registry.get(kind).hf`, or `hf_adapter_for(architecture)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError

GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # what choicelm's MLP computes (F.gelu approximate="tanh")
SILU = ("swish", "silu")  # what it computes with mlp=silu


class ConversionError(ChoicelmError):
    """A checkpoint cannot be converted; the message says why and what is supported."""


@dataclass
class Converted:
    """What a Hugging Face folder becomes: the choicelm tensors, and which HF tensors had no place (dropped)
    and which choicelm tensors the source lacked and were freshly initialised (a BertModel's MLM head)."""

    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)


def _no_moe(hf_config: dict, arch: str) -> MoEConfig | None:
    return None


def _no_notes(hf_config: dict, arch: str, config: ModelConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class HFAdapter:
    """One family's Hugging Face mapping, as interop/hf.py calls it. `arch` is one of `architectures`.

    read_config(config.json, arch) -> ModelConfig        (ChoicelmError for what it cannot represent)
    read_moe(config.json, arch) -> MoEConfig | None       the moe section of a Mixture-of-Experts architecture
    notes(config.json, arch, config) -> [str]             what the conversion changed without changing outputs
    read_state(hf tensors, config, arch) -> Converted     every choicelm tensor (tied ones under both names)
    export_architecture(config, moe) -> arch              the class to write, or a ConversionError saying why none
    write_config(config, arch, moe) -> dict               config.json's architecture-specific keys
    write_state(state, config, arch) -> HF tensors        lm_head left out when tied (as save_pretrained does)
    """

    architectures: tuple[str, ...]
    model_types: dict[str, str]  # config.json model_type -> architecture, when it names no architectures
    read_config: Callable[[dict, str], ModelConfig]
    read_state: Callable[[dict, ModelConfig, str], Converted]
    read_moe: Callable[[dict, str], MoEConfig | None] = _no_moe
    notes: Callable[[dict, str, ModelConfig], list[str]] = _no_notes
    moe_architectures: tuple[str, ...] = ()  # the Mixture-of-Experts ones among `architectures`
    tokenizer_json_only: bool = False  # its own tokenizer is SentencePiece: only a tokenizer.json folder is read
    exports: tuple[str, ...] = ()  # what to_hf writes (empty: import only)
    export_summary: str = ""  # which model exports to which class, for messages
    export_architecture: Callable[[ModelConfig, MoEConfig | None], str] | None = None
    write_config: Callable[[ModelConfig, str, MoEConfig | None], dict] | None = None
    write_state: Callable[[dict, ModelConfig, str], dict] | None = None


def require(c: dict, arch: str, *keys: str) -> None:
    """config.json has every field the conversion reads (a KeyError would not say which file is wrong)."""
    missing = [k for k in keys if c.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}, which a {arch} has; is it the config of "
                              f"another architecture?")


class Tensors:
    """Hugging Face tensors taken one by one under their names; `left` holds those not taken yet, and
    `check_all_taken` refuses a leftover (the config and the weights do not match)."""

    def __init__(self, hf_state: dict[str, torch.Tensor], arch: str):
        self.left, self.arch = dict(hf_state), arch

    def take(self, name: str) -> torch.Tensor:
        if name not in self.left:
            raise ConversionError(f"the weights have no tensor {name!r}; they do not match config.json's {self.arch}")
        return self.left.pop(name)

    def check_all_taken(self) -> None:
        if self.left:
            raise ConversionError(f"the weights hold tensors a {self.arch} with this config.json does not have: "
                                  f"{sorted(self.left)[:5]}; the config and weights do not match")


def tied_head(out: dict[str, torch.Tensor], head: torch.Tensor | None, embedding: str,
              config: ModelConfig) -> torch.Tensor:
    """lm_head.weight: the embedding `out[embedding]` when tied, else the source's own head."""
    if config.tie_embeddings:
        return out[embedding]
    if head is None:
        raise ConversionError("config.json says tie_word_embeddings=false but the weights have no lm_head.weight")
    return head


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Tensors present on both sides have the shapes the config implies."""
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
            raise ConversionError(f"{what}: {name} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(expected[name].shape)}")
