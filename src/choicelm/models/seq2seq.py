"""Transformer encoder-decoder (Vaswani et al. 2017) for translation and summarization.

    encoder   token embedding (+ positions) -> n_layer blocks of [non-causal self-attention, MLP]
    decoder   token embedding (+ positions) -> n_decoder_layer blocks of
              [causal self-attention, cross-attention over the encoder output, MLP] -> lm_head

Options (ModelConfig): positions learned | sinusoidal (Marian's fixed table) | rope (self-attention only);
norms before each sub-layer plus a final norm (norm_placement=pre, GPT-2 style, trains easily) or after each
residual add (post: the original Transformer, Marian, BART); one vocabulary shared by source and target
(one embedding) or separate ones (src_vocab_size > 0); lm_head tied to the target embedding.
With pos=sinusoidal, norm_placement=post, mlp=silu, bias=true this is exactly Hugging Face's MarianMTModel
(scale_embedding=True and activation_function="swish" as in the released opus-mt models, zero
final_logits_bias); mlp=gelu is activation_function="gelu_new".

Generation (generation/seq2seq.py drives it): `encode(src)` once per source, `new_cache(enc)` computes every
decoder layer's cross-attention keys/values once, then `decode(tokens, cache, start_pos)` runs the new target
tokens over the self-attention KV cache. `Seq2SeqCache.reorder(rows)` keeps beam-search rows.

Shape suffixes: B batch, S source positions, T target positions (new tokens), L cached target length,
D width, H query heads, K key/value heads, Q head size, V target vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ModelConfig
from ..core.errors import ChoicelmError
from .layers import (KVCache, ModelOutput, SelfAttention, cross_entropy, kv_cache_dtype, make_mlp, make_norm,
                     rope_cos_sin)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """[n_pos, dim] fixed positions: angle[p, i] = p / 10000^(2i/dim); sin of the dim/2 angles in the first
    half, cos in the second (Marian / tensor2tensor layout, not Vaswani's interleaving; same information)."""
    half = (dim + 1) // 2
    inv_freq = 1.0 / (10000.0 ** (2 * torch.arange(half, dtype=torch.float64) / dim))
    angle = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angle.sin(), angle.cos()[:, :dim // 2]], dim=1).float()


class CrossAttention(nn.Module):
    """Decoder queries attend over the encoder output. Keys/values depend on the source only, so generation
    computes them once per source (project_kv) and every step reuses them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_dim, bias=config.bias)  # rows [k | v]
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def project_kv(self, enc_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = enc_BSD.shape
        k, v = self.c_kv(enc_BSD).chunk(2, dim=-1)
        return (k.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2),
                v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2))

    def forward(self, x_BTD: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                src_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        k_BKSQ, v_BKSQ = kv
        q_BHTQ = self.q_proj(x_BTD).view(B, T, self.n_head, self.head_dim).transpose(1, 2).to(k_BKSQ.dtype)
        mask = None if src_mask_BS is None else src_mask_BS.to(torch.bool)[:, None, None, :]  # padding never attended
        y_BHTQ = F.scaled_dot_product_attention(q_BHTQ, k_BKSQ, v_BKSQ, attn_mask=mask,
                                                dropout_p=self.dropout if self.training else 0.0,
                                                enable_gqa=self.n_kv_head != self.n_head)
        y_BTD = y_BHTQ.to(x_BTD.dtype).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y_BTD))


class EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre = config.norm_placement == "pre"
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=False)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x_BSD, *, src_mask_BS=None, rope=None):
        if self.pre:
            x_BSD = x_BSD + self.attn(self.ln_1(x_BSD), key_padding_mask=src_mask_BS, rope=rope)
            return x_BSD + self.mlp(self.ln_2(x_BSD))
        x_BSD = self.ln_1(x_BSD + self.attn(x_BSD, key_padding_mask=src_mask_BS, rope=rope))
        return self.ln_2(x_BSD + self.mlp(x_BSD))


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre = config.norm_placement == "pre"
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=True)
        self.ln_2 = make_norm(config)
        self.cross = CrossAttention(config)
        self.ln_3 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x_BTD, *, cross_kv, src_mask_BS=None, kv=None, start_pos=0, rope=None):
        if self.pre:
            x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), kv=kv, start_pos=start_pos, rope=rope)
            x_BTD = x_BTD + self.cross(self.ln_2(x_BTD), cross_kv, src_mask_BS)
            return x_BTD + self.mlp(self.ln_3(x_BTD))
        x_BTD = self.ln_1(x_BTD + self.attn(x_BTD, kv=kv, start_pos=start_pos, rope=rope))
        x_BTD = self.ln_2(x_BTD + self.cross(x_BTD, cross_kv, src_mask_BS))
        return self.ln_3(x_BTD + self.mlp(x_BTD))


class Seq2SeqCache:
    """Everything decoding needs besides the model: the decoder's self-attention KV cache, every decoder
    layer's cross-attention keys/values (computed once per source) and the source padding mask.

    self_kv:  KVCache, k/v [n_decoder_layer, B, K, max_len, Q]
    cross_k, cross_v: [n_decoder_layer, B, K, S, Q]
    src_mask_BS: bool [B, S] (True = real token) or None (no padding)
    """

    def __init__(self, self_kv: KVCache, cross_k: torch.Tensor, cross_v: torch.Tensor,
                 src_mask_BS: torch.Tensor | None):
        self.self_kv, self.cross_k, self.cross_v, self.src_mask_BS = self_kv, cross_k, cross_v, src_mask_BS

    @property
    def batch_size(self) -> int:
        return self.cross_k.shape[1]

    def reorder(self, rows_N: torch.Tensor) -> None:
        """Keep rows rows_N (beam search: each beam continues its parent's sequence; rows may repeat)."""
        self.self_kv.k = self.self_kv.k.index_select(1, rows_N)
        self.self_kv.v = self.self_kv.v.index_select(1, rows_N)
        self.cross_k = self.cross_k.index_select(1, rows_N)
        self.cross_v = self.cross_v.index_select(1, rows_N)
        if self.src_mask_BS is not None:
            self.src_mask_BS = self.src_mask_BS.index_select(0, rows_N)


class Seq2Seq(nn.Module):
    """forward(src_BS, tgt_in_BT, targets_BT) -> ModelOutput(logits [B, T, V], loss)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.kind != "seq2seq":
            raise ChoicelmError(f"Seq2Seq needs model.kind=seq2seq, got {config.kind!r}")
        self.config = config
        self.n_decoder_layer = config.n_decoder_layer or config.n_layer
        pre = config.norm_placement == "pre"
        wte = nn.Embedding(config.vocab_size, config.n_embd)  # target (and, shared, source) embedding
        self.encoder = nn.ModuleDict(dict(
            **({"wte": nn.Embedding(config.src_vocab_size, config.n_embd)} if config.src_vocab_size else {}),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config) if pre else nn.Identity(),  # post-norm blocks end normalised already
        ))
        self.decoder = nn.ModuleDict(dict(
            wte=wte,
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([DecoderBlock(config) for _ in range(self.n_decoder_layer)]),
            ln_f=make_norm(config) if pre else nn.Identity(),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.decoder.wte.weight
        # fixed sin/cos positions have amplitude 1: token embeddings are scaled by sqrt(D) to match (Vaswani et
        # al. 3.4, fairseq, Marian's scale_embedding); otherwise N(0, 0.02) tokens drown under the positions
        self.embed_scale = math.sqrt(config.n_embd) if config.pos == "sinusoidal" else 1.0
        if config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        if config.pos == "rope":
            cos, sin = rope_cos_sin(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def src_embedding(self) -> nn.Embedding:
        return self.encoder.wte if "wte" in self.encoder else self.decoder.wte

    def reset_parameters(self) -> None:
        """Learned/rotary positions: GPT-2 initialisation (as models/gpt.py), N(0, 0.02), residual projections at
        0.02/sqrt(2 * blocks). Sinusoidal positions: the Vaswani/fairseq recipe, token embeddings N(0, 1/D) (they
        are multiplied by sqrt(D)) and Xavier-uniform projections: the fixed table puts unit-size values in the
        residual stream, under which GPT-2's small branches barely move it (copy does not learn in 800 steps)."""
        residual_std = 0.02 / math.sqrt(2 * (self.config.n_layer + self.n_decoder_layer))
        unit_scale = self.config.pos == "sinusoidal"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue
                if unit_scale:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    std = residual_std if getattr(module, "is_residual_proj", False) else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.n_embd ** -0.5 if unit_scale else 0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    # ------------------------------------------------------------------------- embeddings

    def _embed(self, part: nn.ModuleDict, wte: nn.Embedding, ids_BT: torch.Tensor, start_pos: int):
        """Token + position embeddings of positions start_pos..; returns (x_BTD, rope tables or None)."""
        T = ids_BT.shape[1]
        end = start_pos + T
        if end > self.config.block_size:
            raise ChoicelmError(f"sequence length {end} exceeds the model's block size {self.config.block_size}; "
                                f"shorten the source/target or raise model.block_size")
        if ids_BT.numel() and (int(ids_BT.min()) < 0 or int(ids_BT.max()) >= wte.num_embeddings):
            raise ChoicelmError(f"token ids must be in 0..{wte.num_embeddings - 1} (the vocabulary size); got "
                                f"{int(ids_BT.min())}..{int(ids_BT.max())}")
        x_BTD = wte(ids_BT) * self.embed_scale if self.embed_scale != 1.0 else wte(ids_BT)
        rope = None
        if self.config.pos == "learned":
            x_BTD = x_BTD + part.wpe(torch.arange(start_pos, end, device=ids_BT.device))
        elif self.config.pos == "sinusoidal":
            x_BTD = x_BTD + self.pos_table[start_pos:end].to(x_BTD.dtype)
        else:
            rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        return part.drop(x_BTD), rope

    # ------------------------------------------------------------------------- encoder

    def encode(self, src_BS: torch.Tensor, src_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder output [B, S, D]. src_mask_BS: bool/int [B, S], 1 = real token, 0 = padding (padding is
        never attended to, so it never changes the real positions' outputs). Pad on the right: positions
        count from the first token."""
        if src_mask_BS is not None:
            src_mask_BS = src_mask_BS.to(torch.bool)
            if not bool(src_mask_BS.any(dim=1).all()):
                raise ChoicelmError("a source row is all padding; every source needs at least one token")
        x_BSD, rope = self._embed(self.encoder, self.src_embedding, src_BS, 0)
        for block in self.encoder.h:
            x_BSD = block(x_BSD, src_mask_BS=src_mask_BS, rope=rope)
        return self.encoder.ln_f(x_BSD)

    # ------------------------------------------------------------------------- decoder

    def cross_kv(self, enc_BSD: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention (keys, values), each [B, K, S, Q]."""
        return [block.cross.project_kv(enc_BSD) for block in self.decoder.h]

    def new_cache(self, enc_BSD: torch.Tensor, src_mask_BS: torch.Tensor | None = None,
                  max_len: int | None = None, dtype=None) -> Seq2SeqCache:
        """A decoding cache for these encoder outputs: cross-attention keys/values computed here, once, and an
        empty self-attention cache of max_len target positions (default block_size)."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ChoicelmError(f"cache length {max_len} exceeds the model's block size {self.config.block_size}")
        kv = self.cross_kv(enc_BSD)
        cross_k, cross_v = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        dtype = dtype or kv_cache_dtype(enc_BSD.device, cross_k.dtype)
        self_kv = KVCache(self.n_decoder_layer, enc_BSD.shape[0], self.config.kv_heads, max_len, self.config.head_dim,
                          device=enc_BSD.device, dtype=dtype)
        mask = None if src_mask_BS is None else src_mask_BS.to(torch.bool)
        return Seq2SeqCache(self_kv, cross_k.to(dtype), cross_v.to(dtype), mask)

    def decode(self, tgt_BT: torch.Tensor, enc_BSD: torch.Tensor | None = None,
               src_mask_BS: torch.Tensor | None = None, *, cache: Seq2SeqCache | None = None,
               start_pos: int = 0) -> torch.Tensor:
        """Decoder hidden states [B, T, D] (after the final norm) for target tokens at start_pos...
        Either enc_BSD (+ src_mask_BS): a full teacher-forced pass, or cache: incremental decoding."""
        B, T = tgt_BT.shape
        if cache is not None:
            cache.self_kv.check(B, start_pos + T)
            cross = [(cache.cross_k[i], cache.cross_v[i]) for i in range(self.n_decoder_layer)]
            src_mask_BS = cache.src_mask_BS
        elif enc_BSD is not None:
            if start_pos:
                raise ChoicelmError("start_pos > 0 needs a cache (model.new_cache(enc)) holding the earlier tokens")
            cross = self.cross_kv(enc_BSD)
        else:
            raise ChoicelmError("decode needs the encoder output (enc_BSD) or a cache from model.new_cache(enc)")
        x_BTD, rope = self._embed(self.decoder, self.decoder.wte, tgt_BT, start_pos)
        for i, block in enumerate(self.decoder.h):
            kv = cache.self_kv.layer(i) if cache is not None else None
            x_BTD = block(x_BTD, cross_kv=cross[i], src_mask_BS=src_mask_BS, kv=kv, start_pos=start_pos, rope=rope)
        return self.decoder.ln_f(x_BTD)

    def decode_step(self, tokens_BT: torch.Tensor, cache: Seq2SeqCache, start_pos: int) -> torch.Tensor:
        """Next-token logits [B, V] after the target tokens tokens_BT at start_pos.. (one step of generation)."""
        return self.lm_head(self.decode(tokens_BT, cache=cache, start_pos=start_pos)[:, -1])

    # ------------------------------------------------------------------------- training forward

    def forward(self, src_BS: torch.Tensor, tgt_in_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                src_mask_BS: torch.Tensor | None = None, loss_reduction: str = "mean") -> ModelOutput:
        """Teacher forcing. src_BS: source ids (right-padded, src_mask_BS marks real tokens);
        tgt_in_BT: decoder input = [start] + target[:-1]; targets_BT: the target ids, -100 where ignored
        (padding). The decoder is causal, so right padding in the target never reaches real positions."""
        if src_BS.shape[0] != tgt_in_BT.shape[0]:
            raise ChoicelmError(f"source batch ({src_BS.shape[0]}) and target batch ({tgt_in_BT.shape[0]}) differ")
        enc_BSD = self.encode(src_BS, src_mask_BS)
        logits_BTV = self.lm_head(self.decode(tgt_in_BT, enc_BSD, src_mask_BS))
        loss = None if targets_BT is None else cross_entropy(logits_BTV, targets_BT, loss_reduction)
        return ModelOutput(logits=logits_BTV, loss=loss)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, the GPT estimate (models/gpt.py) for source and target of seq_len tokens:
        6 x the matmul parameters (all but the lookup tables; lm_head counts), plus attention's 12 x width x
        seq_len per self- and cross-attention layer."""
        c = self.config
        seq_len = seq_len or c.block_size
        tables = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        if c.tie_embeddings:
            tables -= self.lm_head.weight.numel()  # the tied table is also the output projection
        attention_layers = c.n_layer + 2 * self.n_decoder_layer
        return 6 * (self.num_params() - tables) + 12 * attention_layers * c.n_embd * seq_len
