"""Decoder-only transformer language model: GPT-2 by default, Llama-style by config.

    config                      GPT-2 (default)     Llama-style
    norm                        layernorm           rmsnorm
    mlp                         gelu (tanh)         swiglu
    pos                         learned (wpe)       rope
    bias                        true                false
    n_kv_head                   0 (= n_head)        < n_head (grouped-query attention)
    tie_embeddings              true                either

Parameter names follow Hugging Face GPT-2, so its checkpoints load by renaming nothing and
transposing the Conv1D weights (c_attn, c_proj, c_fc):

    transformer.wte.weight              [V, D]          Llama: model.embed_tokens
    transformer.wpe.weight              [block_size, D] (learned positions only)
    transformer.h.{i}.ln_1.{weight,bias}                Llama: input_layernorm
    transformer.h.{i}.attn.c_attn.{weight,bias}  [(H+2K)*Q, D], rows [q | k | v]
                                                        Llama: cat(q_proj, k_proj, v_proj)
    transformer.h.{i}.attn.c_proj.{weight,bias}         Llama: o_proj
    transformer.h.{i}.ln_2.{weight,bias}                Llama: post_attention_layernorm
    transformer.h.{i}.mlp.c_fc / mlp.c_proj             (gelu)
    transformer.h.{i}.mlp.gate_proj / up_proj / down_proj   (swiglu; same names as Llama)
    transformer.ln_f.{weight,bias}                      Llama: model.norm
    lm_head.weight                      [V, D]          (the same tensor as wte when tied)
    classifier.{weight,bias}            [L, D]          (model.n_labels > 0: sequence classification)

With model.n_labels = L > 0 the model classifies sequences: the final hidden state of each row's last
real token (last-token pooling, as GPT-2 for sequence classification in transformers) goes through
`classifier`, and forward returns class logits [B, L] (the loss against labels_B).

The rotary tables are non-persistent buffers: they are not in the state dict.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError
from .layers import (KVCache, ModelOutput, SelfAttention, cross_entropy, decoder_attention_mask, kv_cache_dtype,
                     linear_cross_entropy, make_mlp, make_norm, rope_cos_sin)
from .init import init_weights
from .moe import CAUSAL_RULES, MoE, RoutedModel


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=True)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x_BTD, *, rope=None, kv=None, start_pos=0, attn_mask=None):
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), rope=rope, kv=kv, start_pos=start_pos, attn_mask=attn_mask)
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
        return x_BTD


class MoEBlock(Block):
    """A block whose MLP is a Mixture-of-Experts layer (self.mlp is the MoE). forward also takes the routing
    rule and the padding mask, and puts the layer's MoEOutput (aux loss, stats) into `outputs[layer]`."""

    def __init__(self, config: ModelConfig, moe: MoEConfig, layer: int):
        super().__init__(config)
        self.mlp = MoE(config, moe)
        self.layer = layer

    def forward(self, x_BTD, *, valid_BT=None, rule=None, record=False, outputs=None, **attn_kwargs):
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), **attn_kwargs)
        out = self.mlp(self.ln_2(x_BTD), valid_BT=valid_BT, rule=rule, record=record)
        if outputs is not None:
            outputs[self.layer] = out
        return x_BTD + out.y_BTD


def last_real_position(attention_mask_BS: torch.Tensor | None, T: int) -> torch.Tensor | int:
    """Index of each row's last real token (mask 1) in the last T positions: T-1 without a mask or with left
    padding, before the padding with right padding."""
    if attention_mask_BS is None:
        return T - 1
    mask_BT = attention_mask_BS[:, -T:].to(torch.bool)
    return T - 1 - mask_BT.flip(1).to(torch.int8).argmax(1)


class GPT(RoutedModel, nn.Module):
    """Decoder-only LM. forward(idx_BT, targets_BT) -> ModelOutput(logits, loss, aux_loss, stats).

    With moe (a MoEConfig with experts > 0), every moe.every-th block's MLP is an MoE layer. `routing`
    picks the rule those layers use (None = the router's default: its training rule in train mode,
    its causal rule in eval mode); set it with set_routing(). Decoding with a KV cache needs a causal rule.
    """

    def __init__(self, config: ModelConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.config = config
        moe_layers = self._init_routing(config, moe)
        if self.moe_config:
            if moe.router == "expert_choice" and not moe.allow_noncausal_training:
                raise ChoicelmError("moe.router=expert_choice is not causal: each expert's top-k over the sequence "
                                    "lets later tokens decide how earlier tokens are routed, so a decoder can learn to "
                                    "read the future. Use moe.router=expert_choice_causal, or set "
                                    "moe.allow_noncausal_training=true to train it anyway (evaluation and generation "
                                    "then route with its causal thresholds)")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([MoEBlock(config, moe, i) if i in moe_layers else Block(config)
                             for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.classifier = nn.Linear(config.n_embd, config.n_labels) if config.n_labels else None
        if config.pos == "rope":
            cos, sin = rope_cos_sin(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, zero biases, norms at 1,
        and the residual-stream output projections (attn.c_proj, mlp.c_proj / down_proj) at
        0.02 / sqrt(2 * n_layer). Deterministic given torch.manual_seed."""
        init_weights(self, 0.02 / math.sqrt(2 * self.config.n_layer),
                     tied_head=self.lm_head if self.config.tie_embeddings else None)

    # ------------------------------------------------------------------------- forward

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, start_pos: int = 0, loss_reduction: str = "mean",
                return_logits: bool = True, attention_mask_BS: torch.Tensor | None = None,
                position_ids_BT: torch.Tensor | None = None, logits_to_keep: int = 0,
                labels_B: torch.Tensor | None = None) -> ModelOutput:
        """idx_BT: token ids at positions start_pos..start_pos+T-1.

        targets_BT:     next-token ids, already shifted (targets[:, t] is the token after idx[:, t]);
                        -100 = ignore. The loss is fp32 cross-entropy ("mean" over valid tokens, or "sum").
        kv_cache:       from new_kv_cache(); the new keys/values are written at start_pos.., and
                        attention runs over positions 0..start_pos+T-1.
        return_logits:  False skips the [B, T, V] logits; with targets, the loss is then computed in
                        row chunks (linear_cross_entropy), which is faster and holds no full logits.
        attention_mask_BS: bool/int [B, start_pos+T] over every position so far, 1 = real token, 0 = padding
                        (left padding in batched generation); padding is never attended to.
        position_ids_BT: the positions of the new tokens per row (default start_pos..end-1); a left-padded
                        row counts from 0 at its first real token, as Hugging Face does.
        logits_to_keep: > 0 computes logits for the last logits_to_keep positions only (a prefill needs
                        one row of [V], not T of them).
        labels_B:       class ids of a classifier (model.n_labels > 0; -100 = ignore). A classifier returns
                        logits [B, n_labels] of each row's last real token (per attention_mask_BS).
        """
        if (labels_B is not None or targets_BT is not None) and (self.classifier is None) == (labels_B is not None):
            raise ChoicelmError("labels_B needs a classifier (model.n_labels > 0, or add_classifier(N)) and a "
                                "classifier takes labels_B, not next-token targets")
        B, T = idx_BT.shape
        end = start_pos + T
        if end > self.config.block_size:
            raise ChoicelmError(f"sequence length {end} (start_pos {start_pos} + {T} tokens) exceeds the model's "
                                f"block size {self.config.block_size}; shorten the input or crop it to the last "
                                f"{self.config.block_size} tokens")
        if kv_cache is not None:
            kv_cache.check(B, end)

        x_BTD, rope = self.embed(idx_BT, start_pos, position_ids_BT)
        x_BTD = self.transformer.drop(x_BTD)
        attn_mask = None if attention_mask_BS is None else decoder_attention_mask(attention_mask_BS, start_pos, end)
        moe_outs: dict = {}  # layer -> MoEOutput: aux losses and routing stats travel in the output
        moe_kw = {}
        if self.moe_config is not None:
            moe_kw = dict(rule=self._routing_rule(decoding=kv_cache is not None), record=self.record_routing,
                          outputs=moe_outs, valid_BT=None if attention_mask_BS is None else
                          attention_mask_BS[:, start_pos:end].to(torch.bool))  # padding is never routed
        for i, block in enumerate(self.transformer.h):
            kv = kv_cache.layer(i) if kv_cache is not None else None
            x_BTD = block(x_BTD, rope=rope, kv=kv, start_pos=start_pos, attn_mask=attn_mask,
                          **(moe_kw if isinstance(block, MoEBlock) else {}))
        x_BTD = self.transformer.ln_f(x_BTD)

        logits = loss = None
        if self.classifier is not None:
            logits = self.classifier(x_BTD[torch.arange(B, device=x_BTD.device), last_real_position(attention_mask_BS, T)])
            loss = None if labels_B is None else cross_entropy(logits, labels_B, loss_reduction)
        elif return_logits:
            logits = self.lm_head(x_BTD[:, -logits_to_keep:] if logits_to_keep else x_BTD)
            if targets_BT is not None:
                loss = cross_entropy(logits, targets_BT, loss_reduction)
        elif targets_BT is not None:
            loss = linear_cross_entropy(x_BTD.reshape(B * T, -1), self.lm_head.weight, targets_BT, loss_reduction)
        return ModelOutput(logits=logits, loss=loss, **self.moe_output_fields(moe_outs))

    def embed(self, idx_BT: torch.Tensor, start_pos: int = 0, position_ids_BT: torch.Tensor | None = None):
        """Token embeddings [B, T, D] (+ learned positions) and the rotary tables of the positions (rope layout;
        else None): (cos, sin) [T, Q], or per row [B, 1, T, Q] given position_ids_BT, broadcast over heads."""
        x_BTD = self.transformer.wte(idx_BT)
        rope = None
        if self.config.pos == "learned":
            pos = position_ids_BT if position_ids_BT is not None else \
                torch.arange(start_pos, start_pos + idx_BT.shape[1], dtype=torch.long, device=idx_BT.device)
            x_BTD = x_BTD + self.transformer.wpe(pos)
        elif position_ids_BT is not None:
            rope = (self.rope_cos[position_ids_BT][:, None], self.rope_sin[position_ids_BT][:, None])
        else:
            rope = (self.rope_cos[start_pos:start_pos + idx_BT.shape[1]],
                    self.rope_sin[start_pos:start_pos + idx_BT.shape[1]])
        return x_BTD, rope

    def fast_decode_step(self):
        """The fused decode step of this model (models/gpt_decode.py: one token per row as a flat run of oneDNN
        kernels, the module forward's logits), or None when it does not compute this model exactly (its rule:
        FusedStep.supports); generation then decodes through forward. Build one per generation call."""
        from .gpt_decode import FusedStep

        if type(self).forward is not GPT.forward:  # a subclass with its own forward: the step mirrors this one
            return None
        return FusedStep(self) if FusedStep.supports(self) else None

    def add_classifier(self, n_labels: int) -> "GPT":
        """Turn a (pretrained) language model into a classifier of n_labels classes for fine-tuning: a fresh
        `classifier` head (N(0, 0.02) weights, zero bias, on the model's device and dtype); forward then
        classifies. Load the pretrained weights first, then call this. Returns self."""
        if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 2:
            raise ChoicelmError(f"n_labels={n_labels!r}: a classifier needs at least 2 classes")
        if self.classifier is not None:
            raise ChoicelmError(f"this model already has a {self.config.n_labels}-class head; build a new model "
                                "from the language-model checkpoint to change the number of classes")
        w = self.transformer.wte.weight
        self.classifier = nn.Linear(self.config.n_embd, n_labels).to(device=w.device, dtype=w.dtype)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.config = dataclasses.replace(self.config, n_labels=n_labels)
        return self

    # ------------------------------------------------------------------------- MoE routing

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.transformer.h if isinstance(block, MoEBlock)]

    def default_rule(self, layer: MoE) -> str:
        """The training rule in train mode, the causal rule generation uses in eval mode."""
        return layer.train_rule if self.training else layer.eval_rule

    def _routing_rule(self, decoding: bool) -> str | None:
        if decoding:
            layer, rule = self.moe_layers()[0], self.current_routing()
            if rule not in CAUSAL_RULES:
                raise ChoicelmError(f"routing {rule!r} is not causal, so it cannot decode token by token with a KV "
                                    f"cache; use a causal rule ({', '.join(r for r in layer.rules if r in CAUSAL_RULES)}) "
                                    "via model.set_routing(...), or model.eval() for the default causal rule")
        return self.routing

    # ------------------------------------------------------------------------- utilities

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """A zeroed static cache for batch_size sequences of up to max_len (default block_size) positions,
        on the model's device, for the autocast dtype when called under autocast, else the parameter dtype
        (layers.kv_cache_dtype: fp32 on CPU for bf16/fp16)."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ChoicelmError(f"KV cache length {max_len} exceeds the model's block size {self.config.block_size}")
        weight = self.transformer.wte.weight
        device = torch.device(device) if device is not None else weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = kv_cache_dtype(device, torch.get_autocast_dtype(device.type) if autocast else weight.dtype)
        return KVCache(self.config.n_layer, batch_size, self.config.kv_heads, max_len, self.config.head_dim,
                       device=device, dtype=dtype)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Number of (unique) parameters. exclude_embeddings drops the input lookup tables — wpe, and
        wte unless it is tied to lm_head (then it is the output projection, which does compute) —
        leaving the parameters that take part in matmuls (the N of 6N)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:
        6 * N + 12 * n_layer * n_head * head_dim * seq_len, with N = num_params(exclude_embeddings=True)
        (matmul weights incl. lm_head); the second term is the attention scores and weighted sum
        (2 matmuls x 2 FLOPs x 3 for fwd+bwd over seq_len keys, not halved for causality). MoE layers count
        only the expert parameters a token uses on average (c or top_k of E experts); the router is ignored."""
        c = self.config
        seq_len = seq_len or c.block_size
        n_active = self.num_params(exclude_embeddings=True) - sum(m.inactive_params() for m in self.moe_layers())
        return 6 * n_active + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    @torch.no_grad()
    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length (e.g. to fine-tune a pretrained model on shorter sequences)."""
        if not 0 < block_size <= self.config.block_size:
            raise ChoicelmError(f"crop_block_size({block_size}): must be in 1..{self.config.block_size}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].clone())
            self.transformer.wpe.num_embeddings = block_size
        if self.config.pos == "rope":
            self.rope_cos = self.rope_cos[:block_size].clone()
            self.rope_sin = self.rope_sin[:block_size].clone()
