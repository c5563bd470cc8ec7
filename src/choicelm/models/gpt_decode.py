"""GPT's fast decode step: one new token per row of a dense GPT as a flat run of fused oneDNN kernels.

A decoded token costs one matrix-vector product per weight matrix, bound by memory bandwidth, plus a few
dozen small ops per layer whose cost is almost all Python and dispatch: module calls, views, dropout
no-ops, separate activation and residual-add kernels. On GPT-2 124M on this project's CPU the module
forward spends ~1.4 ms a token on them, ~10% of a bf16 token. This step does the same arithmetic without
most of them: the MLP activation fused into the up projection and the residual add into the output
projections (oneDNN post-ops, computed in fp32 before the one rounding to the output dtype, so bf16 logits
differ from the module forward's by rounding; fp32 ones agree to ~1e-6).

It mirrors GPT.forward (models/gpt.py) and shares every piece it does not fuse with it: the embedding and
rotary tables (GPT.embed), the attention mask rule (layers.decoder_attention_mask), the norms (the model's
own modules), query/key norms and rotary positions (SelfAttention.rotate), the cache write and attention
(SelfAttention.attend), and the MLP activations (layers.ACTIVATIONS: the torch function and its oneDNN
post-op side by side). What it implements is a rule on the model's config (IMPLEMENTED, FusedStep.supports);
any other model decodes through the module forward, with the same results:

    step = model.fast_decode_step()      # a FusedStep, or None (then decode with model.forward)
    logits_BV = step(tok_B, cache, pos)  # + attention_mask_BS, position_ids_B for left-padded rows

It takes an eval-mode dense GPT on CPU whose linear layers are PackedLinear (models/weight_layout.py
prepare_for_decoding, done by choicelm.load), in fp32 or bf16, without forward hooks or a classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layers import ACTIVATIONS, decoder_attention_mask, mlp_activation
from .weight_layout import PackedLinear

_linear = torch.ops.mkldnn._linear_pointwise
_linear_binary = torch.ops.mkldnn._linear_pointwise.binary

# The config values this step computes, per layout key. A model whose config holds any other value (a new norm,
# MLP kind or position scheme) decodes through the module forward. bias, n_kv_head (grouped-query attention)
# and tie_embeddings need nothing of their own here: any value is computed.
IMPLEMENTED = {
    "norm": ("layernorm", "rmsnorm"),   # the model's own norm modules run
    "mlp": ("gelu", "silu", "swiglu"),  # non-gated c_proj(act(c_fc)), or SwiGLU; act's oneDNN post-op is fused
    "pos": ("learned", "rope"),
    "qk_norm": (False, True),
}
FUSED_DTYPES = (torch.float32, torch.bfloat16)  # the oneDNN post-ops take one of these throughout


def _packed(linear: PackedLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.packed_weight(), linear.bias


class FusedStep:
    """A decode step of a dense GPT as fused kernels (see the module docstring). Build one per generation
    call: it holds the packed weights of that moment."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True when this step computes `model`'s decode exactly: its layout is IMPLEMENTED and it is a dense
        GPT language model (no MoE layer, no classifier) in eval mode, without forward hooks, whose every linear
        is a PackedLinear on CPU in one of FUSED_DTYPES."""
        config = getattr(model, "config", None)
        if getattr(config, "kind", None) != "gpt" or model.training:
            return False
        if any(getattr(config, key) not in values for key, values in IMPLEMENTED.items()):
            return False
        if config.mlp != "swiglu" and ACTIVATIONS[mlp_activation(config.mlp)].onednn is None:
            return False
        if model.moe_config is not None or model.moe_layers() or model.classifier is not None:
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False
        dtype = model.transformer.wte.weight.dtype
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        return dtype in FUSED_DTYPES and all(
            type(m) is PackedLinear and m.weight.device.type == "cpu" and m.weight.dtype == dtype for m in linears)

    def __init__(self, model: nn.Module):
        config = model.config
        self.model = model
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dtype = model.transformer.wte.weight.dtype
        self.gated = config.mlp == "swiglu"
        self.activation = ACTIVATIONS[mlp_activation(config.mlp)].onednn  # (oneDNN post-op, its algorithm)
        self.layers = []
        for block in model.transformer.h:
            mlp = block.mlp
            if self.gated:
                ffn = (_packed(mlp.gate_proj), _packed(mlp.up_proj), _packed(mlp.down_proj))
            else:
                ffn = (_packed(mlp.c_fc), _packed(mlp.c_proj))
            self.layers.append((block.ln_1, block.attn, _packed(block.attn.c_attn), _packed(block.attn.c_proj),
                                block.ln_2, ffn))
        self.head = _packed(model.lm_head)

    @torch.no_grad()
    def __call__(self, tok_B, cache, start_pos: int, attention_mask_BS=None, position_ids_B=None):
        """Logits [B, V] of one new token per row at position start_pos (per row position_ids_B and the padding
        mask attention_mask_BS [B, start_pos + 1] for left-padded rows), written into the KV cache."""
        model, H, K, Q = self.model, self.n_head, self.n_kv_head, self.head_dim
        B, end = tok_B.shape[0], start_pos + 1
        cache.check(B, end)
        x_B1D, rope = model.embed(tok_B[:, None], start_pos, None if position_ids_B is None else position_ids_B[:, None])
        x_BD = x_B1D.view(B, -1)
        mask = None if attention_mask_BS is None else decoder_attention_mask(attention_mask_BS, start_pos, end)
        act, algorithm = self.activation

        for i, (ln_1, attn, (w_qkv, b_qkv), (w_o, b_o), ln_2, ffn) in enumerate(self.layers):
            # x + c_proj(attention(ln_1(x))), the residual add fused into c_proj
            qkv = _linear(ln_1(x_BD), w_qkv, b_qkv, "none", [], "").view(B, H + 2 * K, 1, Q)
            q_BH1Q, k_BK1Q, v_BK1Q = qkv.split((H, K, K), dim=1)
            q_BH1Q, k_BK1Q = attn.rotate(q_BH1Q, k_BK1Q, rope)
            y_B1D = attn.attend(q_BH1Q, k_BK1Q, v_BK1Q, kv=cache.layer(i), start_pos=start_pos, attn_mask=mask)
            x_BD = _linear_binary(y_B1D.view(B, H * Q), x_BD, w_o, b_o, "add")
            # x + mlp(ln_2(x)), the activation fused into the up projection and the residual add into the down one
            h_BD = ln_2(x_BD)
            if self.gated:  # SwiGLU: down(silu(gate(h)) * up(h))
                (w_gate, b_gate), (w_up, b_up), (w_down, b_down) = ffn
                gate_BF = _linear(h_BD, w_gate, b_gate, act, [], algorithm)
                x_BD = _linear_binary(_linear_binary(h_BD, gate_BF, w_up, b_up, "mul"), x_BD, w_down, b_down, "add")
            else:
                (w_fc, b_fc), (w_proj, b_proj) = ffn
                x_BD = _linear_binary(_linear(h_BD, w_fc, b_fc, act, [], algorithm), x_BD, w_proj, b_proj, "add")
        w_head, b_head = self.head
        return _linear(model.transformer.ln_f(x_BD), w_head, b_head, "none", [], "")
