"""GPT's Hugging Face mapping: GPT-2, Llama and Mixtral, both ways (interop/hf.py reads and writes the files).

    GPT2LMHeadModel, LlamaForCausalLM          <-> choicelm's GPT           (from_hf and to_hf)
    MixtralForCausalLM                         <-> choicelm's GPT with a token-choice MoE in every block

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

Refused with a message naming the field: rope scaling, a non-tanh GELU, GPT-2 without biases, learned positions
with RMSNorm, MoE other than Mixtral's (expert choice, every > 1, a shared expert, GELU experts), Mixtral with
biases, a classifier or qk_norm on export.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError
from .hf_mapping import GELU_TANH, ConversionError, Converted, HFAdapter, Tensors, require, tied_head

GPT2, LLAMA, MIXTRAL = "GPT2LMHeadModel", "LlamaForCausalLM", "MixtralForCausalLM"
_DEFAULT_ROPE_THETA = {LLAMA: 10000.0, MIXTRAL: 1e6}  # transformers' defaults when config.json names none
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ----------------------------------------------------------------------------- config.json -> choicelm


def read_config(c: dict, arch: str) -> ModelConfig:
    return {GPT2: _gpt2_config, LLAMA: _llama_config, MIXTRAL: _mixtral_config}[arch](c, arch)


def _gpt2_config(c: dict, arch: str) -> ModelConfig:
    require(c, arch, "vocab_size", "n_layer", "n_head", "n_embd")
    act = c.get("activation_function", "gelu_new")
    if act not in GELU_TANH:
        raise ConversionError(f"GPT-2 activation_function={act!r} is not supported; choicelm's GPT-2 MLP is the "
                              f"tanh GELU ({' or '.join(GELU_TANH)})")
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
    require(c, arch, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
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
    """Llama's layout without biases (the moe section comes from read_moe). A sliding window below
    max_position_embeddings becomes the block size: within it the window masks nothing, so choicelm is exact
    for every input it accepts."""
    require(c, arch, "num_local_experts", "num_experts_per_tok")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConversionError(f"Mixtral with {key}=true is not supported; Mixtral's attention and experts have "
                                  f"no biases (transformers ignores the setting, so the weights cannot be trusted)")
    config = _llama_config(c, arch)
    window = c.get("sliding_window")
    if window is not None and window < config.block_size:
        config = dataclasses.replace(config, block_size=window)
    return config


def read_moe(c: dict, arch: str) -> MoEConfig | None:
    """The choicelm moe section that routes as the Hugging Face model does (Mixtral: token choice, top-k
    renormalised, dropless, every block), or None for a dense architecture."""
    if arch != MIXTRAL:
        return None
    require(c, MIXTRAL, "num_local_experts", "num_experts_per_tok", "intermediate_size", "num_hidden_layers")
    top_k, n_layer = c["num_experts_per_tok"], c["num_hidden_layers"]
    try:
        return MoEConfig(experts=c["num_local_experts"], every=1, expert_width=c["intermediate_size"],
                         router="token_choice", top_k=top_k, renormalize=True, dropless=True,
                         balance_loss_weight=float(c.get("router_aux_loss_coef", 0.001)) * top_k / n_layer,
                         z_loss_weight=0.0)
    except ChoicelmError as e:  # MoEConfig's own checks (top_k > experts, experts = 1)
        raise ConversionError(f"{MIXTRAL} config.json cannot be converted: {e}") from None


def notes(c: dict, arch: str, config: ModelConfig) -> list[str]:
    """What a conversion changed without changing the model's outputs, for source.json and the log."""
    if arch != MIXTRAL:
        return []
    out = []
    window, positions = c.get("sliding_window"), c.get("max_position_embeddings")
    if window is not None and config.block_size == window and (positions is None or window < positions):
        out.append(f"block_size is sliding_window={window}, not max_position_embeddings={positions}: within "
                   f"{window} positions the sliding window masks nothing (exact); longer inputs are refused")
    jitter = c.get("router_jitter_noise") or 0.0
    if jitter > 0:
        out.append(f"router_jitter_noise={jitter} is not kept: transformers applies it only in training; "
                   f"choicelm routes (and fine-tunes) without noise")
    return out


# ----------------------------------------------------------------------------- tensors -> choicelm


def read_state(hf_state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> Converted:
    """HF tensors -> choicelm names and layouts: every choicelm tensor (tied ones under both names)."""
    hf = Tensors(hf_state, arch)
    take = hf.take
    out: dict[str, torch.Tensor] = {}
    if arch == GPT2:
        left = hf.left
        for name in list(left):
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                del left[name]  # causal-mask buffers
            elif not name.startswith(("transformer.", "lm_head.")):
                left["transformer." + name] = left.pop(name)  # saved from GPT2Model (the Hub's gpt2)
        for name in list(left):
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
                out.update(_mixtral_experts_from_hf(hf, p, q + "mlp."))
            hf.left.pop(p + "self_attn.rotary_emb.inv_freq", None)  # a buffer in old checkpoints

    out["lm_head.weight"] = tied_head(out, hf.left.pop("lm_head.weight", None), "transformer.wte.weight", config)
    hf.check_all_taken()
    return Converted(out)


def _mixtral_experts_from_hf(hf: Tensors, p: str, q: str) -> dict[str, torch.Tensor]:
    """One Mixtral layer's router and experts (prefix p) as choicelm's MoE tensors (prefix q), from the Hub's
    per-expert layout (block_sparse_moe.experts.e.w1/w2/w3) or transformers 5.x's stacked one (mlp.experts.*)."""
    take = hf.take
    if p + "mlp.experts.gate_up_proj" in hf.left:  # stacked: [E, 2F, D] rows [gate | up], and [E, D, F]
        return {q + "router.weight": take(p + "mlp.gate.weight"),
                q + "experts.w_in": take(p + "mlp.experts.gate_up_proj").transpose(1, 2).contiguous(),
                q + "experts.w_out": take(p + "mlp.experts.down_proj").transpose(1, 2).contiguous()}
    router_ED = take(p + "block_sparse_moe.gate.weight")
    experts = [f"{p}block_sparse_moe.experts.{e}." for e in range(router_ED.shape[0])]
    w_in_EDF2 = torch.stack([torch.cat([take(x + "w1.weight").t(), take(x + "w3.weight").t()], dim=1)
                             for x in experts])  # w1 = gate, w3 = up: [gate | up] as in models/moe.py
    w_out_EFD = torch.stack([take(x + "w2.weight").t() for x in experts])
    return {q + "router.weight": router_ED, q + "experts.w_in": w_in_EDF2, q + "experts.w_out": w_out_EFD}


# ----------------------------------------------------------------------------- choicelm -> Hugging Face


def export_architecture(config: ModelConfig, moe: MoEConfig | None = None) -> str:
    """The Hugging Face class that computes what this GPT computes (moe: the run's moe section), or a
    ConversionError naming what differs."""
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


def write_config(config: ModelConfig, arch: str, moe: MoEConfig | None = None) -> dict:
    """config.json's keys for `arch` (interop/hf.py adds the keys every architecture has)."""
    if arch == GPT2:
        return {"model_type": "gpt2", "n_positions": config.block_size, "n_embd": config.n_embd,
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
        return {**attention, "model_type": "llama", "intermediate_size": config.hidden_size,
                "attention_bias": config.bias, "mlp_bias": config.bias, "pretraining_tp": 1}
    return {**attention, "model_type": "mixtral", "intermediate_size": moe.expert_width or config.hidden_size,
            "num_local_experts": moe.experts, "num_experts_per_tok": moe.top_k, "sliding_window": None,
            "router_aux_loss_coef": moe.balance_loss_weight * config.n_layer / moe.top_k,  # see the module docstring
            "router_jitter_noise": 0.0, "output_router_logits": False}


def write_state(state: dict[str, torch.Tensor], config: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
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


ADAPTER = HFAdapter(
    architectures=(GPT2, LLAMA, MIXTRAL), model_types={"gpt2": GPT2, "llama": LLAMA, "mixtral": MIXTRAL},
    read_config=read_config, read_state=read_state, read_moe=read_moe, notes=notes, moe_architectures=(MIXTRAL,),
    exports=(GPT2, LLAMA, MIXTRAL),
    export_summary=f"dense to {GPT2} or {LLAMA}, Mixture-of-Experts to {MIXTRAL}",
    export_architecture=export_architecture, write_config=write_config, write_state=write_state)
