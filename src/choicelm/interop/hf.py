"""Hugging Face checkpoints in and out: the files. Each family's mapping lives beside it in models/ (gpt_hf.py:
GPT-2, Llama, Mixtral; bert_hf.py: BERT; seq2seq_hf.py: Marian), found through the model registry.

    GPT2LMHeadModel, LlamaForCausalLM          <-> choicelm's GPT           (from_hf and to_hf)
    MixtralForCausalLM                         <-> choicelm's GPT with a token-choice MoE in every block
    BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification
                                               -> choicelm's BERT          (from_hf)
    MarianMTModel                              -> choicelm's Seq2Seq       (from_hf)

    from_hf("hf/gpt2", "ckpt/gpt2")        # config.json + weights + tokenizer -> a choicelm checkpoint folder
    choicelm.load("ckpt/gpt2")             # ... which loads like any step directory
    to_hf("runs/x", "hf/x")                # a run or step folder -> a folder transformers loads as is

Both directions read and write files only: transformers is not needed to convert. Here: config.json (which must
be a JSON object), the weights (model.safetensors, sharded safetensors with their index, or pytorch_model.bin
read with weights_only=True), the tokenizer files, source.json and labels.json, and the checks that span them
(the tokenizer fits the embeddings; an encoder-decoder starts and ends decoding with config.json's ids).

Marian's tokenizer is SentencePiece without tokenizer.json, which choicelm cannot read: pass a tokenizer.json
folder whose ids match the model (`tokenizer=` / --tokenizer); its end-of-text token must be config.json's
eos_token_id and its decoder start (bos, else pad) the decoder_start_token_id. A BERT tokenizer.json has no
eos/bos: its [SEP] becomes the end-of-text token and [CLS] the bos, so classification reads [CLS] text [SEP].

Only layouts both sides compute identically are converted; anything else (another architecture, or a setting
the family's mapping refuses) is refused with a message naming the field. Nothing is overwritten without
overwrite=True, and the output appears complete or not at all (written to a temporary folder, fsynced, renamed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..core import checkpoint as ckpt
from ..core.config import Config, ModelConfig, MoEConfig
from ..core.errors import ChoicelmError, naming
from ..models import build_model, registry
from ..models.hf_mapping import ConversionError, Converted, HFAdapter, check_shapes
from ..text import EOT, Tokenizer, read_special_tokens
from .tiktoken_bpe import byte_level_tokenizer, read_vocab_merges

log = logging.getLogger(__name__)

SUPPORTED = registry.hf_architectures()  # what from_hf reads
EXPORTABLE = registry.hf_exports()       # what to_hf writes


# ----------------------------------------------------------------------------- configs


def architecture(hf_config: dict) -> str:
    """One of SUPPORTED, from config.json's architectures (or model_type: bert alone reads as BertModel)."""
    archs, model_type = hf_config.get("architectures") or [], hf_config.get("model_type") or ""
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs) or not isinstance(model_type, str):
        raise ConversionError(f"config.json's architectures={archs!r}, model_type={model_type!r} do not name a "
                              f"model class; expected e.g. \"architectures\": [\"GPT2LMHeadModel\"], "
                              f"\"model_type\": \"gpt2\"")
    arch = archs[0] if archs else registry.hf_model_type(model_type)
    registry.hf_adapter_for(arch or model_type or "no architectures or model_type")  # or refuse
    return arch


def _adapter(hf_config: dict) -> tuple[str, HFAdapter]:
    arch = architecture(hf_config)
    return arch, registry.hf_adapter_for(arch)


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """The choicelm model config that computes what the Hugging Face model computes."""
    arch, adapter = _adapter(hf_config)
    try:
        return adapter.read_config(hf_config, arch)
    except ConversionError:
        raise
    except ChoicelmError as e:  # ModelConfig's own checks (ConfigError) and the mapping's
        raise ConversionError(f"{arch} config.json cannot be converted: {e}") from None


def moe_config_from_hf(hf_config: dict) -> MoEConfig | None:
    """The choicelm moe section that routes as the Hugging Face model does, or None for a dense architecture."""
    arch, adapter = _adapter(hf_config)
    return adapter.read_moe(hf_config, arch)


def conversion_notes(hf_config: dict, config: ModelConfig) -> list[str]:
    """What a conversion changed without changing the model's outputs, for source.json and the log."""
    arch, adapter = _adapter(hf_config)
    return adapter.notes(hf_config, arch, config)


def hf_labels(hf_config: dict, n_labels: int) -> list[str]:
    """A classifier's class names from config.json's id2label (index = class id)."""
    id2label = {str(k): v for k, v in (hf_config.get("id2label") or {}).items()}
    missing = [i for i in range(n_labels) if str(i) not in id2label]
    if missing:
        raise ConversionError(f"config.json's id2label names no class {missing[0]} of the {n_labels} classes "
                              f"(num_labels); give every class id 0..{n_labels - 1} a name")
    return [str(id2label[str(i)]) for i in range(n_labels)]


def _exporter(config: ModelConfig) -> HFAdapter:
    spec = registry.get(config.kind)
    if not spec.exportable:
        which = [s for s in registry.SPECS.values() if s.exportable]
        raise ConversionError(f"model.kind={config.kind} has no Hugging Face equivalent; only "
                              f"{' and '.join(s.kind for s in which)} models convert "
                              f"({'; '.join(s.hf.export_summary for s in which)})")
    return spec.hf


def hf_architecture_for(config: ModelConfig, moe: MoEConfig | None = None) -> str:
    """The Hugging Face class that computes what this choicelm model computes (moe: the run's moe
    config section, if any), or a ConversionError."""
    return _exporter(config).export_architecture(config, moe)


def hf_config_from_model(config: ModelConfig, tokenizer: Tokenizer | None = None,
                         moe: MoEConfig | None = None) -> dict:
    """config.json for the model (special-token ids from the tokenizer; moe: the run's moe section)."""
    adapter = _exporter(config)
    arch = adapter.export_architecture(config, moe)
    ids = {"bos_token_id": tokenizer.bos_id if tokenizer else None,
           "eos_token_id": tokenizer.eos_id if tokenizer else None,
           "pad_token_id": tokenizer.pad_id if tokenizer else None}
    common = {"architectures": [arch], "vocab_size": config.vocab_size, "initializer_range": 0.02,
              "tie_word_embeddings": config.tie_embeddings, "dtype": "float32", "use_cache": True, **ids}
    return {**common, **adapter.write_config(config, arch, moe)}


# ----------------------------------------------------------------------------- weights


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors -> choicelm names and layouts: every choicelm tensor (tied ones under both names)."""
    return convert_state(hf_state, config, arch).state


def convert_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Converted:
    """state_dict_from_hf, with the tensors dropped and initialised on the way."""
    return registry.hf_adapter_for(arch).read_state(hf_state, config, arch)


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """choicelm tensors -> HF names and layouts, lm_head left out when tied (as save_pretrained does)."""
    return _exporter(config).write_state(state, config, arch)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, sharded safetensors (with their index),
    or pytorch_model.bin (read with weights_only=True: no code runs)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (hf_dir / single).is_file():
            files = [hf_dir / single]
        elif (hf_dir / index_name).is_file():
            index = _read_json(hf_dir / index_name, "a sharded checkpoint needs its index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConversionError(f"{hf_dir / index_name} has no weight_map object naming the file of each "
                                      f"tensor; is it a Hugging Face index file?")
            files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                if file.suffix == ".safetensors":
                    state.update(load_file(str(file)))
                else:
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as e:  # truncated or foreign files raise a mix of types
                raise ConversionError(f"cannot read weights {file}: {str(e)[:200]}") from None
        return state
    raise ConversionError(f"{hf_dir} holds no weights (model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin); is it a Hugging Face model folder?")


# ----------------------------------------------------------------------------- tokenizers


def load_hf_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """A Hugging Face tokenizer folder as a choicelm Tokenizer: tokenizer.json, or GPT-2's vocab.json +
    merges.txt; special tokens from tokenizer_config.json / special_tokens_map.json. A BERT tokenizer, which
    names no eos/bos, gets [SEP] (its sep_token) as end-of-text and [CLS] (cls_token) as bos."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges = read_vocab_merges(folder)
        roles = read_special_tokens(folder)
        specials = tuple(dict.fromkeys(t for t in (*roles.values(), EOT) if t is not None and t in vocab))
        return Tokenizer(byte_level_tokenizer(vocab, merges, specials), kind="bpe", special_tokens=roles)
    if (folder / "source.spm").is_file() or (folder / "target.spm").is_file():
        raise ConversionError(_no_marian_tokenizer(folder))
    if (folder / "tokenizer.model").is_file():
        raise ConversionError(f"{folder} has only a sentencepiece tokenizer.model; save it as tokenizer.json first "
                              f"(AutoTokenizer.from_pretrained(folder).save_pretrained(folder) in transformers)")
    raise ConversionError(f"{folder} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                          f"pass --tokenizer DIR with one")


def _no_marian_tokenizer(folder: Path) -> str:
    return (f"{folder} has no tokenizer.json: a Marian tokenizer is SentencePiece (source.spm, target.spm), which "
            f"choicelm cannot read; pass --tokenizer DIR (tokenizer= in Python) with a tokenizer.json folder whose "
            f"ids match the model's vocabulary (a choicelm tokenizer, or a Hugging Face fast tokenizer)")


def _tokenizer_for(hf_dir: Path, tokenizer_dir, arch: str) -> Tokenizer:
    if tokenizer_dir:
        return load_hf_tokenizer(_existing_dir(tokenizer_dir, "tokenizer folder"))
    if registry.hf_adapter_for(arch).tokenizer_json_only and not (hf_dir / "tokenizer.json").is_file():
        raise ConversionError(_no_marian_tokenizer(hf_dir))
    return load_hf_tokenizer(hf_dir)


def _check_tokenizer(tok: Tokenizer, config: ModelConfig, hf_config: dict) -> None:
    """The tokenizer's ids fit the embeddings; for an encoder-decoder, it ends and starts decoding with the ids
    config.json names (choicelm takes both from the tokenizer: see data.tasks.decoder_start_id)."""
    for what, rows in (("", config.vocab_size), (" source", config.src_vocab_size)):
        if rows and tok.vocab_size > rows:
            raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model only {rows}{what} "
                                  f"embeddings; pass the model's own tokenizer with --tokenizer")
    if not registry.get(config.kind).encoder_decoder:
        return
    from ..data.tasks import decoder_start_id

    eos, start = hf_config.get("eos_token_id"), hf_config.get("decoder_start_token_id")
    if isinstance(eos, int) and tok.eos_id != eos:
        raise ConversionError(f"the tokenizer's end-of-text token {tok.special_tokens['eos']!r} is id {tok.eos_id} "
                              f"but config.json's eos_token_id is {eos}; pass the model's own tokenizer, or name "
                              f"token {eos} as eos_token in its tokenizer_config.json")
    if isinstance(start, int) and decoder_start_id(tok) != start:
        raise ConversionError(f"choicelm starts decoding with the tokenizer's bos token, else its pad token (here id "
                              f"{decoder_start_id(tok)}), but config.json's decoder_start_token_id is {start}; name "
                              f"token {start} as bos_token (or pad_token, with no bos_token) in tokenizer_config.json")


# ----------------------------------------------------------------------------- whole folders


@dataclass
class HFImport:
    """A Hugging Face folder read and converted: choicelm config and tensors, plus what to record about it."""

    config: ModelConfig
    arch: str
    hf_config: dict
    converted: Converted
    moe: MoEConfig | None = None  # the moe section of an MoE architecture (Mixtral)


def read_hf(hf_dir: str | os.PathLike) -> HFImport:
    """Read and convert a Hugging Face folder (config.json and weights), checked against the names and shapes
    the converted config implies."""
    hf_dir = _existing_dir(hf_dir, "Hugging Face model folder")
    hf_config = _read_json(hf_dir / "config.json", "a Hugging Face model folder needs config.json")
    arch = architecture(hf_config)
    config = model_config_from_hf(hf_config)
    moe = moe_config_from_hf(hf_config)
    converted = convert_state(read_hf_weights(hf_dir), config, arch)
    _check_tensors(converted.state, config, f"the weights in {hf_dir} do not match its config.json ({arch})", moe)
    return HFImport(config, arch, hf_config, converted, moe)


def read_hf_model(hf_dir: str | os.PathLike) -> tuple[ModelConfig, str, dict[str, torch.Tensor]]:
    """(choicelm model config, HF architecture, every choicelm tensor by name) of a Hugging Face folder.
    An MoE architecture's moe section is in read_hf(hf_dir).moe."""
    imported = read_hf(hf_dir)
    return imported.config, imported.arch, imported.converted.state


def load_hf_model(hf_dir: str | os.PathLike) -> torch.nn.Module:
    """The Hugging Face model in `hf_dir` as a choicelm model (GPT, BERT or Seq2Seq; fp32, eval mode), without
    writing anything."""
    imported = read_hf(hf_dir)
    model = build_model(imported.config, imported.moe)
    model.load_state_dict(imported.converted.state, strict=True)
    return model.eval()


def from_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Convert a Hugging Face folder (GPT-2, Llama, Mixtral, BERT or Marian: see SUPPORTED) into a choicelm checkpoint
    folder `out` (model.safetensors, config.yaml, tokenizer/, source.json, COMPLETE, and labels.json for a
    classifier) that `choicelm.load(out)` reads. tokenizer: a folder to take the tokenizer from instead of
    hf_dir (needed for Marian, whose SentencePiece tokenizer choicelm cannot read). Weights are stored in fp32."""
    hf_dir = _existing_dir(hf_dir, "Hugging Face model folder")
    out = _check_out(out, overwrite, sources=[hf_dir] + ([Path(tokenizer)] if tokenizer else []))
    arch = architecture(_read_json(hf_dir / "config.json", "a Hugging Face model folder needs config.json"))
    tok = _tokenizer_for(hf_dir, tokenizer, arch)
    imported = read_hf(hf_dir)
    config, converted = imported.config, imported.converted
    _check_tokenizer(tok, config, imported.hf_config)
    labels = hf_labels(imported.hf_config, config.n_labels) if config.n_labels else None
    tensors = {name: t.to(torch.float32).contiguous() for name, t in _without_tied_copies(converted.state).items()}
    source = {"converted_from": str(hf_dir.resolve()), "architecture": imported.arch}
    notes = conversion_notes(imported.hf_config, config)
    for note in notes:
        log.warning("%s: %s", imported.arch, note)
    if notes:
        source["notes"] = notes
    if converted.dropped:
        source["dropped"] = converted.dropped
    if converted.initialised:
        source["initialised"] = converted.initialised
        log.warning("%s has no %s; they were freshly initialised (fine-tune before using them)",
                    imported.arch, ", ".join(converted.initialised))

    def fill(tmp: Path) -> None:
        with naming(tmp / "model.safetensors"):  # a full disk: an OSError naming the file, not a SafetensorError
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        Config(model=config, moe=imported.moe or MoEConfig()).save(tmp / "config.yaml")
        tok.save(tmp / "tokenizer")
        (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n")
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps({"labels": labels}, indent=1) + "\n")
        (tmp / ckpt.MARKER).write_text(json.dumps({"step": 0, "val_loss": None}))

    return _write_dir(out, fill)


def _without_tied_copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tied tensor once (safetensors stores no shared memory), under the name safetensors' load_model keeps
    for the group (the first in sorted order): lm_head.weight for GPT, embeddings.wte.weight for BERT."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() == 0 or key not in seen:  # empty tensors share data_ptr 0 without being tied
            seen.add(key)
            kept[name] = t
    return kept


def to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export a choicelm checkpoint (run or step folder) as a Hugging Face folder: model.safetensors,
    config.json, generation_config.json, tokenizer.json and tokenizer_config.json, which
    AutoModelForCausalLM.from_pretrained(out) and AutoTokenizer.from_pretrained(out) load as they are."""
    step_dir = ckpt.resolve_checkpoint(checkpoint)
    out = _check_out(out, overwrite, sources=[Path(checkpoint), step_dir])
    run_config = ckpt.read_config(step_dir, error=ConversionError)
    config, moe = run_config.model, run_config.moe
    arch = hf_architecture_for(config, moe)  # refuse before reading any weights
    weights = step_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises a mix of types for a truncated or foreign file
        raise ConversionError(f"cannot read weights {weights}: {str(e)[:200]}") from None
    _restore_tied(state, config, moe)
    _check_tensors(state, config, f"the weights {weights} do not match {step_dir / 'config.yaml'}", moe)
    tokenizer = Tokenizer.load(step_dir / "tokenizer")
    tensors = state_dict_to_hf(state, config, arch)
    hf_config = hf_config_from_model(config, tokenizer, moe)
    generation = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  and v is not None}

    def fill(tmp: Path) -> None:
        with naming(tmp / "model.safetensors"):  # a full disk: an OSError naming the file, not a SafetensorError
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)

    return _write_dir(out, fill)


def _restore_tied(state: dict[str, torch.Tensor], config: ModelConfig, moe: MoEConfig | None) -> None:
    """A tied group (GPT's lm_head.weight and transformer.wte.weight) is stored once, under any of its names:
    give the tensor every name of its group. The groups are read off the model built on the meta device."""
    with torch.device("meta"):
        model = build_model(config, moe)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        stored = next((state[n] for n in names if n in state), None)
        if len(names) > 1 and stored is not None:
            state.update({n: stored for n in names})


def _check_tensors(state: dict[str, torch.Tensor], config: ModelConfig, what: str,
                   moe: MoEConfig | None = None) -> None:
    """Every parameter of the model `config` (and `moe`) describes, with its shape, and nothing else. The model
    is built on the meta device: names and shapes without allocating or initialising anything."""
    with torch.device("meta"):
        expected = build_model(config, moe).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    check_shapes(state, expected, what)


# ----------------------------------------------------------------------------- file helpers


def _existing_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{what} {path} does not exist or is not a folder")
    return path


def _read_json(file: Path, hint: str) -> dict:
    """A JSON object from `file` (config.json, an index), or one ConversionError line saying what is wrong."""
    if not file.is_file():
        raise ConversionError(f"{file} does not exist; {hint}")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); a Hugging Face folder's "
                              f"JSON files are UTF-8") from None
    try:
        value = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError
        raise ConversionError(f"{file} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConversionError(f"{file} is nested too deeply to be a Hugging Face config") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{file} holds a JSON {_json_type(value)} where a JSON object {{...}} belongs; "
                              f"is it the right file?")
    return value


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")


def _check_out(out, overwrite: bool, sources: list[Path]) -> Path:
    """`out` may not exist, be empty, or (with overwrite) be replaced; never a source or a folder holding one."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} is a file; choose a folder path")
    resolved = out.resolve()
    for src in sources:
        src = src.resolve()
        if resolved == src or resolved in src.parents:
            raise ConversionError(f"output {out} would replace the input {src}; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output {out} exists and is not empty; pass --overwrite to replace it or choose "
                              f"another folder")
    return out


def _write_dir(out: Path, fill: Callable[[Path], None]) -> Path:
    """Run fill(tmp) in a temporary sibling folder, fsync it, then move it to `out` in one rename
    (an existing `out` is moved aside first and deleted after). A failure leaves nothing: no temporary folder, and
    none of the parent folders this call created."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        ckpt.fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # not empty (another writer's files): it stays
                folder.rmdir()
        raise
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    ckpt.fsync_dir(out.parent)
    return out
