"""Masked-language-model inputs (BERT): pick 15% of the maskable tokens, corrupt them, predict the originals.

    masker = MLMMasker.from_tokenizer(tok)
    x_BT, targets_BT = masker(ids_BT, generator=mlm_generator(seed, step, micro_batch))

Each token that is not a special token (end of text, padding, mask, ...) and not padding (attention mask 0)
is selected with probability 0.15, independently (as Hugging Face's DataCollatorForLanguageModeling). Of
the selected: 80% become <|mask|>, 10% a uniformly random non-special token, 10% stay as they are (BERT,
Devlin et al. 2019, section 3.1). targets hold the original id at selected positions, -100 elsewhere.
Every random number comes from the given torch.Generator (on the CPU), so the masks are a pure function
of (ids, seed): a resumed run masks exactly as the uninterrupted one did.

Next-sentence prediction (model.nsp, BERT's second pretraining task) builds sentence pairs before masking:

    ids_BT, token_types_BT, nsp_labels_B = next_sentence_pairs(ids_BT, generator=mlm_generator(seed, step, mb))

Each window is split at a random point into segment A (token type 0) and B (type 1); half the time B is replaced
by a same-length slice of another window of the batch. Label 0 = B follows A, 1 = B is random (Hugging Face's
BertForPreTraining convention). The windows are raw text, with no [CLS]/[SEP]: the token types alone mark the
segments, and the pooler reads the first position.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import ChoicelmError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MLMMasker:
    """BERT's masking rule for a vocabulary. vocab_size: the tokenizer's (random replacements are drawn from
    its non-special ids, never from the padding rows a model's embedding may have beyond it)."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.probability <= 1.0:
            raise ChoicelmError(f"MLM probability {self.probability} must be in (0, 1]")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ChoicelmError(f"MLM mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} "
                                "must be >= 0 and sum to at most 1 (the rest stays unchanged)")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ChoicelmError(f"mask id {self.mask_id} is outside the vocabulary of {self.vocab_size} tokens")
        if self.mask_id not in self.special_ids:
            object.__setattr__(self, "special_ids", tuple(self.special_ids) + (self.mask_id,))
        if len(set(self.special_ids)) >= self.vocab_size:
            raise ChoicelmError("the vocabulary has no non-special token to mask or to draw at random")

    @classmethod
    def from_tokenizer(cls, tokenizer, **rates) -> "MLMMasker":
        """The masker for a choicelm Tokenizer: its <|mask|> token and all its special tokens."""
        if tokenizer.mask_id is None:
            raise ChoicelmError("masked-LM training needs a mask token, and this tokenizer has none; train the "
                                "tokenizer with `choicelm tokenizer train` (it adds <|mask|>) or name a mask_token in "
                                "its tokenizer_config.json")
        special = sorted(i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special)
        return cls(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size, special_ids=tuple(special), **rates)

    def __call__(self, ids_BT: torch.Tensor, generator: torch.Generator,
                 attention_mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) for token ids [B, T] (any integer dtype, any device).
        attention_mask_BT: 1 = token, 0 = padding (never selected)."""
        ids_cpu = ids_BT.detach().to("cpu", torch.long)
        special = torch.tensor(self.special_ids, dtype=torch.long)
        maskable_BT = ~torch.isin(ids_cpu, special)
        if attention_mask_BT is not None:
            maskable_BT &= attention_mask_BT.detach().to("cpu", torch.bool)
        # Three draws per position, always all of them (so the stream does not depend on the outcome).
        u_select_BT = torch.rand(ids_cpu.shape, generator=generator)
        u_action_BT = torch.rand(ids_cpu.shape, generator=generator)
        allowed = torch.tensor(sorted(set(range(self.vocab_size)) - set(self.special_ids)), dtype=torch.long)
        random_BT = allowed[torch.randint(len(allowed), ids_cpu.shape, generator=generator)]

        selected_BT = maskable_BT & (u_select_BT < self.probability)
        to_mask_BT = selected_BT & (u_action_BT < self.mask_fraction)
        to_random_BT = selected_BT & ~to_mask_BT & (u_action_BT < self.mask_fraction + self.random_fraction)
        inputs_BT = torch.where(to_mask_BT, self.mask_id, ids_cpu)
        inputs_BT = torch.where(to_random_BT, random_BT, inputs_BT)
        targets_BT = torch.where(selected_BT, ids_cpu, IGNORE_INDEX)
        return inputs_BT.to(ids_BT.device), targets_BT.to(ids_BT.device)


def next_sentence_pairs(ids_BT: torch.Tensor, generator: torch.Generator, attention_mask_BT: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's next-sentence pairs from a batch of windows: (ids_BT, token_type_ids_BT, nsp_labels_B).

    Row i's real tokens [0, L) are split at s, uniform in 1..L-1: segment A = [0, s) gets token type 0, segment
    B = [s, L) type 1, padding type 0. With probability 0.5, B is replaced by L - s consecutive real tokens of
    another row j (uniform over the other rows with at least L - s real tokens, from a uniform start) and the
    label is 1; otherwise B stays the row's own continuation and the label is 0. A row that cannot make a pair
    keeps its tokens, type 0 throughout, and label -100 (ignored): fewer than 2 real tokens, a batch of one
    window (no other window to draw from), or a random B that no other row is long enough to give (never with
    the training loop's full windows).

    attention_mask_BT: 1 = token, 0 = padding; padding must come after each row's tokens (right padding), and
    neither segment nor a replacement slice ever includes it. Four draws per row, always all of them, so the
    pairs are a pure function of (ids, generator seed), like the masks.
    """
    ids_cpu = ids_BT.detach().to("cpu", torch.long)
    B, T = ids_cpu.shape
    pos_T = torch.arange(T)
    len_B = torch.full((B,), T)
    if attention_mask_BT is not None:
        mask_BT = attention_mask_BT.detach().to("cpu", torch.bool)
        len_B = mask_BT.sum(1)
        if not torch.equal(mask_BT, pos_T < len_B[:, None]):
            raise ChoicelmError("next-sentence pairs need right padding: each row's tokens first, then its padding "
                                "(attention mask 1...1 0...0)")
    u_split_B, u_coin_B, u_donor_B, u_start_B = torch.rand(4, B, generator=generator, dtype=torch.float64)
    split_B = 1 + (u_split_B * (len_B - 1).clamp(min=0)).long()  # 1..L-1 (fp64: never rounds up to L)
    b_len_B = len_B - split_B
    # donors of row i: the other rows with at least len(B) real tokens; the u_donor-th of them
    donors_BB = (len_B[None, :] >= b_len_B[:, None]) & ~torch.eye(B, dtype=torch.bool)
    n_donors_B = donors_BB.sum(1)
    rank_B = (u_donor_B * n_donors_B).long()
    donor_B = (donors_BB.long().cumsum(1) > rank_B[:, None]).long().argmax(1)
    room_B = len_B[donor_B] - b_len_B  # the donor's start positions for the slice, minus one
    start_B = (u_start_B * (room_B + 1).clamp(min=1)).long()
    pairable_B = (len_B >= 2) & (B > 1)
    coin_B = u_coin_B < 0.5
    random_B = pairable_B & coin_B & (n_donors_B > 0)
    labels_B = torch.where(random_B, 1, 0)
    labels_B[~pairable_B | (coin_B & (n_donors_B == 0))] = IGNORE_INDEX

    in_b_BT = (labels_B != IGNORE_INDEX)[:, None] & (pos_T >= split_B[:, None]) & (pos_T < len_B[:, None])
    take_BT = in_b_BT & random_B[:, None]
    src_row_BT = torch.where(take_BT, donor_B[:, None], torch.arange(B)[:, None])
    src_pos_BT = torch.where(take_BT, start_B[:, None] + pos_T - split_B[:, None], pos_T)
    pairs_BT = ids_cpu[src_row_BT, src_pos_BT]
    device = ids_BT.device
    return pairs_BT.to(device), in_b_BT.long().to(device), labels_B.to(device)


def mlm_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of non-negative ints, e.g. (train.seed, step, micro-batch index)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def content_key(ids_BT: torch.Tensor) -> int:
    """A stable key from the token ids themselves (CRC-32): validation batches mask the same way every
    evaluation, whatever order they come in."""
    return zlib.crc32(ids_BT.detach().to("cpu", torch.int64).numpy().tobytes())
