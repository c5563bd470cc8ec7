"""Bidirectional Transformer encoder (BERT): masked-LM pretraining and a sequence-classification head.

    embeddings   word + learned position + token type, then LayerNorm and dropout
    blocks       post-norm, as BERT: x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)); attention is not causal
                 and never looks at padding (attention_mask_BT)
    mlm head     dense + GELU + LayerNorm, then the decoder tied to the word embeddings, plus a bias
    classifier   pooler (dense + tanh on the first token, BERT's [CLS]), dropout, linear to n_labels
    nsp head     (model.nsp) the pooler and a 2-way linear layer: next-sentence prediction, as BertForPreTraining

A model has the heads it trains, as Hugging Face's classes do: a masked-LM model (n_labels = 0, like
BertForMaskedLM) the MLM head and no pooler; with model.nsp (like BertForPreTraining) also the pooler and the
next-sentence head; a classifier (n_labels >= 2, like BertForSequenceClassification) the pooler and classifier
and no MLM head. So every parameter gets a gradient (DDP needs that), and `add_classifier` turns a pretrained
masked-LM model into a classifier for fine-tuning (keeping an NSP model's pretrained pooler, as from_pretrained
does from a BertForPreTraining checkpoint).

Next-sentence prediction: the inputs are sentence pairs (data/mlm.py: next_sentence_pairs), segment B marked
by token type 1; label 0 = B follows A, 1 = B is random. The loss is the MLM loss plus the NSP cross-entropy,
weighted so that it adds Hugging Face's mean NSP loss to the mean MLM loss (see `_nsp_term`).

Mixture of Experts (build with a MoEConfig of experts > 0): every moe.every-th block's MLP is models/moe.py's
MoE layer, numbered as in GPT (blocks every-1, 2*every-1, ...). An encoder has no future to leak, so expert
choice routes by true top-k in training and evaluation alike (no moe.allow_noncausal_training needed); token
choice keeps its own rules (capacity in training, dropless in evaluation). Padding is never routed. Aux losses
and routing statistics come back in the output exactly as GPT's, so the training loop logs them unchanged.
The experts are GPT's expert layout (no biases; the tanh GELU), not BertMLP.

The attention and MLP are layers.py's, so the math is GPT's; the MLP's GELU is the exact (erf) one,
as BERT's `hidden_act="gelu"`. The parameter names and Hugging Face BERT's: models/bert_hf.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError
from .layers import IGNORE_INDEX, MLP, ModelOutput, SelfAttention, cross_entropy, make_norm
from .init import init_weights
from .moe import MoE, RoutedModel


class BertMLP(MLP):
    """GPT-2's MLP layout with BERT's activation: the exact (erf) GELU, not the tanh approximation."""

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x_BTD))))


class EncoderBlock(nn.Module):
    """Post-norm block: the residual add comes before the norm (BERT, the original Transformer)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn = SelfAttention(config, causal=False)
        self.ln_1 = make_norm(config)
        self.mlp = BertMLP(config)
        self.ln_2 = make_norm(config)

    def forward(self, x_BTD: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = self.ln_1(x_BTD + self.attn(x_BTD, key_padding_mask=key_padding_mask))
        x_BTD = self.ln_2(x_BTD + self.mlp(x_BTD))
        return x_BTD


class MoEEncoderBlock(EncoderBlock):
    """A post-norm block whose MLP is a Mixture-of-Experts layer (as GPT's MoEBlock). forward also takes the
    routing rule, and puts the layer's MoEOutput (aux loss, stats) into `outputs[layer]`; padding (False in
    key_padding_mask) is never routed."""

    def __init__(self, config: ModelConfig, moe: MoEConfig, layer: int):
        super().__init__(config)
        self.mlp = MoE(config, moe)
        self.layer = layer

    def forward(self, x_BTD: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *, rule: str | None = None,
                record: bool = False, outputs: dict | None = None) -> torch.Tensor:
        x_BTD = self.ln_1(x_BTD + self.attn(x_BTD, key_padding_mask=key_padding_mask))
        out = self.mlp(x_BTD, valid_BT=key_padding_mask, rule=rule, record=record)
        if outputs is not None:
            outputs[self.layer] = out
        return self.ln_2(x_BTD + out.y_BTD)


@dataclass
class PreTrainingOutput(ModelOutput):
    """Output of an encoder with next-sentence prediction (model.nsp), like Hugging Face's BertForPreTrainingOutput:
    logits are the MLM prediction logits (or None), loss the MLM loss plus the weighted NSP loss.

    nsp_logits: [B, 2] next-sentence logits (HF's seq_relationship_logits; column 1 = "B is random").
    mlm_loss:   the masked-LM cross-entropy alone, in the forward's loss_reduction.
    nsp_loss:   the NSP cross-entropy alone over the labelled rows ("mean" or "sum"), before weighting.
    """

    nsp_logits: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


class MLMHead(nn.Module):
    """BERT's prediction-head transform: LayerNorm(gelu(dense(h))). The decoder is the model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.ln = make_norm(config)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.dense(x_ND)))


class BERT(RoutedModel, nn.Module):
    """Encoder. forward(idx_BT, targets_BT=None, *, attention_mask_BT, token_type_ids_BT, labels_B, nsp_labels_B)
    -> ModelOutput.

    A masked-LM model (config.n_labels == 0) returns MLM logits [B, T, V] and, given targets_BT (the original
    ids at masked positions, -100 elsewhere), their cross-entropy; with model.nsp a PreTrainingOutput that adds
    the next-sentence logits and, given nsp_labels_B, the NSP loss. A classifier (n_labels >= 2) returns
    class logits [B, n_labels] and, given labels_B, their cross-entropy. `encode` gives the hidden states.

    With moe (a MoEConfig with experts > 0), every moe.every-th block's MLP is an MoE layer; `routing` picks its
    rule (None = the default: true top-k for expert choice, in train and eval mode alike); see set_routing().
    """

    def __init__(self, config: ModelConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.config = config
        moe_layers = self._init_routing(config, moe)
        if self.moe_config is not None and moe.train_causal and moe.router != "token_choice":
            raise ChoicelmError("moe.train_causal=true makes a decoder route causally while it trains; an encoder has "
                                "no future to leak and routes expert choice by true top-k, so set "
                                "moe.train_causal=false (model.set_routing(...) still tries another rule)")
        D = config.n_embd
        self.embeddings = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, D),
            wpe=nn.Embedding(config.block_size, D),
            wtt=nn.Embedding(config.type_vocab_size, D),
            ln=make_norm(config),
            drop=nn.Dropout(config.dropout),
        ))
        self.h = nn.ModuleList([MoEEncoderBlock(config, moe, i) if i in moe_layers else EncoderBlock(config)
                                for i in range(config.n_layer)])
        self.mlm_head = self.lm_head = self.pooler = self.nsp_head = self.classifier = None
        if config.n_labels:
            self._make_classifier(config.n_labels)
        else:
            self.mlm_head = MLMHead(config)
            self.lm_head = nn.Linear(D, config.vocab_size)  # its bias is BERT's cls.predictions.bias
            if config.tie_embeddings:
                self.lm_head.weight = self.embeddings.wte.weight
            if config.nsp:  # BertForPreTraining's own pooler and seq_relationship
                self.pooler = nn.Linear(D, D)
                self.nsp_head = nn.Linear(D, 2)
        self.cls_drop = nn.Dropout(config.dropout)
        self.reset_parameters()

    def _make_classifier(self, n_labels: int) -> None:
        self.pooler = nn.Linear(self.config.n_embd, self.config.n_embd)
        self.classifier = nn.Linear(self.config.n_embd, n_labels)

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, norms at 1.
        Deterministic given torch.manual_seed."""
        init_weights(self, 0.02, tied_head=self.lm_head if self.config.tie_embeddings else None)  # no scaled projection

    @property
    def head(self) -> str:
        """Which head forward runs: "classify" (n_labels > 0) or "mlm"."""
        return "classify" if self.config.n_labels else "mlm"

    # ------------------------------------------------------------------------- forward

    def encode(self, idx_BT: torch.Tensor, *, attention_mask_BT: torch.Tensor | None = None,
               token_type_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [B, T, D] of the last block (HF's last_hidden_state).

        attention_mask_BT: 1 = real token, 0 = padding (never attended to, never routed to an expert; padded
                           positions still get states).
        token_type_ids_BT: segment ids in [0, type_vocab_size); default all 0.
        MoE layers route with current_routing(); their aux losses and statistics come with forward().
        """
        return self._encode(idx_BT, attention_mask_BT, token_type_ids_BT)[0]

    def _encode(self, idx_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None,
                token_type_ids_BT: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """(hidden states [B, T, D], {MoE block index: its MoEOutput})."""
        B, T = idx_BT.shape
        c = self.config
        if T > c.block_size:
            raise ChoicelmError(f"sequence length {T} exceeds the encoder's block size {c.block_size}; truncate the "
                                f"input to {c.block_size} tokens")
        if token_type_ids_BT is None:
            token_type_ids_BT = torch.zeros_like(idx_BT)
        elif token_type_ids_BT.shape != idx_BT.shape:
            raise ChoicelmError(f"token_type_ids has shape {tuple(token_type_ids_BT.shape)}, the input ids "
                                f"{tuple(idx_BT.shape)}; give one segment id per token")
        elif int(token_type_ids_BT.max()) >= c.type_vocab_size or int(token_type_ids_BT.min()) < 0:
            raise ChoicelmError(f"token_type_ids must be in [0, {c.type_vocab_size}) (model.type_vocab_size)")
        key_padding_mask = None
        if attention_mask_BT is not None:
            if attention_mask_BT.shape != idx_BT.shape:
                raise ChoicelmError(f"attention_mask has shape {tuple(attention_mask_BT.shape)}, the input ids "
                                    f"{tuple(idx_BT.shape)}; give 1 (token) or 0 (padding) per token")
            key_padding_mask = attention_mask_BT.to(torch.bool)
            if not bool(key_padding_mask.any(dim=1).all()):  # softmax over no key at all is NaN
                raise ChoicelmError("a row of attention_mask has no real token (all 0); drop empty rows")
        pos_T = torch.arange(T, dtype=torch.long, device=idx_BT.device)
        e = self.embeddings
        x_BTD = e.wte(idx_BT) + e.wpe(pos_T) + e.wtt(token_type_ids_BT)
        x_BTD = e.drop(e.ln(x_BTD))
        moe_outs: dict = {}  # block index -> MoEOutput: aux losses and routing stats travel in the output
        moe_kw = {}
        if self.moe_config is not None:
            moe_kw = dict(rule=self.current_routing(), record=self.record_routing, outputs=moe_outs)
        for block in self.h:
            x_BTD = block(x_BTD, key_padding_mask, **(moe_kw if isinstance(block, MoEEncoderBlock) else {}))
        return x_BTD, moe_outs

    def mlm_logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        """MLM logits [..., V] of hidden states [..., D]."""
        return self.lm_head(self.mlm_head(x_ND))

    def pool(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output [B, D]: tanh(dense(state of the first token))."""
        return torch.tanh(self.pooler(x_BTD[:, 0]))

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None, *,
                attention_mask_BT: torch.Tensor | None = None, token_type_ids_BT: torch.Tensor | None = None,
                labels_B: torch.Tensor | None = None, nsp_labels_B: torch.Tensor | None = None,
                loss_reduction: str = "mean", return_logits: bool = True) -> ModelOutput:
        """idx_BT: token ids (masked, for MLM).

        targets_BT:   masked-LM targets: the original id at each masked position, -100 elsewhere.
        labels_B:     classifier targets, class ids in [0, n_labels) (-100 = ignore).
        nsp_labels_B: next-sentence targets (model.nsp): 0 = segment B follows A, 1 = B is random, -100 = ignore;
                      given with targets_BT, the loss is MLM + NSP (see _nsp_term).
        return_logits: False (MLM with targets) computes logits only at the masked positions, for the loss.
        loss_reduction: "mean" over valid targets, or "sum".
        An MoE model's output also carries aux_loss and stats (as GPT's: {"routing", "causal", "moe": {block: ...}}).
        """
        self._check_targets(targets_BT, labels_B, nsp_labels_B)
        x_BTD, moe_outs = self._encode(idx_BT, attention_mask_BT, token_type_ids_BT)

        if self.classifier is not None:
            logits_BL = self.classifier(self.cls_drop(self.pool(x_BTD)))
            loss = None if labels_B is None else cross_entropy(logits_BL, labels_B, loss_reduction)
            return self._output(moe_outs, ModelOutput, logits=logits_BL, loss=loss)

        logits, mlm_loss = self._mlm(x_BTD, targets_BT, loss_reduction, return_logits)
        if self.nsp_head is None:
            return self._output(moe_outs, ModelOutput, logits=logits, loss=mlm_loss)
        nsp_logits_B2 = self.nsp_head(self.pool(x_BTD))  # HF's BertPreTrainingHeads: no dropout before it
        loss, nsp_loss = mlm_loss, None  # no labels (evaluating the MLM alone): the MLM loss
        if nsp_labels_B is not None:
            nsp_loss, nsp_term = self._nsp_term(nsp_logits_B2, nsp_labels_B, targets_BT, loss_reduction)
            loss = mlm_loss + nsp_term
        return self._output(moe_outs, PreTrainingOutput, logits=logits, loss=loss, nsp_logits=nsp_logits_B2,
                            mlm_loss=mlm_loss, nsp_loss=nsp_loss)

    def _check_targets(self, targets_BT, labels_B, nsp_labels_B) -> None:
        """One clear error for targets this model has no head (or no objective) for."""
        if self.classifier is None and labels_B is not None:
            raise ChoicelmError("labels given to a masked-LM encoder (model.n_labels=0); build it with "
                                "model.n_labels=N, or call add_classifier(N), to get a classification head")
        if self.classifier is not None and targets_BT is not None:
            raise ChoicelmError("masked-LM targets given to a classifier (model.n_labels > 0), which has no "
                                "masked-LM head; pass labels_B")
        if nsp_labels_B is not None and self.nsp_head is None:
            raise ChoicelmError("next-sentence labels given to an encoder without a next-sentence head; build it "
                                "with model.nsp=true")
        if nsp_labels_B is not None and targets_BT is None:
            raise ChoicelmError("nsp_labels_B needs the masked-LM targets_BT too: the pretraining loss is their sum")
        if self.nsp_head is not None and self.training and targets_BT is not None and nsp_labels_B is None:
            raise ChoicelmError("model.nsp=true trains next-sentence prediction, but the batch has no next-sentence "
                                "labels; the pretraining objective must build sentence pairs (MaskedLM(..., nsp=True) "
                                "in objectives.py), or set model.nsp=false")

    def _mlm(self, x_BTD: torch.Tensor, targets_BT: torch.Tensor | None, reduction: str, return_logits: bool):
        """(MLM logits [B, T, V] or None, MLM loss or None)."""
        logits = loss = None
        if return_logits:
            logits = self.mlm_logits(x_BTD)
            if targets_BT is not None:
                loss = cross_entropy(logits, targets_BT, reduction)
        elif targets_BT is not None:
            # Only ~15% of positions are targets: run the head and the [*, V] decoder on those rows alone.
            rows_N = (targets_BT.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
            x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])[rows_N]
            loss = cross_entropy(self.mlm_logits(x_ND), targets_BT.reshape(-1)[rows_N], reduction)
        return logits, loss

    @staticmethod
    def _nsp_term(nsp_logits_B2: torch.Tensor, nsp_labels_B: torch.Tensor, targets_BT: torch.Tensor,
                  reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(NSP cross-entropy in `reduction`, the term added to the MLM loss).

        "mean": mean MLM CE + mean NSP CE, Hugging Face BertForPreTraining's loss.
        "sum": the training loop divides the summed loss by the masked-token count of the whole batch. A plain sum
        of row CEs would then weigh NSP by rows / masked tokens (~1 / (0.15 T)), next to nothing for long windows.
        So the NSP sum is scaled by this batch's masked tokens / labelled rows: divided by the masked count, the
        loss is again mean MLM + mean NSP, as HF's (with accumulation: the masked-count-weighted mean of the
        micro-batches' NSP means). A batch with no masked token gets no NSP term; no labelled row gives 0.
        """
        n_rows = (nsp_labels_B != IGNORE_INDEX).sum()
        nsp_sum = cross_entropy(nsp_logits_B2, nsp_labels_B, "sum")
        if reduction == "mean":
            nsp_mean = nsp_sum / n_rows.clamp(min=1)
            return nsp_mean, nsp_mean
        n_masked = (targets_BT != IGNORE_INDEX).sum()
        return nsp_sum, nsp_sum * n_masked / n_rows.clamp(min=1)

    def _output(self, moe_outs: dict, output_cls: type, **fields) -> ModelOutput:
        """The output, with an MoE model's aux loss and routing stats in GPT's structure."""
        return output_cls(**fields, **self.moe_output_fields(moe_outs))

    # ------------------------------------------------------------------------- MoE routing

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.h if isinstance(block, MoEEncoderBlock)]

    def default_rule(self, layer: MoE) -> str:
        """Expert choice: true top-k in both modes (every token sees the whole sequence anyway: nothing for top-k
        to leak; the causal rules work but buy an encoder nothing). Token choice: capacity in train mode,
        dropless in eval."""
        if layer.expert_choice:
            return "topk"
        return layer.train_rule if self.training else layer.eval_rule

    # ------------------------------------------------------------------------- utilities

    def add_classifier(self, n_labels: int) -> "BERT":
        """Turn a (pretrained) masked-LM encoder into a classifier of n_labels classes, for fine-tuning: a fresh
        pooler and classifier (N(0, 0.02) weights, zero biases, on the encoder's device and dtype) replace the
        MLM head; forward then classifies. An NSP model keeps its pretrained pooler (as Hugging Face's
        from_pretrained does from a BertForPreTraining checkpoint) and drops the next-sentence head. Load the
        pretrained weights first, then call this. Returns self."""
        if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 2:
            raise ChoicelmError(f"n_labels={n_labels!r}: a classifier needs at least 2 classes")
        if self.classifier is not None:
            raise ChoicelmError(f"this encoder already has a {self.config.n_labels}-class head; build a new model "
                                "from the masked-LM checkpoint to change the number of classes")
        w = self.embeddings.wte.weight
        pretrained_pooler = self.pooler
        self.mlm_head = self.lm_head = self.nsp_head = None
        self._make_classifier(n_labels)
        fresh = (self.pooler, self.classifier)
        if pretrained_pooler is not None:
            self.pooler, fresh = pretrained_pooler, (self.classifier,)
        for head in fresh:
            head.to(device=w.device, dtype=w.dtype)
            nn.init.normal_(head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(head.bias)
        self.config = dataclasses.replace(self.config, n_labels=n_labels, nsp=False)
        return self

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Number of (unique) parameters; exclude_embeddings drops the position and token-type tables and
        wte unless it is tied to the MLM decoder (then it does compute)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embeddings.wpe.weight.numel() + self.embeddings.wtt.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.embeddings.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6 * N + 12 * n_layer * n_head * head_dim * seq_len (as GPT.flops_per_token).
        An upper bound for MLM training, where the [D, V] decoder runs only on the ~15% masked positions. MoE
        layers count only the expert parameters a token uses on average, as in GPT."""
        c = self.config
        attention = 12 * c.n_layer * c.n_head * c.head_dim * (seq_len or c.block_size)
        n_active = self.num_params(exclude_embeddings=True) - sum(m.inactive_params() for m in self.moe_layers())
        return 6 * n_active + attention
