"""One decode step (one new token per row) of a dense GPT as a flat run of fused oneDNN kernels.

A decoded token costs one matrix-vector product per weight matrix, bound by memory bandwidth, plus a few
dozen small ops per layer whose cost is almost all Python and dispatch: module calls, views, dropout
no-ops, separate activation and residual-add kernels. On GPT-2 124M on this project's CPU the module
forward spends ~1.4 ms a token on them, ~10% of a bf16 token. This step does the same arithmetic without
them: no module calls but the norms, one view per projection, the MLP activation fused into the up
projection and the residual add into the output projections (oneDNN post-ops, computed in fp32 before
the one rounding to the output dtype, so bf16 logits differ from the module forward's by rounding;
fp32 ones agree to ~1e-6).

    step = decode_step(model)            # FusedStep when supported, else ModuleStep (model.forward)
    logits_BV = step(tok_B, cache, pos)  # + attention_mask_BS, position_ids_B for left-padded rows

FusedStep takes an eval-mode dense GPT on CPU whose linear layers are PackedLinear
(layout.prepare_for_decoding, done by choicelm.load), without forward hooks; anything else (MoE, LSTM,
LoRA-wrapped layers, a classifier, training mode) decodes through the module forward, same results.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.gpt import GPT, Block
from ..models.layers import MLP, SelfAttention, SwiGLU, apply_rope
from .weight_layout import PackedLinear

_linear = torch.ops.mkldnn._linear_pointwise
_linear_binary = torch.ops.mkldnn._linear_pointwise.binary
_ACTIVATION = {"gelu": ("gelu", "tanh"), "silu": ("swish", "")}  # model.mlp -> oneDNN post-op (tanh GELU)


class ModuleStep:
    """A decode step through the model's forward: any choicelm decoder."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, tok_B, cache, start_pos: int, attention_mask_BS=None, position_ids_B=None):
        kwargs = {}
        if attention_mask_BS is not None:
            kwargs = dict(attention_mask_BS=attention_mask_BS, position_ids_BT=position_ids_B[:, None])
        return self.model(tok_B[:, None], kv_cache=cache, start_pos=start_pos, **kwargs).logits[:, -1]


def _packed(linear: PackedLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.packed_weight(), linear.bias


class FusedStep:
    """A decode step of a dense GPT as fused kernels (see the module docstring). Build one per generation
    call: it holds the packed weights of that moment."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if type(model) is not GPT or model.training or model.classifier is not None:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False
        if not all(type(b) is Block and type(b.attn) is SelfAttention and type(b.mlp) in (MLP, SwiGLU)
                   for b in model.transformer.h):
            return False
        dtype = model.transformer.wte.weight.dtype  # the fused kernels take one dtype throughout
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return dtype in (torch.float32, torch.bfloat16) and all(
            type(m) is PackedLinear and m.weight.device.type == "cpu" and m.weight.dtype == dtype for m in linears)

    def __init__(self, model: GPT):
        config = model.config
        self.model = model
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dtype = model.transformer.wte.weight.dtype
        self.layers = []
        for block in model.transformer.h:
            mlp = block.mlp
            if type(mlp) is SwiGLU:
                ffn = (_packed(mlp.gate_proj), _packed(mlp.up_proj), _packed(mlp.down_proj))
            else:
                ffn = (_packed(mlp.c_fc), _packed(mlp.c_proj))
            qk_norm = (block.attn.q_norm, block.attn.k_norm) if block.attn.q_norm is not None else None
            self.layers.append((block.ln_1, _packed(block.attn.c_attn), qk_norm, _packed(block.attn.c_proj),
                                block.ln_2, ffn))
        self.activation = _ACTIVATION["silu" if config.mlp == "silu" else "gelu"]
        self.head = _packed(model.lm_head)

    @torch.no_grad()
    def __call__(self, tok_B, cache, start_pos: int, attention_mask_BS=None, position_ids_B=None):
        model, H, K, Q = self.model, self.n_head, self.n_kv_head, self.head_dim
        B, end = tok_B.shape[0], start_pos + 1
        cache.check(B, end)
        pos = position_ids_B if position_ids_B is not None else start_pos  # per row, or one for all
        x_BD = model.transformer.wte(tok_B)
        rope = None
        if model.config.pos == "learned":
            x_BD = x_BD + model.transformer.wpe.weight[pos]
        else:  # [Q] or per row [B, 1, 1, Q], broadcast over heads
            rope = (model.rope_cos[pos], model.rope_sin[pos])
            if position_ids_B is not None:
                rope = (rope[0][:, None, None], rope[1][:, None, None])
        mask_B11S = None if attention_mask_BS is None else attention_mask_BS.to(torch.bool)[:, None, None, :]

        for i, (ln_1, (w_qkv, b_qkv), qk_norm, (w_o, b_o), ln_2, ffn) in enumerate(self.layers):
            qkv = _linear(ln_1(x_BD), w_qkv, b_qkv, "none", [], "").view(B, H + 2 * K, 1, Q)
            q_BH1Q, k_BK1Q, v_BK1Q = qkv.split((H, K, K), dim=1)
            if qk_norm is not None:  # model.qk_norm: per-head RMSNorm of queries and keys, before rotary positions
                q_BH1Q, k_BK1Q = qk_norm[0](q_BH1Q), qk_norm[1](k_BK1Q)
            if rope is not None:
                q_BH1Q, k_BK1Q = apply_rope(q_BH1Q, *rope), apply_rope(k_BK1Q, *rope)
            k_cache, v_cache = cache.layer(i)
            k_cache[:, :, start_pos:end] = k_BK1Q
            v_cache[:, :, start_pos:end] = v_BK1Q
            y_BH1Q = F.scaled_dot_product_attention(q_BH1Q.to(k_cache.dtype), k_cache[:, :, :end],
                                                    v_cache[:, :, :end], attn_mask=mask_B11S, enable_gqa=K != H)
            x_BD = _linear_binary(y_BH1Q.to(self.dtype).view(B, H * Q), x_BD, w_o, b_o, "add")
            h_BD = ln_2(x_BD)
            if len(ffn) == 3:  # SwiGLU: down(silu(gate(h)) * up(h))
                (w_gate, b_gate), (w_up, b_up), (w_down, b_down) = ffn
                gate_BF = _linear(h_BD, w_gate, b_gate, "swish", [], "")
                x_BD = _linear_binary(_linear_binary(h_BD, gate_BF, w_up, b_up, "mul"), x_BD, w_down, b_down, "add")
            else:
                (w_fc, b_fc), (w_proj, b_proj) = ffn
                x_BD = _linear_binary(_linear(h_BD, w_fc, b_fc, self.activation[0], [], self.activation[1]),
                                      x_BD, w_proj, b_proj, "add")
        w_head, b_head = self.head
        return _linear(model.transformer.ln_f(x_BD), w_head, b_head, "none", [], "")


def decode_step(model: nn.Module) -> FusedStep | ModuleStep:
    """The fastest exact decode step for this model: FusedStep when it supports the model, else ModuleStep."""
    return FusedStep(model) if FusedStep.supports(model) else ModuleStep(model)
