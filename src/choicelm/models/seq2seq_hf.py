"""Seq2Seq's Hugging Face mapping: MarianMTModel -> choicelm's Seq2Seq with pos=sinusoidal, norm_placement=post
(models/seq2seq.py). Import only; interop/hf.py reads the files.

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

Marian's tokenizer is SentencePiece without tokenizer.json, which choicelm cannot read (the adapter says so:
tokenizer_json_only): a tokenizer.json folder whose ids match the model is passed instead. Refused: unscaled
embeddings, an activation other than the tanh GELU or swish, different encoder and decoder widths or heads.
"""

from __future__ import annotations

import torch

from ..core.config import ModelConfig
from .hf_mapping import GELU_TANH, SILU, ConversionError, Converted, HFAdapter, Tensors, require, tied_head
from .seq2seq import sinusoidal_table

MARIAN = "MarianMTModel"


def read_config(c: dict, arch: str) -> ModelConfig:
    """Marian's layout is choicelm's Seq2Seq with pos=sinusoidal, norm_placement=post. One n_head and one MLP
    width serve encoder and decoder; attention_dropout and activation_dropout are not kept (dropout is)."""
    require(c, arch, "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "encoder_ffn_dim")
    act = c.get("activation_function", "gelu")
    if act not in GELU_TANH + SILU:  # swish: the released opus-mt models
        raise ConversionError(f"Marian activation_function={act!r} is not supported; choicelm's encoder-decoder MLP "
                              f"computes the tanh GELU ({' or '.join(GELU_TANH)}) or swish/silu")
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
                       mlp="silu" if act in SILU else "gelu", pos="sinusoidal", norm_placement="post", bias=True,
                       tie_embeddings=c.get("tie_word_embeddings", True), dropout=float(c.get("dropout", 0.0)))


def read_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str = MARIAN) -> Converted:
    return Converted(state_dict_from_hf_marian(hf_state, config))


def state_dict_from_hf_marian(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face MarianMTModel state dict -> choicelm Seq2Seq names (see the table in the module
    docstring): every Seq2Seq tensor, lm_head.weight included (the decoder embedding when tied). Marian's fixed
    position tables and its final_logits_bias are checked (choicelm has no such tensors) and dropped; a tensor
    left over is an error."""
    hf = Tensors(hf_state, MARIAN)
    take = hf.take
    _check_marian_extras(hf.left, config)
    out = _marian_embeddings(hf, config)
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
    hf.check_all_taken()
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


def _marian_embeddings(hf: Tensors, config: ModelConfig) -> dict[str, torch.Tensor]:
    """decoder.wte (the shared embedding, or the decoder's own), encoder.wte for separate vocabularies, and
    lm_head.weight. Copies a checkpoint repeats (old files store every tied name) must be equal."""
    out: dict[str, torch.Tensor] = {}
    names = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
    if config.src_vocab_size:
        out["encoder.wte.weight"] = hf.take(names[1])
        out["decoder.wte.weight"] = hf.take(names[2])
    else:
        copies = {n: hf.left.pop(n) for n in names if n in hf.left}
        if not copies:
            raise ConversionError(f"the weights have no tensor {names[0]!r}; they do not match config.json's {MARIAN}")
        first, shared = next(iter(copies.items()))
        for name, t in copies.items():
            if not torch.equal(t, shared):
                raise ConversionError(f"share_encoder_decoder_embeddings=true but {name} differs from {first}; "
                                      f"choicelm's shared vocabulary has one embedding")
        out["decoder.wte.weight"] = shared
    head = hf.left.pop("lm_head.weight", None)
    if config.tie_embeddings and head is not None and not torch.equal(head, out["decoder.wte.weight"]):
        raise ConversionError("config.json says tie_word_embeddings=true but lm_head.weight differs from the "
                              "decoder embedding; set tie_word_embeddings=false to keep both")
    out["lm_head.weight"] = tied_head(out, head, "decoder.wte.weight", config)
    return out


ADAPTER = HFAdapter(architectures=(MARIAN,), model_types={"marian": MARIAN}, read_config=read_config,
                    read_state=read_state, tokenizer_json_only=True)
