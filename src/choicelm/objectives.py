"""Objectives: a batch in, (sum of per-token losses, number of valid tokens, model output) out.

The training loop divides the summed loss by the valid-token count of the whole global batch
(all micro-batches on all ranks), so every token weighs the same whatever the padding or the
accumulation. The model output carries auxiliary losses (MoE) and statistics to the loop.
A new objective (MLM, classification, SFT) is one more function here.

Training optimises these objectives and evaluation measures them, so they live below both (training,
fine-tuning and evaluation import this module; it imports no training code): summed_loss scores a model
over batches, score_split a counted (n-gram) model over a prepared split.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .core.errors import ChoicelmError
from .core.runtime import autocast
from .data.loader import TokenDataset, text_lines
from .models import padding_mask
from .models.ngram import score_stream


def causal_lm(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """Next-token prediction: targets are the inputs shifted by one; -100 marks ignored positions."""
    x_BT, y_BT = batch
    out = model(x_BT, y_BT, loss_reduction="sum", return_logits=False)
    n_valid = int((y_BT != -100).sum())
    return out.loss, n_valid, out


class TruncatedBPTT:
    """Causal LM for recurrent models (truncated back-propagation through time).

    With StreamBatchSampler, micro-batch slot i of every step holds the same text streams, each row
    continuing where it stopped at the previous step; so slot i starts from the state it reached
    then. The carried state is detached: gradients flow back through one window. In eval mode
    (validation, evaluate) every batch starts from zeros and nothing is carried.
    """

    def __init__(self, micro_steps: int):
        self.micro_steps = micro_steps
        self.next_slot = 0
        self.states: dict[int, tuple[torch.Tensor, ...]] = {}

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        if not model.training:
            return causal_lm(model, batch)
        x_BT, y_BT = batch
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % self.micro_steps
        out = model(x_BT, y_BT, state=self.states.get(slot), loss_reduction="sum", return_logits=False)
        self.states[slot] = tuple(s.detach() for s in out.state)
        return out.loss, int((y_BT != -100).sum()), out

    def state_dict(self) -> dict:
        return {"next_slot": self.next_slot,
                "states": {slot: tuple(s.cpu() for s in state) for slot, state in self.states.items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.next_slot = state["next_slot"]
        self.states = {slot: tuple(s.to(device) for s in st) for slot, st in state["states"].items()}


class MaskedLM:
    """Masked-LM (BERT) pretraining on the LM windows: x is masked (data/mlm.py), y is ignored.

    prepare(batch, key) turns a window batch (x_BT, y_BT) into (inputs_BT, targets_BT), targets -100 except
    at the ~15% selected positions, so the loop's valid-token count is the masked-token count. The loop
    prepares each training micro-batch with key = (step, micro-batch index over all ranks): the masks
    depend only on (train.seed, step, micro-batch), never on a global RNG, so a resumed run masks exactly
    as an uninterrupted one (and one process with accumulation as several). key None (validation,
    `choicelm evaluate`) seeds each row from its own tokens: the same masks at every evaluation, whatever
    the batch size or the number of processes.

    nsp=True (model.nsp) adds next-sentence prediction: prepare first makes sentence pairs of the windows
    (data/mlm.py: next_sentence_pairs), then masks them, and returns (inputs_BT, token_types_BT, nsp_labels_B,
    targets_BT), the MLM targets last as the loop expects. The pairs are seeded like the masks: by (train.seed,
    step, micro-batch) in training, by the tokens of the whole batch in validation (a random segment B comes
    from another window of the batch, so an NSP model's validation loss depends on the batch size, though not
    on when it is measured). The model adds the NSP loss to the MLM loss (models/bert.py: BERT.forward).
    """

    def __init__(self, masker, seed: int, nsp: bool = False):
        self.masker, self.seed, self.nsp = masker, int(seed), bool(nsp)

    @classmethod
    def for_data(cls, data_dir, seed: int, nsp: bool = False) -> "MaskedLM":
        """The objective for a prepared data folder: masks with its tokenizer's <|mask|> and special tokens."""
        from .data.loader import read_manifest
        from .data.mlm import MLMMasker
        from .text import Tokenizer

        manifest = read_manifest(data_dir)
        tokenizer = Tokenizer.load(Path(data_dir) / manifest["tokenizer"]["dir"])
        return cls(MLMMasker.from_tokenizer(tokenizer), seed, nsp)

    def prepare(self, batch: tuple[torch.Tensor, torch.Tensor], key: tuple[int, int] | None):
        from .data.mlm import content_key, mlm_generator, next_sentence_pairs

        x_BT = batch[0]
        if self.nsp:  # generator streams 2 (training) and 3 (validation), apart from the masks' 0 and 1
            pair_key = (2, *key) if key is not None else (3, content_key(x_BT))
            x_BT, token_types_BT, nsp_labels_B = next_sentence_pairs(x_BT, mlm_generator(self.seed, *pair_key))
        if key is not None:
            inputs_BT, targets_BT = self.masker(x_BT, generator=mlm_generator(self.seed, 0, *key))
        else:
            rows = [self.masker(x_1T, generator=mlm_generator(self.seed, 1, content_key(x_1T)))
                    for x_1T in x_BT.split(1)]
            inputs_BT, targets_BT = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        if self.nsp:
            return inputs_BT, token_types_BT, nsp_labels_B, targets_BT
        return inputs_BT, targets_BT

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
        x_BT, *pairs, targets_BT = batch  # pairs: (token_types_BT, nsp_labels_B) with nsp, else nothing
        nsp = dict(zip(("token_type_ids_BT", "nsp_labels_B"), pairs))
        out = model(x_BT, targets_BT, loss_reduction="sum", return_logits=False, **nsp)
        return out.loss, int((targets_BT != -100).sum()), out


def classification(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """Sequence classification: (ids_BT, mask_BT, labels_B) -> cross-entropy summed over the labelled rows.
    An encoder pools its first position, a decoder the last real one (models/bert.py, models/gpt.py)."""
    ids_BT, mask_BT, labels_B = batch
    out = model(ids_BT, labels_B=labels_B, loss_reduction="sum", **padding_mask(model, mask_BT))
    return out.loss, int((labels_B != -100).sum()), out


def seq2seq_lm(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]):
    """Teacher-forced target prediction for an encoder-decoder: (src_BS, src_mask_BS, tgt_in_BT, targets_BT)."""
    src_BS, src_mask_BS, tgt_in_BT, targets_BT = batch
    out = model(src_BS, tgt_in_BT, targets_BT, src_mask_BS=src_mask_BS, loss_reduction="sum")
    return out.loss, int((targets_BT != -100).sum()), out


# sft is causal_lm on conversations whose prompt tokens are -100 (data/tasks.py)
OBJECTIVES = {"causal_lm": causal_lm, "classify": classification, "seq2seq": seq2seq_lm, "sft": causal_lm}


@torch.no_grad()
def summed_loss(objective, model: torch.nn.Module, batches, device: torch.device, bf16: bool) -> tuple[float, int]:
    """(sum of per-token losses, valid tokens) of `objective` over `batches`: for validation and evaluation."""
    loss_sum, count = 0.0, 0
    for batch in batches:
        if hasattr(objective, "prepare"):  # e.g. MLM masking, seeded by the batch's tokens
            batch = objective.prepare(batch, None)
        batch = tuple(t.to(device) for t in batch)
        with autocast(device, bf16):
            batch_loss, n, _ = objective(model, batch)
        loss_sum += float(batch_loss)
        count += n
    return loss_sum, count


def score_split(lm, data: TokenDataset, eot_id: int) -> dict:
    """Per-prediction loss (nats; </s> counted, as KenLM does), perplexity and bits per byte of a split.

    A token model predicts exactly the split's tokens (an <|endoftext|> as </s>), as a neural model's
    `choicelm evaluate` does; a word model predicts the split's words and one </s> per line."""
    if lm.kind == "words":
        logp_total, count = lm.score([lm.words.encode(line) for line in text_lines(data)])
        method = f"lines of words ({lm.order}-gram, {lm.smoothing})"
    else:
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in data.shards])  # a document may span shards
        logp_total, count = score_stream(lm, ids, eot_id)
        method = f"documents ({lm.order}-gram, {lm.smoothing})"
    nats = -logp_total
    if count == 0:
        raise ChoicelmError(f"split '{data.split}' of {data.dir} has nothing to score")
    loss = nats / count
    n_bytes = data.manifest["splits"][data.split].get("bytes")
    result = {"split": data.split, "tokens": count, "loss": loss, "ppl": math.exp(loss), "method": method}
    if n_bytes:
        result["bits_per_byte"] = nats / math.log(2) / n_bytes
    return result
