"""Building blocks shared by choicelm's transformer models.

    make_norm          LayerNorm (optional bias, GPT-2) or RMSNorm (Llama)
    rope_cos_sin       rotary tables, Llama / Hugging Face convention (rotate_half over the two halves)
    apply_rope
    SelfAttention      fused qkv projection + F.scaled_dot_product_attention; causal or not,
                       grouped-query attention, optional key-padding mask, static KV cache
    decoder_attention_mask
                       the decoder's one mask rule: causal, padding hidden, each query keeps its own key
    MLP / SwiGLU       GPT-2 MLP (GELU, tanh approximation = HF `gelu_new`) and the Llama gated MLP
    ACTIVATIONS        the MLP activations: the torch function and the same function as a oneDNN post-op
                       (what models/gpt_decode.py fuses into the up projection)
    KVCache            preallocated keys/values for incremental decoding
    linear_cross_entropy
                       cross-entropy of `h @ W.T` computed in row groups and cache-sized slices: no
                       [N, V] fp32 tensor is ever held, and the gradients come out of the same pass
                       (no recompute); faster than logits + F.cross_entropy and ~40% less peak memory
    ModelOutput        what every choicelm model's forward returns

Shape suffixes: B batch, T new tokens (queries), S keys (cache length), H query heads,
K key/value heads, D model width, Q head size, V vocabulary, N = B*T rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ModelConfig
from ..core.errors import ChoicelmError

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """Output of a choicelm model's forward pass.

    logits:   [B, T, V] (the autocast dtype under autocast), or None when return_logits=False.
    loss:     scalar fp32 cross-entropy over targets != -100 ("mean": averaged over valid tokens,
              "sum": summed), or None without targets.
    aux_loss: scalar auxiliary loss to add to `loss` for training (MoE balancing/z-losses); None for
              dense models.
    stats:    diagnostic values (MoE routing statistics, ...); empty for dense models.
    state:    recurrent models: the state after the last position, to continue the same streams.
    """

    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    state: tuple | None = None


# ----------------------------------------------------------------------------- norms


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (with a bias when config.bias) or RMSNorm, over the model width."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------- rotary positions


def rope_cos_sin(head_dim: int, n_pos: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [n_pos, head_dim] in fp32, Hugging Face Llama layout.

    inv_freq = 1 / theta^(arange(0, Q, 2) / Q); angle[p, i] = p * inv_freq[i]; the table repeats the
    Q/2 angles twice (cat(freqs, freqs)), matching rotate_half, which pairs dimension i with i + Q/2.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(n_pos, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTQ: torch.Tensor, cos_TQ: torch.Tensor, sin_TQ: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, H, T, Q] by the tables of their positions [T, Q]."""
    cos_TQ = cos_TQ.to(x_BHTQ.dtype)
    sin_TQ = sin_TQ.to(x_BHTQ.dtype)
    return x_BHTQ * cos_TQ + rotate_half(x_BHTQ) * sin_TQ


# ----------------------------------------------------------------------------- KV cache


def kv_cache_dtype(device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype a KV cache is stored in for a model computing in compute_dtype. On CPU a bf16/fp16 model
    gets an fp32 cache, so attention over it runs in fp32: torch's one-query bf16 matmuls are slow on CPU,
    and GPT-2 124M in bf16 decodes ~15% faster this way (benchmarks/generate_throughput.py)."""
    if device.type == "cpu" and compute_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute_dtype


class KVCache:
    """Static, preallocated keys and values for incremental decoding.

    k, v: [n_layer, B, K, max_len, Q]; k[i] is layer i's [B, K, max_len, Q] (a view).
    A forward with (kv_cache=cache, start_pos=p) on T new tokens writes positions p..p+T-1 of
    every layer and attends over positions 0..p+T-1. Nothing else is tracked: rolling back or
    reusing the cache is just calling again with a smaller start_pos.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def rows(self, n: int) -> "KVCache":
        """The first n sequences of this cache as a KVCache of batch n that shares its memory: a forward on
        n rows writes into this cache (the server runs only its occupied rows)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        return view

    def check(self, batch_size: int, end: int) -> None:
        if batch_size != self.batch_size:
            raise ChoicelmError(f"the KV cache holds {self.batch_size} sequences but the input has {batch_size}; "
                                f"make the cache with new_kv_cache(batch_size={batch_size}, ...)")
        if end > self.max_len:
            raise ChoicelmError(f"sequence length {end} exceeds the KV cache length {self.max_len}; "
                                f"make the cache with a larger max_len")


# ----------------------------------------------------------------------------- attention


def decoder_attention_mask(attention_mask_BS: torch.Tensor, start_pos: int, end: int) -> torch.Tensor:
    """The decoder's attention mask, bool [B, 1, T, S] (True = attend), for queries start_pos..end-1 over keys
    0..end-1 (S = end), from a padding mask [B, S] (1 = real token, 0 = padding): causal and not padding; each query
    also keeps its own key, so a padding row is never all-masked (its NaN would reach real rows through the
    cache as 0 * NaN). The one rule of GPT.forward and its fast decode step (models/gpt_decode.py)."""
    device = attention_mask_BS.device
    q_T1 = torch.arange(start_pos, end, device=device)[:, None]
    k_1S = torch.arange(end, device=device)[None, :]
    mask_BTS = ((k_1S <= q_T1) & attention_mask_BS.to(torch.bool)[:, None, :]) | (k_1S == q_T1)
    return mask_BTS[:, None]


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention through F.scaled_dot_product_attention.

    c_attn is one fused projection D -> (H + 2K) * Q whose output rows are [q | k | v]: H*Q query
    rows, then K*Q key rows, then K*Q value rows. For GPT-2 (K = H) this is exactly HF's c_attn
    (Conv1D weights transposed); for Llama it is cat([q_proj, k_proj, v_proj]) of the weights.
    c_proj maps the heads back to D (HF GPT-2 c_proj / Llama o_proj).
    With config.qk_norm, q_norm and k_norm (RMSNorm over Q, learned gain [Q]) normalise each head's queries
    and keys before rotary positions (OLMo2/Qwen3/Gemma); the KV cache holds the normalised keys.
    """

    def __init__(self, config: ModelConfig, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.c_attn = nn.Linear(config.n_embd, q_size + 2 * kv_size, bias=config.bias)
        self.c_proj = nn.Linear(q_size, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True  # GPT-2 init scales it by 1/sqrt(2 * n_layer)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0,
                key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD: the T new positions start_pos..start_pos+T-1.

        rope:             (cos_TQ, sin_TQ) of those positions, or None (no rotary positions).
        kv:               this layer's cache tensors (k, v), each [B, K, max_len, Q], or None. The new
                          keys/values are written at start_pos.., attention runs over 0..start_pos+T-1.
        key_padding_mask: bool [B, S] over all key positions (S = start_pos + T with a cache, else T);
                          True = attend. A query row with no key left to attend gives NaN.
        attn_mask:        bool [B, 1, T, S], True = attend: the whole mask (causality included), used as
                          given instead of the two above (left-padded generation builds it once per step).
        """
        B, T, _ = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(self.split_sizes, dim=-1)
        q_BHTQ = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k_BKTQ = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v_BKTQ = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q_BHTQ, k_BKTQ = self.rotate(q_BHTQ, k_BKTQ, rope)
        y_BTD = self.attend(q_BHTQ, k_BKTQ, v_BKTQ, kv=kv, start_pos=start_pos, key_padding_mask=key_padding_mask,
                            attn_mask=attn_mask)
        return self.resid_dropout(self.c_proj(y_BTD))

    def rotate(self, q_BHTQ: torch.Tensor, k_BKTQ: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query/key norms (config.qk_norm), then rotary positions (rope, or None): both before the cache."""
        if self.q_norm is not None:
            q_BHTQ, k_BKTQ = self.q_norm(q_BHTQ), self.k_norm(k_BKTQ)
        if rope is not None:
            q_BHTQ = apply_rope(q_BHTQ, *rope)
            k_BKTQ = apply_rope(k_BKTQ, *rope)
        return q_BHTQ, k_BKTQ

    def attend(self, q_BHTQ: torch.Tensor, k_BKTQ: torch.Tensor, v_BKTQ: torch.Tensor, *,
               kv: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0,
               key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' new keys/values into the cache (kv), then attention over it: [B, T, H*Q] in the queries'
        dtype, before c_proj. The arguments are forward's (the fast decode step calls this too)."""
        B, T = q_BHTQ.shape[0], q_BHTQ.shape[2]
        out_dtype = q_BHTQ.dtype
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start_pos:start_pos + T] = k_BKTQ
            v_cache[:, :, start_pos:start_pos + T] = v_BKTQ
            k_BKTQ, v_BKTQ = k_cache[:, :, :start_pos + T], v_cache[:, :, :start_pos + T]
            q_BHTQ = q_BHTQ.to(k_cache.dtype)

        # Causal over S keys whose last T are the queries: query i sees keys j <= (S - T) + i.
        # SDPA's is_causal aligns the mask to the top-left, which is right only when S == T.
        S = k_BKTQ.shape[-2]
        mask = None
        is_causal = self.causal and T > 1 and S == T
        if self.causal and T > 1 and S != T:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTQ.device).tril(diagonal=S - T)
        if attn_mask is not None:
            mask, is_causal = attn_mask, False
        elif key_padding_mask is not None:
            pad_B11S = key_padding_mask.to(torch.bool)[:, None, None, :]
            if is_causal:
                mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTQ.device).tril()
                is_causal = False
            mask = pad_B11S if mask is None else mask & pad_B11S

        dropout_p = self.dropout if self.training else 0.0
        if q_BHTQ.device.type == "cpu" and q_BHTQ.dtype != torch.float32 and B * self.n_head * T * S <= PLAIN_ATTENTION_MAX:
            y_BHTQ = plain_attention(q_BHTQ, k_BKTQ, v_BKTQ, mask, is_causal, dropout_p)
        else:
            y_BHTQ = F.scaled_dot_product_attention(q_BHTQ, k_BKTQ, v_BKTQ, attn_mask=mask, is_causal=is_causal,
                                                    dropout_p=dropout_p, enable_gqa=self.n_kv_head != self.n_head)
        return y_BHTQ.to(out_dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


# Up to this many attention scores (B * H * T * S), bf16/fp16 attention on CPU runs as plain matmuls: ~1.7x faster
# forward+backward than SDPA's CPU flash kernel at T=256 (fp32 gains nothing).
PLAIN_ATTENTION_MAX = 1 << 24


def plain_attention(q_BHTQ, k_BKSQ, v_BKSQ, mask, is_causal: bool, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(Q) + mask) v, as F.scaled_dot_product_attention computes it (same arguments;
    mask is a bool "attend" mask broadcastable to [B, H, T, S]). The scores stay in the input dtype: torch's
    CPU softmax of bf16/fp16 computes in fp32 and rounds once, bit-identical to softmax(scores.float()), at
    half the memory traffic (forward+backward 1.4x faster than with fp32 scores at T=256)."""
    H, K = q_BHTQ.shape[1], k_BKSQ.shape[1]
    if K != H:  # grouped-query attention: each key/value head serves H/K query heads
        k_BKSQ = k_BKSQ.repeat_interleave(H // K, dim=1)
        v_BKSQ = v_BKSQ.repeat_interleave(H // K, dim=1)
    T, S = q_BHTQ.shape[-2], k_BKSQ.shape[-2]
    scores_BHTS = (q_BHTQ * q_BHTQ.shape[-1] ** -0.5) @ k_BKSQ.transpose(-1, -2)
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTQ.device).tril(diagonal=S - T)
    if mask is not None:
        scores_BHTS = scores_BHTS.masked_fill(~mask, float("-inf"))
    p_BHTS = torch.softmax(scores_BHTS, dim=-1)
    if dropout_p:
        p_BHTS = F.dropout(p_BHTS, dropout_p)
    return p_BHTS @ v_BKSQ


CausalSelfAttention = SelfAttention  # the decoder's name for it; SelfAttention(config, causal=False) for encoders


# ----------------------------------------------------------------------------- MLPs


@dataclass(frozen=True)
class Activation:
    """An MLP activation: the torch function, and the same function as a oneDNN linear post-op (name, algorithm)
    for the fused decode step (None: it has none, and models using it decode through the module forward)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    onednn: tuple[str, str] | None


# model.mlp -> the activation of a non-gated MLP; "silu" is also SwiGLU's gate. The tanh GELU is HF `gelu_new`.
ACTIVATIONS = {
    "gelu": Activation(lambda h: F.gelu(h, approximate="tanh"), ("gelu", "tanh")),
    "silu": Activation(F.silu, ("swish", "")),
}


def activation(h: torch.Tensor, mlp: str) -> torch.Tensor:
    """model.mlp's activation (ACTIVATIONS[mlp_activation(mlp)]) applied to h."""
    return ACTIVATIONS[mlp_activation(mlp)].fn(h)


def mlp_activation(mlp: str) -> str:
    """The ACTIVATIONS key of model.mlp's activation: SwiGLU gates with silu; a non-gated MLP uses silu for
    "silu", else the tanh GELU (GPT-2)."""
    return "silu" if mlp in ("silu", "swiglu") else "gelu"


class MLP(nn.Module):
    """GPT-2 MLP: c_proj(gelu_tanh(c_fc(x))). F.gelu(approximate="tanh") == HF `gelu_new` to rounding.
    With mlp=silu the activation is silu (Marian's `swish`): c_proj(silu(c_fc(x)))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_size, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)
        self.act = config.mlp

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(activation(self.c_fc(x_BTD), self.act)))


class SwiGLU(nn.Module):
    """Llama MLP: down_proj(silu(gate_proj(x)) * up_proj(x)); names match Hugging Face Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden_size, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.hidden_size, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.down_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(activation(self.gate_proj(x_BTD), "swiglu") * self.up_proj(x_BTD)))


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)


# ----------------------------------------------------------------------------- loss


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """fp32 cross-entropy of logits [..., V] against targets [...]; targets == -100 are ignored.
    "mean" divides by the number of valid targets (NaN if there are none, like F.cross_entropy)."""
    _check_reduction(reduction)
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long(),
                               ignore_index=IGNORE_INDEX, reduction=reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ChoicelmError(f"loss_reduction={reduction!r} is not allowed; choose mean or sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = CE(h @ W.T, targets) with the gradients computed in the same pass.

    Rows go in groups of G (the group's logits fit a memory budget). Per group:
      logits_GV = h_G @ W.T                 compute dtype (bf16 under autocast, as nn.Linear would)
      then per slice of C rows (small enough to stay in cache), overwriting the logits in place:
        p = softmax(logits) in fp32; loss = -log p[target] (fp32; rows whose target probability
        underflows get logsumexp - logit instead); dlogits = p - onehot(target) (the target entry
        computed in fp32), cast to the compute dtype; rows with target -100 are zeroed
      grad_h_G = dlogits_GV @ W;  grad_W += dlogits_GV.T @ h_G (fp32 accumulation across groups)
    backward() only scales the saved gradients by grad_output: no matmul is recomputed, and the only
    [rows, V] buffer is one group's logits in the compute dtype (never the full fp32 [N, V]).
    """

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, reduction_sum, group_rows, slice_rows, compute_dtype):
        N = h_ND.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h_ND.device.type, enabled=False):
            w_VD = weight_VD.to(compute_dtype)
            hc_ND = h_ND.to(compute_dtype)
            valid_N = targets_N != IGNORE_INDEX
            safe_N1 = torch.where(valid_N, targets_N, 0)[:, None]
            ignored_rows = (~valid_N).nonzero().squeeze(1)  # the one host sync of the loop
            nll_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
            p_target_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
            grad_h = torch.empty_like(hc_ND) if need_h else None
            grad_w = None
            row_start_C = torch.arange(slice_rows, device=h_ND.device) * weight_VD.shape[0]  # flat index of each row
            for g0 in range(0, N, group_rows):
                g1 = min(g0 + group_rows, N)
                h_GD = hc_ND[g0:g1]
                logits_GV = h_GD @ w_VD.T
                for s0 in range(g0, g1, slice_rows):  # softmax a cache-sized slice, overwrite it with dlogits
                    s1 = min(s0 + slice_rows, g1)
                    x_CV, t_C1 = logits_GV[s0 - g0:s1 - g0], safe_N1[s0:s1]
                    p_CV = torch.softmax(x_CV, dim=-1, dtype=torch.float32)
                    p_C1 = p_CV.gather(1, t_C1)
                    p_target_N[s0:s1] = p_C1.squeeze(1)
                    if need_h or need_w:  # (index_put_ on the flat slice: scatter_ walks all of [C, V], ~3x slower)
                        x_CV.copy_(p_CV)
                        flat_C = row_start_C[:s1 - s0] + t_C1[:, 0]
                        x_CV.view(-1).index_put_((flat_C,), (p_C1[:, 0] - 1.0).to(compute_dtype))
                if need_h or need_w:
                    if ignored_rows.numel():
                        rows = ignored_rows[(ignored_rows >= g0) & (ignored_rows < g1)] - g0
                        logits_GV.index_fill_(0, rows, 0.0)
                    if need_h:
                        torch.mm(logits_GV, w_VD, out=grad_h[g0:g1])
                    if need_w:
                        if grad_w is None:
                            grad_w = (logits_GV.T @ h_GD).float()
                        elif compute_dtype == torch.float32:
                            grad_w.addmm_(logits_GV.T, h_GD)
                        else:
                            grad_w += logits_GV.T @ h_GD
                del logits_GV
            torch.log(p_target_N, out=nll_N).neg_()
            # Where p[target] underflows (target logit ~70+ below the logsumexp), -log p is inf or imprecise:
            # recompute those rows' loss as logsumexp - logit (their gradient, p - 1 = -1, is already exact).
            tiny_N = valid_N & (p_target_N < 1e-30)
            if tiny_N.any():
                rows = tiny_N.nonzero().squeeze(1)
                lg = (hc_ND[rows] @ w_VD.T).float()
                nll_N[rows] = torch.logsumexp(lg, dim=-1) - lg.gather(1, safe_N1[rows]).squeeze(1)
            loss = torch.where(valid_N, nll_N, 0.0).sum()
            grad_h = grad_h.to(h_ND.dtype) if need_h else None
            grad_w = grad_w.to(weight_VD.dtype) if need_w else None
            if not reduction_sum:
                scale = 1.0 / valid_N.sum().float()
                loss = loss * scale
                for g in (grad_h, grad_w):  # in place: a fresh [V, D] fp32 tensor per step costs more than the scaling
                    if g is not None:
                        g.mul_(scale)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.backward_done = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The gradients were computed (and scaled for "mean") in forward; scale by grad_loss in place.
        if ctx.backward_done:
            raise ChoicelmError("linear_cross_entropy's backward can run only once (its saved gradients are scaled "
                                "in place); recompute the loss instead of backward(retain_graph=True)")
        ctx.backward_done = True
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        grad_h = saved.pop(0).mul_(grad_loss) if need_h else None
        grad_w = saved.pop(0).mul_(grad_loss) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         reduction: str = "mean", *, group_bytes: int = 1 << 28, slice_rows: int | None = None,
                         group_rows: int | None = None) -> torch.Tensor:
    """CE(h @ weight.T, targets) without the [N, V] fp32 logits; equals
    cross_entropy(h @ weight.T, targets, reduction) and its gradients (to float rounding).

    Under autocast the matmuls run in the autocast dtype (as nn.Linear would), the softmax and the loss
    in fp32. Memory: one group of rows' logits in the compute dtype, at most group_bytes (256 MB), plus
    a cache-sized fp32 slice. Not twice differentiable.
    """
    _check_reduction(reduction)
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(h_ND.dtype, weight_VD.dtype)
    V = weight_VD.shape[0]
    if group_rows is None:
        group_rows = max(1, group_bytes // (V * torch.finfo(compute_dtype).bits // 8))
    if slice_rows is None:
        slice_rows = max(1, (1 << 20) // V)  # 4 MB of fp32 probabilities: stays in cache
    if not torch.is_grad_enabled():  # else ctx.needs_input_grad says True and the gradients get computed
        h_ND, weight_VD = h_ND.detach(), weight_VD.detach()
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N.reshape(-1).long(), reduction == "sum",
                                     int(group_rows), int(slice_rows), compute_dtype)
