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

The rotary tables are non-persistent buffers: they are not in the state dict.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import ChoicelmError
from .layers import (KVCache, ModelOutput, SelfAttention, cross_entropy, linear_cross_entropy, make_mlp,
                     make_norm, rope_cos_sin)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=True)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x_BTD, *, rope=None, kv=None, start_pos=0):
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), rope=rope, kv=kv, start_pos=start_pos)
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
        return x_BTD


class GPT(nn.Module):
    """Decoder-only LM. forward(idx_BT, targets_BT) -> ModelOutput(logits, loss, aux_loss, stats)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos == "rope":
            cos, sin = rope_cos_sin(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, zero biases, norms at 1,
        and the residual-stream output projections (attn.c_proj, mlp.c_proj / down_proj) at
        0.02 / sqrt(2 * n_layer). Deterministic given torch.manual_seed."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # the same tensor as wte
                std = residual_std if getattr(module, "is_residual_proj", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    # ------------------------------------------------------------------------- forward

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, start_pos: int = 0, loss_reduction: str = "mean",
                return_logits: bool = True) -> ModelOutput:
        """idx_BT: token ids at positions start_pos..start_pos+T-1.

        targets_BT:     next-token ids, already shifted (targets[:, t] is the token after idx[:, t]);
                        -100 = ignore. The loss is fp32 cross-entropy ("mean" over valid tokens, or "sum").
        kv_cache:       from new_kv_cache(); the new keys/values are written at start_pos.., and
                        attention runs over positions 0..start_pos+T-1.
        return_logits:  False skips the [B, T, V] logits; with targets, the loss is then computed in
                        row chunks (linear_cross_entropy), which is faster and holds no full logits.
        """
        B, T = idx_BT.shape
        end = start_pos + T
        if end > self.config.block_size:
            raise ChoicelmError(f"sequence length {end} (start_pos {start_pos} + {T} tokens) exceeds the model's "
                                f"block size {self.config.block_size}; shorten the input or crop it to the last "
                                f"{self.config.block_size} tokens")
        if kv_cache is not None:
            kv_cache.check(B, end)

        x_BTD = self.transformer.wte(idx_BT)
        rope = None
        if self.config.pos == "learned":
            pos_T = torch.arange(start_pos, end, dtype=torch.long, device=idx_BT.device)
            x_BTD = x_BTD + self.transformer.wpe(pos_T)
        else:
            rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        x_BTD = self.transformer.drop(x_BTD)
        for i, block in enumerate(self.transformer.h):
            kv = kv_cache.layer(i) if kv_cache is not None else None
            x_BTD = block(x_BTD, rope=rope, kv=kv, start_pos=start_pos)
        x_BTD = self.transformer.ln_f(x_BTD)

        logits = loss = None
        if return_logits:
            logits = self.lm_head(x_BTD)
            if targets_BT is not None:
                loss = cross_entropy(logits, targets_BT, loss_reduction)
        elif targets_BT is not None:
            loss = linear_cross_entropy(x_BTD.reshape(B * T, -1), self.lm_head.weight, targets_BT, loss_reduction)
        return ModelOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------------- utilities

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """A zeroed static cache for batch_size sequences of up to max_len (default block_size) positions,
        on the model's device, in the autocast dtype when called under autocast, else the parameter dtype."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ChoicelmError(f"KV cache length {max_len} exceeds the model's block size {self.config.block_size}")
        weight = self.transformer.wte.weight
        device = torch.device(device) if device is not None else weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
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
        (2 matmuls x 2 FLOPs x 3 for fwd+bwd over seq_len keys, not halved for causality)."""
        c = self.config
        seq_len = seq_len or c.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

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
