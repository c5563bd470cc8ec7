"""LSTM language model: Embedding -> multi-layer LSTM -> Linear (the model that came before the Transformer).

    embed.weight                    [V, D]      token embeddings
    lstm.weight_ih_l{i} / _hh_l{i}  [4D, D]     torch.nn.LSTM gates in the order (input, forget, cell, output)
    lstm.bias_ih_l{i} / _hh_l{i}    [4D]
    lm_head.weight                  [V, D]      the same tensor as embed.weight when tied
    lm_head.bias                    [V]         (config.bias)

The hidden size equals the embedding size (config.n_embd), so the output projection can be tied to the
embedding (Press & Wolf 2017). Dropout (config.dropout) sits on the embeddings, between LSTM layers
and before the head, as in Zaremba et al. 2014 and PyTorch's word_language_model.

Training carries the recurrent state from one window to the next of the same text stream (truncated
back-propagation through time, see train/objectives.py). Generation runs through the same interface
as the GPT: `new_kv_cache()` returns a RecurrentState that plays the KV cache's part.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.config import ModelConfig
from ..core.errors import ChoicelmError
from .layers import ModelOutput, cross_entropy, linear_cross_entropy


class RecurrentState:
    """The LSTM's (h, c), each [n_layer, B, D], standing in for a KV cache during generation.

    A forward with (kv_cache=state, start_pos=p) continues from position p: p = 0 starts from zeros,
    any other p must be where the previous call ended (an LSTM cannot roll back without the history).
    """

    def __init__(self, n_layer: int, batch_size: int, width: int, max_len: int, device=None, dtype=None):
        self.h = torch.zeros(n_layer, batch_size, width, device=device, dtype=dtype)
        self.c = torch.zeros(n_layer, batch_size, width, device=device, dtype=dtype)
        self.pos = 0
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.h.shape[1]

    def reset(self) -> None:
        self.h.zero_()
        self.c.zero_()
        self.pos = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (beam search: the surviving beams' parents)."""
        self.h = self.h.index_select(1, rows)
        self.c = self.c.index_select(1, rows)


class LSTMLM(nn.Module):
    """forward(idx_BT, targets_BT, state=(h, c)) -> ModelOutput(logits, loss, state=(h, c) after the window)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.n_embd
        self.embed = nn.Embedding(config.vocab_size, D)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(D, D, num_layers=config.n_layer, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(D, config.vocab_size, bias=config.bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings U(-0.1, 0.1) (PyTorch's word_language_model), LSTM weights U(-1/sqrt(D), 1/sqrt(D))
        (torch's default), forget-gate biases at 1 (Jozefowicz et al. 2015), head bias 0."""
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.lstm.reset_parameters()
        D = self.config.n_embd
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    p[D:2 * D].fill_(1.0)  # gate order: input, forget, cell, output
                elif name.startswith("bias_hh"):
                    p[D:2 * D].zero_()
        if not self.config.tie_embeddings:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                state: tuple[torch.Tensor, torch.Tensor] | None = None, kv_cache: RecurrentState | None = None,
                start_pos: int = 0, loss_reduction: str = "mean", return_logits: bool = True,
                attention_mask_BS: torch.Tensor | None = None, position_ids_BT: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """idx_BT: token ids; targets_BT: next-token ids (-100 = ignore), as for the GPT.

        state:    (h, c) to start from, each [n_layer, B, D] (None = zeros); the output's .state is the
                  state after the last position, to pass to the next window of the same streams.
        kv_cache: a RecurrentState (generation): read at start_pos and updated in place.
        attention_mask_BS: as for the GPT (batched generation): left-padded rows of a prefill run over
                  their real tokens only, so padding never enters the state. position_ids_BT is ignored.
        logits_to_keep: > 0 returns logits for the last logits_to_keep positions only.
        """
        B, T = idx_BT.shape
        if kv_cache is not None:
            if state is not None:
                raise ChoicelmError("pass either state or kv_cache, not both")
            if kv_cache.batch_size != B:
                raise ChoicelmError(f"the recurrent state holds {kv_cache.batch_size} sequences but the input has {B}")
            if start_pos == 0:
                kv_cache.reset()
            elif start_pos != kv_cache.pos:
                raise ChoicelmError(f"an LSTM continues only where it stopped (position {kv_cache.pos}), not at "
                                    f"start_pos={start_pos}; run the prompt again from position 0")
            state = (kv_cache.h, kv_cache.c) if start_pos else None

        x_BTD = self.drop(self.embed(idx_BT))
        if state is not None:
            state = tuple(s.to(x_BTD.dtype) for s in state)  # under autocast the LSTM wants one dtype
        padded = attention_mask_BS is not None and not bool(attention_mask_BS[:, -T:].all())
        if padded:
            if state is not None:
                raise ChoicelmError("an LSTM takes left padding only in the prefill (start_pos=0)")
            y_BTD, (h, c) = self._run_left_padded(x_BTD, attention_mask_BS[:, -T:].bool())
        else:
            y_BTD, (h, c) = self.lstm(x_BTD, state)
        y_BTD = self.drop(y_BTD)
        if kv_cache is not None:
            kv_cache.h, kv_cache.c = h.to(kv_cache.h.dtype), c.to(kv_cache.c.dtype)
            kv_cache.pos = start_pos + T

        logits = loss = None
        if targets_BT is not None and not return_logits and self.lm_head.bias is None:
            loss = linear_cross_entropy(y_BTD.reshape(B * T, -1), self.lm_head.weight, targets_BT, loss_reduction)
        else:  # the chunked loss has no bias term
            logits = self.lm_head(y_BTD[:, -logits_to_keep:] if logits_to_keep else y_BTD)
            if targets_BT is not None:
                loss = cross_entropy(logits, targets_BT, loss_reduction)
            if not return_logits:
                logits = None
        return ModelOutput(logits=logits, loss=loss, state=(h, c))

    def _run_left_padded(self, x_BTD: torch.Tensor, real_BT: torch.Tensor):
        """Each row over its own real (rightmost) tokens from a zero state; outputs at padded positions are 0."""
        y_BTD = torch.zeros(*x_BTD.shape[:2], self.config.n_embd, dtype=x_BTD.dtype, device=x_BTD.device)
        hs, cs = [], []
        for b in range(x_BTD.shape[0]):
            n = int(real_BT[b].sum())
            y, (h, c) = self.lstm(x_BTD[b:b + 1, x_BTD.shape[1] - n:])
            y_BTD[b, x_BTD.shape[1] - n:] = y[0].to(y_BTD.dtype)
            hs.append(h)
            cs.append(c)
        return y_BTD, (torch.cat(hs, 1), torch.cat(cs, 1))

    # ------------------------------------------------------------------------- the GPT's utilities

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> RecurrentState:
        weight = self.embed.weight
        device = torch.device(device) if device is not None else weight.device
        return RecurrentState(self.config.n_layer, batch_size, self.config.n_embd, max_len or self.config.block_size,
                              device=device, dtype=dtype or weight.dtype)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Parameters; exclude_embeddings drops the input table unless it is tied to the head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 x the parameters used in matmuls (LSTM gates and head)."""
        return 6 * self.num_params(exclude_embeddings=True)
