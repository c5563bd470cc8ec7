"""BERT's Hugging Face mapping: BertModel, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification ->
choicelm's BERT (models/bert.py). Import only; interop/hf.py reads the files.

    choicelm                        Hugging Face
    embeddings.wte.weight           bert.embeddings.word_embeddings.weight      [V, D]
    embeddings.wpe.weight           bert.embeddings.position_embeddings.weight  [block_size, D]
    embeddings.wtt.weight           bert.embeddings.token_type_embeddings.weight [type_vocab_size, D]
    embeddings.ln.{weight,bias}     bert.embeddings.LayerNorm
    h.{i}.attn.c_attn.{weight,bias} cat(attention.self.query, .key, .value)     rows [q | k | v]
    h.{i}.attn.c_proj               attention.output.dense
    h.{i}.ln_1                      attention.output.LayerNorm
    h.{i}.mlp.c_fc                  intermediate.dense
    h.{i}.mlp.c_proj                output.dense
    h.{i}.ln_2                      output.LayerNorm
    mlm_head.dense / mlm_head.ln    cls.predictions.transform.dense / .LayerNorm             (masked-LM model)
    lm_head.weight / lm_head.bias   cls.predictions.decoder.weight (= wte when tied) / cls.predictions.decoder.bias
                                    (= cls.predictions.bias)                                 (masked-LM model)
    pooler.{weight,bias}            bert.pooler.dense.{weight,bias}                          (classifier, nsp)
    nsp_head.{weight,bias}          cls.seq_relationship.{weight,bias}   [2, D] / [2]         (nsp)
    classifier                      classifier                                               (classifier)
    h.{i}.mlp.router / .experts.*   (MoE blocks: models/moe.py's names; no Hugging Face counterpart)

(HF's `encoder.layer.{i}` prefix is `h.{i}` here; a bare BertModel has no `bert.` prefix.)

Which head the checkpoint gets:

    BertForMaskedLM                 masked-LM model (n_labels = 0): encoder + MLM head
    BertForPreTraining              the same with next-sentence prediction (model.nsp): pooler and NSP head kept
    BertForSequenceClassification   classifier (n_labels = num_labels): encoder + pooler + classifier, and
                                    labels.json {"labels": [...]} from config.json's id2label (index = class id)
    BertModel                       masked-LM model whose MLM head is freshly initialised (a BertModel has none)
                                    and whose pooler is dropped (both listed in source.json); hidden states exact

Refused: relative positions, a non-exact GELU, different hidden and attention dropout, decoder use
(is_decoder, cross-attention), a multi-label or regression classifier.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.config import ModelConfig
from ..core.errors import ChoicelmError
from .bert import BERT
from .hf_mapping import ConversionError, Converted, HFAdapter, check_shapes, require

BERT_MODEL, BERT_MLM, BERT_PRETRAINING, BERT_CLASSIFIER = (
    "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification")
ARCHITECTURES = (BERT_MODEL, BERT_MLM, BERT_PRETRAINING, BERT_CLASSIFIER)


# ----------------------------------------------------------------------------- config.json -> choicelm


def read_config(c: dict, arch: str) -> ModelConfig:
    """config_from_hf_bert, with the checks beyond it: no decoder use, and a classifier choicelm computes the
    same way (single-label softmax over >= 2 classes)."""
    require(c, arch, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
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
    return dataclasses.replace(config, nsp=True) if arch == BERT_PRETRAINING else config


def config_from_hf_bert(hf_config: dict, n_labels: int | None = None) -> ModelConfig:
    """The ModelConfig that computes what a Hugging Face BertModel / BertForMaskedLM /
    BertForSequenceClassification with this config.json computes. n_labels: None = num_labels for a
    BertForSequenceClassification config, else 0."""
    c = hf_config
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        raise ChoicelmError(f"BERT hidden_act={act!r} is not supported; choicelm's encoder uses the exact GELU (gelu)")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ChoicelmError(f"BERT position_embedding_type={c['position_embedding_type']!r} is not supported; "
                            "only absolute (learned) positions")
    if c.get("hidden_dropout_prob", 0.1) != c.get("attention_probs_dropout_prob", 0.1):
        raise ChoicelmError("BERT with different hidden and attention dropout is not supported; choicelm has one "
                            "model.dropout (set both to the same value)")
    if n_labels is None:
        archs = c.get("archs") or c.get("architectures") or []
        classify = any(a.endswith("ForSequenceClassification") for a in archs)
        n_labels = (c.get("num_labels") or len(c.get("id2label") or {}) or 2) if classify else 0
    return ModelConfig(kind="bert", vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 512),
                       n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
                       mlp_hidden=c["intermediate_size"], norm="layernorm", norm_eps=c.get("layer_norm_eps", 1e-12),
                       mlp="gelu", pos="learned", bias=True, tie_embeddings=c.get("tie_word_embeddings", True),
                       dropout=float(c.get("hidden_dropout_prob", 0.1)), type_vocab_size=c.get("type_vocab_size", 2),
                       n_labels=n_labels)


# ----------------------------------------------------------------------------- the name map

_HF_EMBEDDINGS = {"word_embeddings": "wte", "position_embeddings": "wpe", "token_type_embeddings": "wtt",
                  "LayerNorm": "ln"}
_HF_LAYER = {"attention.output.dense": "attn.c_proj", "attention.output.LayerNorm": "ln_1",
             "intermediate.dense": "mlp.c_fc", "output.dense": "mlp.c_proj", "output.LayerNorm": "ln_2"}
_HF_HEADS = {"pooler.dense": "pooler", "cls.predictions.transform.dense": "mlm_head.dense",
             "cls.predictions.transform.LayerNorm": "mlm_head.ln", "cls.predictions.decoder": "lm_head",
             "cls.seq_relationship": "nsp_head", "classifier": "classifier"}


def state_dict_from_hf_bert(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a Hugging Face BERT state dict into BERT's names, every head the source has
    included (a BertModel has a pooler and no MLM head, a BertForMaskedLM the MLM head and no pooler, a
    BertForPreTraining both and the next-sentence head); an unknown tensor is an error. Buffers (position_ids,
    token_type_ids) are skipped."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in hf_state.items():
        key = name.removeprefix("bert.")
        if key.endswith(("position_ids", "token_type_ids")):
            continue
        stem, _, leaf = key.rpartition(".")  # leaf: weight | bias (or the bare cls.predictions.bias)
        if key == "cls.predictions.bias":
            out.setdefault("lm_head.bias", tensor)  # the decoder's own bias, when also present, is the one used
        elif stem.startswith("embeddings.") and stem.split(".")[1] in _HF_EMBEDDINGS:
            out[f"embeddings.{_HF_EMBEDDINGS[stem.split('.')[1]]}.{leaf}"] = tensor
        elif stem.startswith("encoder.layer."):
            i, _, sub = stem.removeprefix("encoder.layer.").partition(".")
            if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault((int(i), leaf), {})[sub.rsplit(".", 1)[1]] = tensor
            elif sub in _HF_LAYER:
                out[f"h.{i}.{_HF_LAYER[sub]}.{leaf}"] = tensor
            else:
                raise ChoicelmError(f"unexpected BERT tensor {name}; it has no counterpart in choicelm's encoder")
        elif stem in _HF_HEADS:
            if stem == "cls.predictions.decoder" and config.tie_embeddings and leaf == "weight":
                continue  # the tied word embeddings
            out[f"{_HF_HEADS[stem]}.{leaf}"] = tensor
        else:
            raise ChoicelmError(f"unexpected BERT tensor {name}; it has no counterpart in choicelm's encoder")
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ChoicelmError(f"BERT layer {i} lacks attention {leaf} tensors ({', '.join(sorted(parts))} found)")
        out[f"h.{i}.attn.c_attn.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def load_hf_bert_state(model: BERT, hf_state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy a Hugging Face BERT state dict into `model`; the encoder must be complete. Returns (missing,
    ignored): the model's head tensors the source lacks (they keep their initialisation: a BertModel or
    BertForMaskedLM has no classifier) and the source's head tensors this model has no place for (a BertModel's
    pooler in a masked-LM model, an MLM head in a classifier, a BertForPreTraining's next-sentence head and pooler
    in a model without model.nsp)."""
    state = state_dict_from_hf_bert(hf_state, model.config)
    ours = model.state_dict()
    ignored = sorted(name for name in state if name not in ours and not name.startswith(("embeddings.", "h.")))
    for name in ignored:
        del state[name]
    for name, tensor in state.items():
        if name not in ours:
            raise ChoicelmError(f"Hugging Face tensor for {name} has no place in this model; build it with "
                                "config_from_hf_bert(config.json)")
        if ours[name].shape != tensor.shape:
            raise ChoicelmError(f"{name}: Hugging Face shape {tuple(tensor.shape)} != choicelm "
                                f"{tuple(ours[name].shape)}; build the model with config_from_hf_bert(config.json)")
    missing, _ = model.load_state_dict(state, strict=False)
    if model.config.tie_embeddings:  # loaded through wte
        missing = [m for m in missing if m != "lm_head.weight"]
    encoder_missing = [m for m in missing if m.startswith(("embeddings.", "h."))]
    if encoder_missing:
        raise ChoicelmError(f"the Hugging Face checkpoint lacks encoder tensors: {', '.join(encoder_missing[:5])}")
    return sorted(missing), ignored


# ----------------------------------------------------------------------------- tensors -> choicelm

_MLM_HEAD = ("mlm_head.", "lm_head.")
_NSP_HEAD = "cls.seq_relationship."
_HEAD_SOURCES = {"pooler": "pooler.", "mlm_head": "cls.predictions.", "lm_head": "cls.predictions.",
                 "classifier": "classifier.", "nsp_head": _NSP_HEAD}  # choicelm head -> HF name prefix (after "bert.")


def read_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Converted:
    """The name map above, run through a real model so that a head the source lacks (only a BertModel's MLM head
    may be) gets BERT's initialisation, the same for every conversion (seed 0)."""
    dropped = [] if config.nsp else sorted(n for n in hf_state if n.removeprefix("bert.").startswith(_NSP_HEAD))
    hf_state = {n: t for n, t in hf_state.items() if n not in dropped}  # a next-sentence head without a place
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BERT(config)
    what = f"the weights do not match config.json's {arch}"
    try:
        check_shapes(state_dict_from_hf_bert(hf_state, config), model.state_dict(), what)
        missing, ignored = load_hf_bert_state(model, hf_state)
    except ConversionError:
        raise
    except ChoicelmError as e:
        raise ConversionError(f"{what}: {e}") from None
    lacking = [m for m in missing if not (arch == BERT_MODEL and m.startswith(_MLM_HEAD))]
    if lacking:
        raise ConversionError(f"the weights have no tensor for {', '.join(lacking[:5])}, which a {arch} has; they "
                              f"do not match config.json")
    unused = tuple(_HEAD_SOURCES[name.split(".")[0]] for name in ignored)  # a head the model has no place for
    dropped += sorted(n for n in hf_state if unused and n.removeprefix("bert.").startswith(unused))
    return Converted(model.state_dict(), dropped=dropped, initialised=missing)


ADAPTER = HFAdapter(architectures=ARCHITECTURES, model_types={"bert": BERT_MODEL}, read_config=read_config,
                    read_state=read_state)
