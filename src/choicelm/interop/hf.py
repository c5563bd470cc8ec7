"""Hugging Face checkpoints in and out: GPT-2, Llama, Mixtral, BERT and Marian.

    GPT2LMHeadModel, LlamaForCausalLM          <-> choicelm's GPT           (from_hf and to_hf)
    MixtralForCausalLM                         <-> choicelm's GPT with a token-choice MoE in every block
    BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification
                                               -> choicelm's BERT          (from_hf)
    MarianMTModel                              -> choicelm's Seq2Seq       (from_hf)

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

Mixtral is Llama's attention and norms (no biases) with an MoE layer in every block (models/moe.py):

    Mixtral (HF)                                        choicelm
    model.layers.i.block_sparse_moe.gate                transformer.h.i.mlp.router
    ...block_sparse_moe.experts.e.{w1,w3} [F, D]        transformer.h.i.mlp.experts.w_in[e] [D, 2F] = [w1.T | w3.T]
    ...block_sparse_moe.experts.e.w2 [D, F]             transformer.h.i.mlp.experts.w_out[e] [F, D] = w2.T
    (transformers 5.x in memory: mlp.gate, mlp.experts.gate_up_proj [E, 2F, D] and down_proj [E, D, F];
     both layouts are read, the Hub's per-expert one is written, as save_pretrained does)

    config.json                          choicelm moe section
    num_local_experts                    experts            (every = 1: every block is an MoE layer)
    intermediate_size                    expert_width       (and model.mlp_hidden)
    num_experts_per_tok                  top_k              (router = token_choice, renormalize = true,
    router_aux_loss_coef                 balance_loss_weight  dropless = true: Mixtral drops no token;
                                           (rescaled, below)  z_loss_weight = 0: Mixtral has no z-loss)

Mixtral's balance loss is one Switch loss over all layers' routing pooled, with top-k shares that sum to top_k;
choicelm's is a sum of per-layer Switch losses with shares that sum to 1. So balance_loss_weight =
router_aux_loss_coef * top_k / num_hidden_layers (and back on export): the same loss for one layer, and for
more layers the same whenever the layers route alike (pooling averages them; choicelm's sum does not pool).

Mixtral's inference is reproduced exactly. A sliding_window below max_position_embeddings becomes the block size
(within it the window masks nothing; longer inputs are refused); router_jitter_noise only perturbs training in
transformers and is not kept (noted in source.json). to_hf writes MixtralForCausalLM for a token-choice MoE GPT
in Llama layout with moe.every = 1, renormalize = true and no shared expert; a model trained with capacity
dropping (dropless = false) exports too, since choicelm evaluates and generates dropless, as Mixtral does.

BERT's names are models/bert.py's (`state_dict_from_hf_bert`). Which head the checkpoint gets:

    BertForMaskedLM                 masked-LM model (n_labels = 0): encoder + MLM head
    BertForPreTraining              the same with next-sentence prediction (model.nsp): pooler and NSP head kept
    BertForSequenceClassification   classifier (n_labels = num_labels): encoder + pooler + classifier, and
                                    labels.json {"labels": [...]} from config.json's id2label (index = class id)
    BertModel                       masked-LM model whose MLM head is freshly initialised (a BertModel has none)
                                    and whose pooler is dropped (both listed in source.json); hidden states exact

Marian is choicelm's Seq2Seq with pos=sinusoidal, norm_placement=post (models/seq2seq.py):

    Marian (HF)                                         choicelm
    model.shared (= {en,de}coder.embed_tokens)          decoder.wte (the encoder reads it too)
    model.encoder.embed_tokens (separate vocabularies)  encoder.wte (model.src_vocab_size = vocab_size)
    model.{en,de}coder.layers.i.self_attn.{q,k,v}_proj  {en,de}coder.h.i.attn.c_attn (rows [q | k | v])
    ...self_attn.out_proj / self_attn_layer_norm        ...attn.c_proj / ln_1
    model.decoder.layers.i.encoder_attn.q_proj          decoder.h.i.cross.q_proj
    model.decoder.layers.i.encoder_attn.{k,v}_proj      decoder.h.i.cross.c_kv (rows [k | v])
    ...encoder_attn.out_proj / encoder_attn_layer_norm  decoder.h.i.cross.c_proj / ln_2
    ...fc1 / fc2 / final_layer_norm                     ...mlp.c_fc / mlp.c_proj / ln_2 (encoder), ln_3 (decoder)
    lm_head                                             lm_head (= decoder.wte when tied)
    embed_positions, final_logits_bias                  checked (Marian's fixed table; all zero) and dropped

Marian's tokenizer is SentencePiece without tokenizer.json, which choicelm cannot read: pass a tokenizer.json
folder whose ids match the model (`tokenizer=` / --tokenizer); its end-of-text token must be config.json's
eos_token_id and its decoder start (bos, else pad) the decoder_start_token_id. A BERT tokenizer.json has no
eos/bos: its [SEP] becomes the end-of-text token and [CLS] the bos, so classification reads [CLS] text [SEP].

Only layouts both sides compute identically are converted; anything else (another architecture,
rope scaling, a non-tanh GELU, GPT-2 without biases, learned positions with RMSNorm, MoE other than Mixtral's
(expert choice, every > 1, a shared expert, GELU experts), Mixtral with biases, BERT with relative positions,
Marian with unscaled embeddings) is refused with a message naming the
field. Nothing is overwritten without overwrite=True, and the output appears complete or not at all
(written to a temporary folder, fsynced, renamed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..core import checkpoint as ckpt
from ..core.config import Config, ModelConfig, MoEConfig
from ..core.errors import ChoicelmError, naming
from ..models import build_model
from ..models.bert import BERT as BertEncoder, config_from_hf_bert, load_hf_bert_state, state_dict_from_hf_bert
from ..models.seq2seq import sinusoidal_table
from ..tokenizer import EOT, Tokenizer, read_special_tokens
from .tiktoken_bpe import byte_level_tokenizer, read_vocab_merges

log = logging.getLogger(__name__)

GPT2, LLAMA, MIXTRAL = "GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM"
BERT_MODEL, BERT_MLM, BERT_PRETRAINING, BERT_CLASSIFIER = (
    "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
BERT = (BERT_MODEL, BERT_MLM, BERT_PRETRAINING, BERT_CLASSIFIER)
MARIAN = "MarianMTModel"
SUPPORTED = (GPT2, LLAMA, *BERT, MARIAN, MIXTRAL)  # what from_hf reads
EXPORTABLE = (GPT2, LLAMA, MIXTRAL)                # what to_hf writes
_MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "bert": BERT_MODEL, "marian": MARIAN, "mixtral": MIXTRAL}
_DEFAULT_ROPE_THETA = {LLAMA: 10000.0, MIXTRAL: 1e6}  # transformers' defaults when config.json names none
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # what choicelm's MLP computes (F.gelu approximate="tanh")
_SILU = ("swish", "silu")  # what it computes with mlp=silu


class ConversionError(ChoicelmError):
    """A checkpoint cannot be converted; the message says why and what is supported."""


# ----------------------------------------------------------------------------- configs


def architecture(hf_config: dict) -> str:
    """One of SUPPORTED, from config.json's architectures (or model_type: bert alone reads as BertModel)."""
    archs = hf_config.get("architectures") or []
    arch = archs[0] if archs else _MODEL_TYPES.get(hf_config.get("model_type", ""))
    if arch not in SUPPORTED:
        found = arch or hf_config.get("model_type") or "no architectures or model_type"
        dense = [a for a in SUPPORTED if a != MIXTRAL]
        raise ConversionError(f"architecture {found} is not supported; choicelm converts {', '.join(dense[:-1])} "
                              f"and {dense[-1]}, and the Mixture-of-Experts {MIXTRAL}")
    return arch


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """The choicelm model config that computes what the Hugging Face model computes."""
    arch = architecture(hf_config)
    build = {GPT2: _gpt2_config, LLAMA: _llama_config, MIXTRAL: _mixtral_config,
             MARIAN: _marian_config}.get(arch, _bert_config)
    try:
        return build(hf_config, arch)
    except ConversionError:
        raise
    except ChoicelmError as e:  # ModelConfig's own checks (ConfigError) and models/bert.py's
        raise ConversionError(f"{arch} config.json cannot be converted: {e}") from None


def _require(c: dict, arch: str, *keys: str) -> None:
    """config.json has every field the conversion reads (a KeyError would not say which file is wrong)."""
    missing = [k for k in keys if c.get(k) is None]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}, which a {arch} has; is it the config of "
                              f"another architecture?")


def _gpt2_config(c: dict, arch: str) -> ModelConfig:
    _require(c, arch, "vocab_size", "n_layer", "n_head", "n_embd")
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


def _llama_config(c: dict, arch: str) -> ModelConfig:
    """Llama's layout; Mixtral's attention and norms too (arch names the family in messages and picks the
    default rope_theta)."""
    _require(c, arch, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    family = "Mixtral" if arch == MIXTRAL else "Llama"
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{family} hidden_act={act!r} is not supported; choicelm's SwiGLU uses silu")
    attention_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ConversionError(f"{family} with attention_bias={attention_bias} but mlp_bias={mlp_bias} is not "
                              f"supported; choicelm has one bias switch for both")
    if c.get("pretraining_tp", 1) != 1:
        raise ConversionError(f"{family} pretraining_tp={c['pretraining_tp']} is not supported; only 1")
    n_embd, n_head = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise ConversionError(f"{family} head_dim={head_dim} x {n_head} heads != hidden_size={n_embd} is not "
                              f"supported; choicelm's head size is n_embd / n_head")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{family} rope type {rope_type!r} is not supported; choicelm implements plain rotary "
                              f"positions (rope_type default) with any rope_theta")
    theta = rope.get("rope_theta", c.get("rope_theta", _DEFAULT_ROPE_THETA[arch]))
    return ModelConfig(kind="gpt", vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 2048),
                       n_layer=c["num_hidden_layers"], n_head=n_head,
                       n_kv_head=c.get("num_key_value_heads") or n_head, n_embd=n_embd,
                       mlp_hidden=c["intermediate_size"], norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                       mlp="swiglu", pos="rope", rope_theta=float(theta), bias=bool(attention_bias),
                       tie_embeddings=c.get("tie_word_embeddings", False), dropout=0.0)


def _mixtral_config(c: dict, arch: str) -> ModelConfig:
    """Llama's layout without biases (the moe section comes from moe_config_from_hf). A sliding window below
    max_position_embeddings becomes the block size: within it the window masks nothing, so choicelm is exact
    for every input it accepts."""
    _require(c, arch, "num_local_experts", "num_experts_per_tok")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConversionError(f"Mixtral with {key}=true is not supported; Mixtral's attention and experts have "
                                  f"no biases (transformers ignores the setting, so the weights cannot be trusted)")
    config = _llama_config(c, arch)
    window = c.get("sliding_window")
    if window is not None and window < config.block_size:
        config = dataclasses.replace(config, block_size=window)
    return config


def moe_config_from_hf(hf_config: dict) -> MoEConfig | None:
    """The choicelm moe section that routes as the Hugging Face model does (Mixtral: token choice, top-k
    renormalised, dropless, every block), or None for a dense architecture."""
    if architecture(hf_config) != MIXTRAL:
        return None
    c = hf_config
    _require(c, MIXTRAL, "num_local_experts", "num_experts_per_tok", "intermediate_size", "num_hidden_layers")
    top_k, n_layer = c["num_experts_per_tok"], c["num_hidden_layers"]
    try:
        return MoEConfig(experts=c["num_local_experts"], every=1, expert_width=c["intermediate_size"],
                         router="token_choice", top_k=top_k, renormalize=True, dropless=True,
                         balance_loss_weight=float(c.get("router_aux_loss_coef", 0.001)) * top_k / n_layer,
                         z_loss_weight=0.0)
    except ChoicelmError as e:  # MoEConfig's own checks (top_k > experts, experts = 1)
        raise ConversionError(f"{MIXTRAL} config.json cannot be converted: {e}") from None


def conversion_notes(hf_config: dict, config: ModelConfig) -> list[str]:
    """What a conversion changed without changing the model's outputs, for source.json and the log."""
    if architecture(hf_config) != MIXTRAL:
        return []
    notes = []
    window, positions = hf_config.get("sliding_window"), hf_config.get("max_position_embeddings")
    if window is not None and config.block_size == window and (positions is None or window < positions):
        notes.append(f"block_size is sliding_window={window}, not max_position_embeddings={positions}: within "
                     f"{window} positions the sliding window masks nothing (exact); longer inputs are refused")
    jitter = hf_config.get("router_jitter_noise") or 0.0
    if jitter > 0:
        notes.append(f"router_jitter_noise={jitter} is not kept: transformers applies it only in training; "
                     f"choicelm routes (and fine-tunes) without noise")
    return notes


def _bert_config(c: dict, arch: str) -> ModelConfig:
    """BERT's checks beyond models/bert.py's config_from_hf_bert (activation, positions, dropout): no decoder
    use, and a classifier choicelm computes the same way (single-label softmax over >= 2 classes)."""
    _require(c, arch, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    for key in ("is_decoder", "add_cross_attention"):
        if c.get(key):
            raise ConversionError(f"BERT with {key}=true is not supported; choicelm's encoder is bidirectional and "
                                  f"has no cross-attention")
    n_labels = 0
    if arch == BERT_CLASSIFIER:
        problem = c.get("problem_type")
        if problem not in (None, "single_label_classification"):
            raise ConversionError(f"BERT problem_type={problem!r} is not supported; choicelm's classifier is "
                                  f"single-label (softmax over the classes, problem_type single_label_classification)")
        n_labels = c.get("num_labels") or len(c.get("id2label") or {}) or 2
        if n_labels < 2:
            raise ConversionError(f"BERT num_labels={n_labels} (regression) is not supported; choicelm's classifier "
                                  f"needs at least 2 classes")
    config = config_from_hf_bert(c, n_labels=n_labels)
    return dataclasses.replace(config, nsp=True) if arch == "BertForPreTraining" else config


def _marian_config(c: dict, arch: str) -> ModelConfig:
    """Marian's layout is choicelm's Seq2Seq with pos=sinusoidal, norm_placement=post. One n_head and one MLP
    width serve encoder and decoder; attention_dropout and activation_dropout are not kept (dropout is)."""
    _require(c, arch, "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
             "encoder_ffn_dim")
    act = c.get("activation_function", "gelu")
    if act not in _GELU_TANH + _SILU:  # swish: the released opus-mt models
        raise ConversionError(f"Marian activation_function={act!r} is not supported; choicelm's encoder-decoder MLP "
                              f"computes the tanh GELU ({' or '.join(_GELU_TANH)}) or swish/silu")
    if not c.get("scale_embedding", False):
        raise ConversionError("Marian scale_embedding=false is not supported; choicelm multiplies token embeddings "
                              "by sqrt(d_model) (scale_embedding=true, as in the released opus-mt models)")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if c.get(dec, c[enc]) != c[enc]:
            raise ConversionError(f"Marian {enc}={c[enc]} but {dec}={c[dec]} is not supported; choicelm's encoder "
                                  f"and decoder share one n_head and one MLP width")
    shared = c.get("share_encoder_decoder_embeddings", True)
    target_vocab = c.get("decoder_vocab_size") or c["vocab_size"]
    if shared and target_vocab != c["vocab_size"]:
        raise ConversionError(f"Marian share_encoder_decoder_embeddings=true with decoder_vocab_size={target_vocab} "
                              f"!= vocab_size={c['vocab_size']} is not supported; one shared embedding has one size")
    return ModelConfig(kind="seq2seq", vocab_size=target_vocab, src_vocab_size=0 if shared else c["vocab_size"],
                       block_size=c.get("max_position_embeddings", 1024), n_layer=c["encoder_layers"],
                       n_decoder_layer=c["decoder_layers"], n_head=c["encoder_attention_heads"], n_embd=c["d_model"],
                       mlp_hidden=c["encoder_ffn_dim"], norm="layernorm", norm_eps=1e-5,  # HF's nn.LayerNorm default
                       mlp="silu" if act in _SILU else "gelu", pos="sinusoidal", norm_placement="post", bias=True,
                       tie_embeddings=c.get("tie_word_embeddings", True), dropout=float(c.get("dropout", 0.0)))


def hf_labels(hf_config: dict, n_labels: int) -> list[str]:
    """A classifier's class names from config.json's id2label (index = class id)."""
    id2label = {str(k): v for k, v in (hf_config.get("id2label") or {}).items()}
    missing = [i for i in range(n_labels) if str(i) not in id2label]
    if missing:
        raise ConversionError(f"config.json's id2label names no class {missing[0]} of the {n_labels} classes "
                              f"(num_labels); give every class id 0..{n_labels - 1} a name")
    return [str(id2label[str(i)]) for i in range(n_labels)]


def hf_architecture_for(config: ModelConfig, moe: MoEConfig | None = None) -> str:
    """The Hugging Face class that computes what this choicelm model computes (moe: the run's moe
    config section, if any), or a ConversionError."""
    if config.kind != "gpt":
        raise ConversionError(f"model.kind={config.kind} has no Hugging Face equivalent; only GPT models convert "
                              f"(dense to {GPT2} or {LLAMA}, Mixture-of-Experts to {MIXTRAL})")
    if config.n_labels:
        raise ConversionError("a classifier (model.n_labels > 0) has no Hugging Face export yet: its head would be "
                              "lost; use the checkpoint with choicelm.load(...).classify")
    if config.qk_norm:
        raise ConversionError(f"a model with model.qk_norm=true has no Hugging Face export yet ({GPT2}, {LLAMA} and "
                              f"{MIXTRAL} do not normalise queries and keys); use the checkpoint with choicelm.load")
    if moe is not None and moe.enabled:
        return _mixtral_or_refuse(config, moe)
    layout = (config.norm, config.mlp, config.pos)
    if layout == ("layernorm", "gelu", "learned") and config.bias and config.kv_heads == config.n_head:
        return GPT2
    if layout == ("rmsnorm", "swiglu", "rope"):
        return LLAMA
    raise ConversionError(
        f"this model's layout (norm={config.norm}, mlp={config.mlp}, pos={config.pos}, bias={config.bias}, "
        f"n_kv_head={config.n_kv_head}) has no Hugging Face equivalent; {GPT2} needs norm=layernorm, mlp=gelu, "
        f"pos=learned, bias=true, n_kv_head=0, and {LLAMA} needs norm=rmsnorm, mlp=swiglu, pos=rope")


def _mixtral_or_refuse(config: ModelConfig, moe: MoEConfig) -> str:
    """MIXTRAL when the MoE GPT computes what Mixtral computes; else one message naming every setting that
    differs. moe.dropless is not required: choicelm evaluates and generates token choice dropless, as Mixtral
    does, and the capacity limit of training has no counterpart in the exported model."""
    wrong = []
    layout = (config.norm, config.mlp, config.pos)
    if layout != ("rmsnorm", "swiglu", "rope"):
        wrong.append(f"norm=rmsnorm, mlp=swiglu, pos=rope (got {', '.join(layout)}; SwiGLU experts)")
    if config.bias:
        wrong.append("model.bias=false")
    if moe.router != "token_choice":
        wrong.append(f"moe.router=token_choice (got {moe.router})")
    if moe.every != 1:
        wrong.append(f"moe.every=1 (got {moe.every})")
    if not moe.renormalize:
        wrong.append("moe.renormalize=true")
    if moe.shared_expert:
        wrong.append("moe.shared_expert=false")
    if config.n_labels:
        wrong.append(f"model.n_labels=0 (got a {config.n_labels}-class classifier)")
    if wrong:
        raise ConversionError(f"a Mixture-of-Experts model (moe.experts={moe.experts}, moe.router={moe.router}) has "
                              f"no Hugging Face equivalent unless it is Mixtral's: {MIXTRAL} needs "
                              f"{'; '.join(wrong)}")
    return MIXTRAL


def hf_config_from_model(config: ModelConfig, tokenizer: Tokenizer | None = None,
                         moe: MoEConfig | None = None) -> dict:
    """config.json for the model (special-token ids from the tokenizer; moe: the run's moe section)."""
    arch = hf_architecture_for(config, moe)
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
    attention = {"hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
                 "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
                 "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.block_size,
                 "rms_norm_eps": config.norm_eps, "attention_dropout": config.dropout,
                 "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
                 "rope_theta": config.rope_theta}  # transformers 4.x reads rope_theta, 5.x rope_parameters
    if arch == LLAMA:
        return {**common, **attention, "model_type": "llama", "intermediate_size": config.hidden_size,
                "attention_bias": config.bias, "mlp_bias": config.bias, "pretraining_tp": 1}
    return {**common, **attention, "model_type": "mixtral", "intermediate_size": moe.expert_width or config.hidden_size,
            "num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k, "sliding_window": None,
            "router_aux_loss_coef": moe.balance_loss_weight * config.n_layer / moe.top_k,  # see the module docstring
            "router_jitter_noise": 0.0, "output_router_logits": False}


# ----------------------------------------------------------------------------- weights


@dataclass
class Converted:
    """What a Hugging Face folder becomes: the choicelm tensors, and which HF tensors had no place (dropped)
    and which choicelm tensors the source lacked and were freshly initialised (a BertModel's MLM head)."""

    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors -> choicelm names and layouts: every choicelm tensor (tied ones under both names)."""
    return convert_state(hf_state, config, arch).state


def convert_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Converted:
    """state_dict_from_hf, with the tensors dropped and initialised on the way."""
    if arch in BERT:
        return _bert_state(hf_state, config, arch)
    if arch == MARIAN:
        return Converted(state_dict_from_hf_marian(hf_state, config))
    return Converted(_gpt_state(hf_state, config, arch))


def _gpt_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
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
                if arch == LLAMA:
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        out[q + f"mlp.{n}.{kind}"] = take(p + f"mlp.{n}.{kind}")
            if arch == MIXTRAL:
                out.update(_mixtral_experts_from_hf(hf_state, take, p, q + "mlp."))
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


def _mixtral_experts_from_hf(hf_state: dict[str, torch.Tensor], take, p: str, q: str) -> dict[str, torch.Tensor]:
    """One Mixtral layer's router and experts (prefix p) as choicelm's MoE tensors (prefix q), from the Hub's
    per-expert layout (block_sparse_moe.experts.e.w1/w2/w3) or transformers 5.x's stacked one (mlp.experts.*)."""
    if p + "mlp.experts.gate_up_proj" in hf_state:  # stacked: [E, 2F, D] rows [gate | up], and [E, D, F]
        return {q + "router.weight": take(p + "mlp.gate.weight"),
                q + "experts.w_in": take(p + "mlp.experts.gate_up_proj").transpose(1, 2).contiguous(),
                q + "experts.w_out": take(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()}
    router_ED = take(p + "block_sparse_moe.gate.weight")
    experts = [f"{p}block_sparse_moe.experts.{e}." for e in range(router_ED.shape[0])]
    w_in_EDF2 = torch.stack([torch.cat([take(x + "w1.weight").t(), take(x + "w3.weight").t()], dim=1)
                             for x in experts])  # w1 = gate, w3 = up: [gate | up] as in models/moe.py
    w_out_EFD = torch.stack([take(x + "w2.weight").t() for x in experts])
    return {q + "router.weight": router_ED, q + "experts.w_in": w_in_EDF2, q + "experts.w_out": w_out_EFD}


def _mixtral_experts_to_hf(state: dict[str, torch.Tensor], q: str, p: str) -> dict[str, torch.Tensor]:
    """choicelm's MoE tensors (prefix q) as one Mixtral layer in the Hub's per-expert layout (prefix p)."""
    w_in_EDF2, w_out_EFD = state[q + "experts.w_in"], state[q + "experts.w_out"]
    gate_EDF, up_EDF = w_in_EDF2.chunk(2, dim=-1)
    out = {p + "block_sparse_moe.gate.weight": state[q + "router.weight"]}
    for e in range(w_in_EDF2.shape[0]):
        x = f"{p}block_sparse_moe.experts.{e}."
        out[x + "w1.weight"], out[x + "w3.weight"] = gate_EDF[e].t(), up_EDF[e].t()
        out[x + "w2.weight"] = w_out_EFD[e].t()
    return out


_BERT_MLM_HEAD = ("mlm_head.", "lm_head.")
_BERT_NSP_HEAD = "cls.seq_relationship."
_BERT_HEAD_SOURCES = {"pooler": "pooler.", "mlm_head": "cls.predictions.", "lm_head": "cls.predictions.",
                      "classifier": "classifier.", "nsp_head": _BERT_NSP_HEAD}  # choicelm head -> HF name prefix (after "bert.")


def _bert_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Converted:
    """models/bert.py's name map, run through a real model so that a head the source lacks (only a BertModel's
    MLM head may be) gets BERT's initialisation, the same for every conversion (seed 0)."""
    dropped = [] if config.nsp else sorted(n for n in hf_state if n.removeprefix("bert.").startswith(_BERT_NSP_HEAD))
    hf_state = {n: t for n, t in hf_state.items() if n not in dropped}  # a next-sentence head without a place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertEncoder(config)
    what = f"the weights do not match config.json's {arch}"
    try:
        _check_shapes(state_dict_from_hf_bert(hf_state, config), model.state_dict(), what)
        missing, ignored = load_hf_bert_state(model, hf_state)
    except ConversionError:
        raise
    except ChoicelmError as e:
        raise ConversionError(f"{what}: {e}") from None
    lacking = [m for m in missing if not (arch == BERT_MODEL and m.startswith(_BERT_MLM_HEAD))]
    if lacking:
        raise ConversionError(f"the weights have no tensor for {', '.join(lacking[:5])}, which a {arch} has; they "
                              f"do not match config.json")
    unused = tuple(_BERT_HEAD_SOURCES[name.split(".")[0]] for name in ignored)  # a head the model has no place for
    dropped += sorted(n for n in hf_state if unused and n.removeprefix("bert.").startswith(unused))
    return Converted(model.state_dict(), dropped=dropped, initialised=missing)


def state_dict_from_hf_marian(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face MarianMTModel state dict -> choicelm Seq2Seq names (see the table in the module
    docstring): every Seq2Seq tensor, lm_head.weight included (the decoder embedding when tied). Marian's fixed
    position tables and its final_logits_bias are checked (choicelm has no such tensors) and dropped; a tensor
    left over is an error."""
    hf = dict(hf_state)

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConversionError(f"the weights have no tensor {name!r}; they do not match config.json's {MARIAN}")
        return hf.pop(name)

    _check_marian_extras(hf, config)
    out = _marian_embeddings(hf, config, take)
    for i in range(config.n_layer):
        p, q = f"model.encoder.layers.{i}.", f"encoder.h.{i}."
        out.update(_fused(take, p + "self_attn.", "qkv", q + "attn.c_attn"))
        for src, dst in (("self_attn.out_proj", "attn.c_proj"), ("self_attn_layer_norm", "ln_1"),
                         ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj"), ("final_layer_norm", "ln_2")):
            out.update(_linear(take, p + src, q + dst))
    for i in range(config.n_decoder_layer or config.n_layer):
        p, q = f"model.decoder.layers.{i}.", f"decoder.h.{i}."
        out.update(_fused(take, p + "self_attn.", "qkv", q + "attn.c_attn"))
        out.update(_fused(take, p + "encoder_attn.", "kv", q + "cross.c_kv"))
        for src, dst in (("self_attn.out_proj", "attn.c_proj"), ("self_attn_layer_norm", "ln_1"),
                         ("encoder_attn.q_proj", "cross.q_proj"), ("encoder_attn.out_proj", "cross.c_proj"),
                         ("encoder_attn_layer_norm", "ln_2"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj"),
                         ("final_layer_norm", "ln_3")):
            out.update(_linear(take, p + src, q + dst))
    if hf:
        raise ConversionError(f"the weights hold tensors a {MARIAN} with this config.json does not have: "
                              f"{sorted(hf)[:5]}; the config and weights do not match")
    return out


def _linear(take, src: str, dst: str) -> dict[str, torch.Tensor]:
    """A Linear or LayerNorm's weight and bias under a new name."""
    return {f"{dst}.{kind}": take(f"{src}.{kind}") for kind in ("weight", "bias")}


def _fused(take, prefix: str, parts: str, dst: str) -> dict[str, torch.Tensor]:
    """Separate projections (q_proj, k_proj, v_proj) stacked by rows into one Linear, in the order of `parts`."""
    return {f"{dst}.{kind}": torch.cat([take(f"{prefix}{n}_proj.{kind}") for n in parts])
            for kind in ("weight", "bias")}


def _check_marian_extras(hf: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Pop Marian's tensors choicelm computes instead of storing, refusing any that differ from what it computes."""
    bias = hf.pop("final_logits_bias", None)
    if bias is not None and bool(bias.any()):
        raise ConversionError("final_logits_bias is not zero; choicelm's lm_head has no bias, so this Marian model "
                              "cannot be converted")
    table = sinusoidal_table(config.block_size, config.n_embd)
    for part in ("encoder", "decoder"):
        positions = hf.pop(f"model.{part}.embed_positions.weight", None)
        if positions is not None and (positions.shape != table.shape or
                                      not torch.allclose(positions.float(), table, atol=1e-4, rtol=0)):
            raise ConversionError(f"model.{part}.embed_positions.weight is not Marian's fixed sinusoidal table of "
                                  f"max_position_embeddings={config.block_size} x d_model={config.n_embd}; choicelm "
                                  f"computes that table and cannot keep other positions")


def _marian_embeddings(hf: dict[str, torch.Tensor], config: ModelConfig, take) -> dict[str, torch.Tensor]:
    """decoder.wte (the shared embedding, or the decoder's own), encoder.wte for separate vocabularies, and
    lm_head.weight. Copies a checkpoint repeats (old files store every tied name) must be equal."""
    out: dict[str, torch.Tensor] = {}
    names = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    if config.src_vocab_size:
        out["encoder.wte.weight"] = take(names[1])
        out["decoder.wte.weight"] = take(names[2])
    else:
        copies = {n: hf.pop(n) for n in names if n in hf}
        if not copies:
            raise ConversionError(f"the weights have no tensor {names[0]!r}; they do not match config.json's {MARIAN}")
        first, shared = next(iter(copies.items()))
        for name, t in copies.items():
            if not torch.equal(t, shared):
                raise ConversionError(f"share_encoder_decoder_embeddings=true but {name} differs from {first}; "
                                      f"choicelm's shared vocabulary has one embedding")
        out["decoder.wte.weight"] = shared
    head = hf.pop("lm_head.weight", None)
    if config.tie_embeddings:
        if head is not None and not torch.equal(head, out["decoder.wte.weight"]):
            raise ConversionError("config.json says tie_word_embeddings=true but lm_head.weight differs from the "
                                  "decoder embedding; set tie_word_embeddings=false to keep both")
        out["lm_head.weight"] = out["decoder.wte.weight"]
    elif head is None:
        raise ConversionError("config.json says tie_word_embeddings=false but the weights have no lm_head.weight")
    else:
        out["lm_head.weight"] = head
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
                if arch == LLAMA:
                    for n in ("gate_proj", "up_proj", "down_proj"):
                        out[p + f"mlp.{n}.{kind}"] = state[q + f"mlp.{n}.{kind}"]
            if arch == MIXTRAL:
                out.update(_mixtral_experts_to_hf(state, q + "mlp.", p))
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
    if arch == MARIAN and not (hf_dir / "tokenizer.json").is_file():
        raise ConversionError(_no_marian_tokenizer(hf_dir))
    return load_hf_tokenizer(hf_dir)


def _check_tokenizer(tok: Tokenizer, config: ModelConfig, hf_config: dict) -> None:
    """The tokenizer's ids fit the embeddings; for an encoder-decoder, it ends and starts decoding with the ids
    config.json names (choicelm takes both from the tokenizer: see data.tasks.decoder_start_id)."""
    for what, rows in (("", config.vocab_size), (" source", config.src_vocab_size)):
        if rows and tok.vocab_size > rows:
            raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens but the model only {rows}{what} "
                                  f"embeddings; pass the model's own tokenizer with --tokenizer")
    if config.kind != "seq2seq":
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
    if config.tie_embeddings:  # a tied pair is stored once, under either name
        shared = state.get("lm_head.weight", state.get("transformer.wte.weight"))
        if shared is not None:
            state["lm_head.weight"] = state["transformer.wte.weight"] = shared
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


def _check_tensors(state: dict[str, torch.Tensor], config: ModelConfig, what: str,
                   moe: MoEConfig | None = None) -> None:
    """Every parameter of the model `config` (and `moe`) describes, with its shape, and nothing else. The model
    is built on the meta device: names and shapes without allocating or initialising anything."""
    with torch.device("meta"):
        expected = build_model(config, moe).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    _check_shapes(state, expected, what)


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Tensors present on both sides have the shapes the config implies."""
    for name, t in state.items():
        if name in expected and t.shape != expected[name].shape:
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
