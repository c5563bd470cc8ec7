"""Hugging Face checkpoints in and out: GPT2LMHeadModel and LlamaForCausalLM <-> choicelm's GPT.

    from_hf("hf/gpt2", "ckpt/gpt2")        # config.json + weights + tokenizer -> a choicelm checkpoint folder
    choicelm.load("ckpt/gpt2")             # ... which loads like any step directory
    to_hf("runs/x", "hf/x")                # a run or step folder -> a folder transformers loads as is

Both directions read and write files only: transformers is not needed to convert.

choicelm's GPT already uses GPT-2's parameter names (see models/gpt.py), so the maps are short:

    GPT-2 (HF)                                  choicelm
    [transformer.]wte / wpe / h.i.ln_1 ...      transformer.wte / wpe / h.i.ln_1 ... (same names)
    h.i.attn.c_attn / c_proj, h.i.mlp.c_fc / c_proj .weight
                                                the same, transposed (HF's Conv1D stores [in, out])
    h.i.attn.bias, h.i.attn.masked_bias         dropped (HF's causal-mask buffers, not parameters)
    lm_head.weight                              lm_head.weight (= wte when tied)

    Llama (HF)                                  choicelm
    model.embed_tokens                          transformer.wte
    model.layers.i.input_layernorm              transformer.h.i.ln_1
    model.layers.i.self_attn.{q,k,v}_proj       transformer.h.i.attn.c_attn (rows [q | k | v], concatenated)
    model.layers.i.self_attn.o_proj             transformer.h.i.attn.c_proj
    model.layers.i.post_attention_layernorm     transformer.h.i.ln_2
    model.layers.i.mlp.{gate,up,down}_proj      transformer.h.i.mlp.{gate,up,down}_proj
    model.norm                                  transformer.ln_f
    lm_head                                     lm_head (= wte when tied)

Only layouts both sides compute identically are converted; anything else (another architecture,
rope scaling, a non-tanh GELU, GPT-2 without biases, learned positions with RMSNorm, MoE) is refused
with a message saying what is supported. Nothing is overwritten without overwrite=True, and the
output appears complete or not at all (written to a temporary folder, fsynced, renamed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..config import Config, ModelConfig
from ..errors import ChoicelmError
from ..models import build_model
from ..tokenizer import EOT, Tokenizer, read_special_tokens
from ..train import checkpoint as ckpt
from .tiktoken_bpe import byte_level_tokenizer, read_vocab_merges

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
SUPPORTED = (GPT2, LLAMA)
_MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # what choicelm's MLP computes (F.gelu approximate="tanh")


class ConversionError(ChoicelmError):
    """A checkpoint cannot be converted; the message says why and what is supported."""


# ----------------------------------------------------------------------------- configs


def architecture(hf_config: dict) -> str:
    """GPT2LMHeadModel or LlamaForCausalLM, from config.json's architectures (or model_type)."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get("model_type", ""))
    if arch not in SUPPORTED:
        found = arch or hf_config.get("model_type") or "no architectures or model_type"
        raise ConversionError(f"architecture {found} is not supported; choicelm converts {' and '.join(SUPPORTED)}")
    return arch


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """The choicelm model config that computes what the Hugging Face model computes."""
    arch = architecture(hf_config)
    c = hf_config
    if arch == GPT2:
        act = c.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            raise ConversionError(f"GPT-2 activation_function={act!r} is not supported; choicelm's GPT-2 MLP is the "
                                  f"tanh GELU ({' or '.join(_GELU_TANH)})")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if c.get(key, want) != want:
                raise ConversionError(f"GPT-2 with {key}={c[key]} is not supported; choicelm computes GPT-2's "
                                      f"default attention ({key}={want})")
        return ModelConfig(kind="gpt", vocab_size=c["vocab_size"], block_size=c.get("n_positions", 1024),
                           n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                           mlp_hidden=c.get("n_inner") or 0, norm="layernorm",
                           norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp="gelu", pos="learned", bias=True,
                           tie_embeddings=c.get("tie_word_embeddings", True), dropout=0.0)

    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"Llama hidden_act={act!r} is not supported; choicelm's SwiGLU uses silu")
    attention_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ConversionError(f"Llama with attention_bias={attention_bias} but mlp_bias={mlp_bias} is not "
                              f"supported; choicelm has one bias switch for both")
    if c.get("pretraining_tp", 1) != 1:
        raise ConversionError(f"Llama pretraining_tp={c['pretraining_tp']} is not supported; only 1")
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ConversionError(f"Llama head_dim={head_dim} x {n_head} heads != hidden_size={n_embd} is not "
                              f"supported; choicelm's head size is n_embd / n_head")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"Llama rope type {rope_type!r} is not supported; choicelm implements plain rotary "
                              f"positions (rope_type default) with any rope_theta")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    return ModelConfig(kind="gpt", vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 2048),
                       n_layer=c["num_hidden_layers"], n_head=n_head,
                       n_kv_head=c.get("num_key_value_heads") or n_head, n_embd=n_embd,
                       mlp_hidden=c["intermediate_size"], norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                       mlp="swiglu", pos="rope", rope_theta=float(theta), bias=bool(attention_bias),
                       tie_embeddings=c.get("tie_word_embeddings", False), dropout=0.0)


def hf_architecture_for(config: ModelConfig, moe=None) -> str:
    """The Hugging Face class that computes what this choicelm model computes (moe: the run's moe
    config section, if any), or a ConversionError."""
    if config.kind != "gpt" or (moe is not None and getattr(moe, "experts", 0)):
        what = f"model.kind={config.kind}" if config.kind != "gpt" else \
            f"a Mixture-of-Experts model (moe.experts={moe.experts}, router {getattr(moe, 'router', '?')})"
        raise ConversionError(f"{what} has no Hugging Face equivalent; only dense GPT models convert "
                              f"(to {' or '.join(SUPPORTED)})")
    layout = (config.norm, config.mlp, config.pos)
    if layout == ("layernorm", "gelu", "learned") and config.bias and config.kv_heads == config.n_head:
        return GPT2
    if layout == ("rmsnorm", "swiglu", "rope"):
        return LLAMA
    raise ConversionError(
        f"this model's layout (norm={config.norm}, mlp={config.mlp}, pos={config.pos}, bias={config.bias}, "
        f"n_kv_head={config.n_kv_head}) has no Hugging Face equivalent; {GPT2} needs norm=layernorm, mlp=gelu, "
        f"pos=learned, bias=true, n_kv_head=0, and {LLAMA} needs norm=rmsnorm, mlp=swiglu, pos=rope")


def hf_config_from_model(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict:
    """config.json for the model (special-token ids from the tokenizer)."""
    arch = hf_architecture_for(config)
    ids = {"bos_token_id": tokenizer.bos_id if tokenizer else None,
           "eos_token_id": tokenizer.eos_id if tokenizer else None,
           "pad_token_id": tokenizer.pad_id if tokenizer else None}
    common = {"architectures": [arch], "vocab_size": config.vocab_size, "initializer_range": 0.02,
              "tie_word_embeddings": config.tie_embeddings, "dtype": "float32", "use_cache": True, **ids}
    if arch == GPT2:
        return {**common, "model_type": "gpt2", "n_positions": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer, "n_head": config.n_head,
                "n_inner": config.mlp_hidden if config.hidden_size != 4 * config.n_embd else None,
                "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    return {**common, "model_type": "llama", "hidden_size": config.n_embd, "intermediate_size": config.hidden_size,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": config.dropout,
            "pretraining_tp": 1}


# ----------------------------------------------------------------------------- weights


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors -> choicelm names and layouts (every choicelm parameter, lm_head included when tied)."""
    hf_state = dict(hf_state)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ConversionError(f"the weights have no tensor {name!r}; they do not match config.json's {arch}")
        return hf_state.pop(name)

    if arch == GPT2:
        for name in list(hf_state):
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                del hf_state[name]  # causal-mask buffers
            elif not name.startswith(("transformer.", "lm_head.")):
                hf_state["transformer." + name] = hf_state.pop(name)  # saved from GPT2Model (the Hub's gpt2)
        for name in list(hf_state):
            if name.startswith("transformer."):
                t = take(name)
                out[name] = t.t().contiguous() if name.endswith(_CONV1D) else t
    else:
        out["transformer.wte.weight"] = take("model.embed_tokens.weight")
        out["transformer.ln_f.weight"] = take("model.norm.weight")
        for i in range(config.n_layer):
            p, q = f"model.layers.{i}.", f"transformer.h.{i}."
            out[q + "ln_1.weight"] = take(p + "input_layernorm.weight")
            out[q + "ln_2.weight"] = take(p + "post_attention_layernorm.weight")
            kinds = ("weight", "bias") if config.bias else ("weight",)
            for kind in kinds:
                out[q + f"attn.c_attn.{kind}"] = torch.cat([take(p + f"self_attn.{n}_proj.{kind}") for n in "qkv"])
                out[q + f"attn.c_proj.{kind}"] = take(p + f"self_attn.o_proj.{kind}")
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[q + f"mlp.{n}.{kind}"] = take(p + f"mlp.{n}.{kind}")
            hf_state.pop(p + "self_attn.rotary_emb.inv_freq", None)  # a buffer in old checkpoints

    head = hf_state.pop("lm_head.weight", None)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    elif head is None:
        raise ConversionError("config.json says tie_word_embeddings=false but the weights have no lm_head.weight")
    else:
        out["lm_head.weight"] = head
    if hf_state:
        raise ConversionError(f"the weights hold tensors a {arch} with this config.json does not have: "
                              f"{sorted(hf_state)[:5]}; the config and weights do not match")
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """choicelm tensors -> HF names and layouts, lm_head left out when tied (as save_pretrained does)."""
    out: dict[str, torch.Tensor] = {}
    if arch == GPT2:
        for name, t in state.items():
            if name.startswith("transformer."):
                out[name] = t.t() if name.endswith(_CONV1D) else t
    else:
        out["model.embed_tokens.weight"] = state["transformer.wte.weight"]
        out["model.norm.weight"] = state["transformer.ln_f.weight"]
        H, K, Q = config.n_head, config.kv_heads, config.head_dim
        for i in range(config.n_layer):
            p, q = f"model.layers.{i}.", f"transformer.h.{i}."
            out[p + "input_layernorm.weight"] = state[q + "ln_1.weight"]
            out[p + "post_attention_layernorm.weight"] = state[q + "ln_2.weight"]
            for kind in (("weight", "bias") if config.bias else ("weight",)):
                for n, t in zip("qkv", state[q + f"attn.c_attn.{kind}"].split((H * Q, K * Q, K * Q))):
                    out[p + f"self_attn.{n}_proj.{kind}"] = t
                out[p + f"self_attn.o_proj.{kind}"] = state[q + f"attn.c_proj.{kind}"]
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[p + f"mlp.{n}.{kind}"] = state[q + f"mlp.{n}.{kind}"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: t.detach().contiguous() for name, t in out.items()}


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, sharded safetensors (with their index),
    or pytorch_model.bin (read with weights_only=True: no code runs)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (hf_dir / single).is_file():
            files = [hf_dir / single]
        elif (hf_dir / index_name).is_file():
            weight_map = json.loads((hf_dir / index_name).read_text())["weight_map"]
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
    merges.txt; special tokens from tokenizer_config.json / special_tokens_map.json."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.load(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges = read_vocab_merges(folder)
        roles = read_special_tokens(folder)
        specials = tuple(dict.fromkeys(t for t in (*roles.values(), EOT) if t is not None and t in vocab))
        return Tokenizer(byte_level_tokenizer(vocab, merges, specials), kind="bpe", special_tokens=roles)
    if (folder / "tokenizer.model").is_file():
        raise ConversionError(f"{folder} has only a sentencepiece tokenizer.model; save it as tokenizer.json first "
                              f"(AutoTokenizer.from_pretrained(folder).save_pretrained(folder) in transformers)")
    raise ConversionError(f"{folder} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                          f"pass --tokenizer DIR with one")


# ----------------------------------------------------------------------------- whole folders


def read_hf_model(hf_dir: str | os.PathLike) -> tuple[ModelConfig, str, dict[str, torch.Tensor]]:
    """(choicelm model config, HF architecture, every choicelm tensor by name) of a Hugging Face folder,
    checked against the names and shapes the config implies."""
    hf_dir = _existing_dir(hf_dir, "Hugging Face model folder")
    hf_config = _read_json(hf_dir / "config.json", "a Hugging Face model folder needs config.json")
    config = model_config_from_hf(hf_config)
    arch = architecture(hf_config)
    state = state_dict_from_hf(read_hf_weights(hf_dir), config, arch)
    _check_tensors(state, config, f"the weights in {hf_dir} do not match its config.json ({arch})")
    return config, arch, state


def load_hf_model(hf_dir: str | os.PathLike) -> torch.nn.Module:
    """The Hugging Face model in `hf_dir` as a choicelm GPT (fp32, eval mode), without writing anything."""
    config, _, state = read_hf_model(hf_dir)
    model = build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def from_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Convert a Hugging Face GPT-2 or Llama folder into a choicelm checkpoint folder `out`
    (model.safetensors, config.yaml, tokenizer/, COMPLETE) that `choicelm.load(out)` reads.
    tokenizer: a folder to take the tokenizer from instead of hf_dir. Weights are stored in fp32."""
    hf_dir = _existing_dir(hf_dir, "Hugging Face model folder")
    out = _check_out(out, overwrite, sources=[hf_dir] + ([Path(tokenizer)] if tokenizer else []))
    tok = load_hf_tokenizer(_existing_dir(tokenizer, "tokenizer folder") if tokenizer else hf_dir)
    config, arch, state = read_hf_model(hf_dir)
    if tok.vocab_size > config.vocab_size:
        raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size} "
                              f"embeddings; pass the model's own tokenizer with --tokenizer")
    if config.tie_embeddings:  # stored once, under the name safetensors' save_model keeps for the pair
        del state["transformer.wte.weight"]
    tensors = {name: t.to(torch.float32).contiguous() for name, t in state.items()}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        Config(model=config).save(tmp / "config.yaml")
        tok.save(tmp / "tokenizer")
        source = {"converted_from": str(hf_dir.resolve()), "architecture": arch}
        (tmp / "source.json").write_text(json.dumps(source, indent=1) + "\n")
        (tmp / ckpt.MARKER).write_text(json.dumps({"step": 0, "val_loss": None}))

    return _write_dir(out, fill)


def to_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export a choicelm checkpoint (run or step folder) as a Hugging Face folder: model.safetensors,
    config.json, generation_config.json, tokenizer.json and tokenizer_config.json, which
    AutoModelForCausalLM.from_pretrained(out) and AutoTokenizer.from_pretrained(out) load as they are."""
    step_dir = ckpt.resolve_checkpoint(checkpoint)
    out = _check_out(out, overwrite, sources=[Path(checkpoint), step_dir])
    run_config = _read_config(step_dir)
    config = run_config.model
    arch = hf_architecture_for(config, getattr(run_config, "moe", None))  # refuse before reading any weights
    weights = step_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises a mix of types for a truncated or foreign file
        raise ConversionError(f"cannot read weights {weights}: {str(e)[:200]}") from None
    if config.tie_embeddings:  # a tied pair is stored once, under either name
        shared = state.get("lm_head.weight", state.get("transformer.wte.weight"))
        if shared is not None:
            state["lm_head.weight"] = state["transformer.wte.weight"] = shared
    _check_tensors(state, config, f"the weights {weights} do not match {step_dir / 'config.yaml'}")
    tokenizer = Tokenizer.load(step_dir / "tokenizer")
    tensors = state_dict_to_hf(state, config, arch)
    hf_config = hf_config_from_model(config, tokenizer)
    generation = {k: v for k, v in hf_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  and v is not None}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(tmp)

    return _write_dir(out, fill)


def _check_tensors(state: dict[str, torch.Tensor], config: ModelConfig, what: str) -> None:
    """Every parameter of the model `config` describes, with its shape, and nothing else. The model is
    built on the meta device: names and shapes without allocating or initialising anything."""
    with torch.device("meta"):
        expected = build_model(config).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ConversionError(f"{what}: {name} has shape {tuple(t.shape)}, the config implies "
                                  f"{tuple(expected[name].shape)}")


# ----------------------------------------------------------------------------- file helpers


def _existing_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{what} {path} does not exist or is not a folder")
    return path


def _read_json(file: Path, hint: str) -> dict:
    if not file.is_file():
        raise ConversionError(f"{file} does not exist; {hint}")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from None


def _read_config(step_dir: Path) -> Config:
    file = step_dir / "config.yaml"
    if not file.is_file():
        raise ConversionError(f"{step_dir} has no config.yaml; it is not a choicelm checkpoint")
    return Config.from_dict(yaml.safe_load(file.read_text()), str(file))


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
    (an existing `out` is moved aside first and deleted after)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        ckpt.fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
