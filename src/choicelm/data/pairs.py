"""Source -> target pairs of token ids -> padded teacher-forcing batches for an encoder-decoder.

    pairs = PairDataset([([5, 6, 7], [7, 6, 5]), ...], start_id=1, eos_id=2, pad_id=0)
    for batch in pairs.batches(batch_size=32, seed=0, epoch=0):
        out = model(batch.src_BS, batch.tgt_in_BT, batch.targets_BT, src_mask_BS=batch.src_mask_BS)

For a pair (src, tgt) a batch row holds (sources right-padded, so positions count from the first token):

    src_BS      src + pad...                  src_mask_BS  1 on src, 0 on padding
    tgt_in_BT   [start] + tgt + pad...        decoder input (teacher forcing)
    targets_BT  tgt + [eos] + -100...         what each decoder position must predict; -100 = ignored

Batching is deterministic: the order of an epoch is a permutation drawn from (seed, epoch), so the same
seed gives the same batches on any machine, and a run can resume at (epoch, batch index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..core.errors import ChoicelmError

IGNORE_INDEX = -100


@dataclass
class PairBatch:
    src_BS: torch.Tensor       # long [B, S]
    src_mask_BS: torch.Tensor  # bool [B, S], True = real token
    tgt_in_BT: torch.Tensor    # long [B, T]
    targets_BT: torch.Tensor   # long [B, T], -100 on padding

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device) for t in (self.src_BS, self.src_mask_BS, self.tgt_in_BT, self.targets_BT)))

    @property
    def n_target_tokens(self) -> int:
        return int((self.targets_BT != IGNORE_INDEX).sum())


class PairDataset:
    """A list of (source ids, target ids) pairs, validated once.

    start_id:  the decoder's first input token (BOS, or Marian's pad as decoder start).
    eos_id:    appended to every target: the model learns to stop.
    pad_id:    fills source and decoder-input padding (never attended / never a target).
    max_src_len, max_tgt_len: longer sources are cut to max_src_len; targets to max_tgt_len tokens before
               the EOS (0 = no limit). Cutting is explicit here so a batch never exceeds the block size.
    vocab_size: if given, every id must be below it.
    """

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, start_id: int, eos_id: int,
                 pad_id: int = 0, max_src_len: int = 0, max_tgt_len: int = 0, vocab_size: int | None = None):
        self.start_id, self.eos_id, self.pad_id = start_id, eos_id, pad_id
        self.pairs: list[tuple[list[int], list[int]]] = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ChoicelmError(f"pair {i} is not a (source ids, target ids) pair; got {type(pair).__name__}")
            src, tgt = list(pair[0]), list(pair[1])
            if not src:
                raise ChoicelmError(f"pair {i} has an empty source; drop it or give at least one source token")
            if max_src_len:
                src = src[:max_src_len]
            if max_tgt_len:
                tgt = tgt[:max_tgt_len]
            for side, ids in (("source", src), ("target", tgt)):
                if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
                    raise ChoicelmError(f"pair {i}: the {side} must be non-negative integer token ids")
                if vocab_size is not None and ids and max(ids) >= vocab_size:
                    raise ChoicelmError(f"pair {i}: {side} token id {max(ids)} is not below the vocabulary size "
                                        f"{vocab_size}; tokenize with the model's tokenizer")
            self.pairs.append((src, tgt))
        if not self.pairs:
            raise ChoicelmError("no pairs given; a pair dataset needs at least one (source, target) pair")

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, indices: Sequence[int]) -> PairBatch:
        """The padded batch of these pairs, in this order."""
        rows = [self.pairs[i] for i in indices]
        B = len(rows)
        S = max(len(src) for src, _ in rows)
        T = max(len(tgt) for _, tgt in rows) + 1
        src_BS = torch.full((B, S), self.pad_id, dtype=torch.long)
        src_mask_BS = torch.zeros(B, S, dtype=torch.bool)
        tgt_in_BT = torch.full((B, T), self.pad_id, dtype=torch.long)
        targets_BT = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, (src, tgt) in enumerate(rows):
            src_BS[b, :len(src)] = torch.tensor(src, dtype=torch.long)
            src_mask_BS[b, :len(src)] = True
            tgt_in_BT[b, :len(tgt) + 1] = torch.tensor([self.start_id] + tgt, dtype=torch.long)
            targets_BT[b, :len(tgt) + 1] = torch.tensor(tgt + [self.eos_id], dtype=torch.long)
        return PairBatch(src_BS, src_mask_BS, tgt_in_BT, targets_BT)

    def order(self, seed: int, epoch: int = 0, shuffle: bool = True) -> list[int]:
        """The pair indices of one epoch: a permutation drawn from (seed, epoch), or 0..n-1 unshuffled."""
        if not shuffle:
            return list(range(len(self)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def batches(self, batch_size: int, seed: int = 0, epoch: int = 0, *, shuffle: bool = True,
                drop_last: bool = False, start: int = 0) -> Iterator[PairBatch]:
        """The batches of one epoch, from batch index `start` (to resume). The last batch may be short
        unless drop_last."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ChoicelmError(f"batch_size={batch_size!r} must be a positive integer")
        idx = self.order(seed, epoch, shuffle)
        n = len(idx) // batch_size if drop_last else -(-len(idx) // batch_size)
        for b in range(start, n):
            yield self.collate(idx[b * batch_size:(b + 1) * batch_size])
