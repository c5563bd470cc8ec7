"""Token shards -> language-model batches: deterministic, resumable and rank-aware.

    train = TokenDataset("data/", "train")
    sampler = LMBatchSampler(train, block_size=256, micro_batch_size=8, global_batch_size=32, seed=1337,
                             rank=rank, world_size=world_size)
    for x_BT, y_BT in sampler.next_step():    # this rank's micro-batches of one optimizer step
        ...
    state = sampler.state_dict()              # store with the checkpoint; load_state_dict resumes

A sample is a window of block_size+1 consecutive tokens inside one shard (x = the first
block_size, y = the same shifted by one). Windows do not overlap: they start at 0, block_size,
2*block_size, ... of each shard. Sample order depends only on the global sample index g:
epoch = g // n_windows, window = permutation(seed, epoch)[g % n_windows]. Optimizer step s takes
samples s*G .. s*G+G-1 and rank r the r-th contiguous slice of them, so the data a step sees is
the same on 1 process or on W (only who computes which part changes), and a resume is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..core.errors import ChoicelmError

FORMAT_VERSION = 1


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Read and check data_dir/manifest.json, written by `prepare`. Its fields:

    format "choicelm-tokens", version 1, created_by
    dtype "uint16" | "uint32", byteorder "little"     the shards' element type
    vocab_size, eot_id                                 of the tokenizer (eot ends every document)
    tokenizer {dir: "tokenizer", sha256, kind}         the copy in data_dir/tokenizer/
    val_method "files" | "fraction-files" | "fraction-tokens" | "none", val_fraction
    skipped_files [path]                               inputs left out as not UTF-8 (errors=skip)
    splits {train: S, val: S}                          val only when val_method != "none"
      S = {tokens, bytes (UTF-8 bytes of text, eot excluded: for bits per byte), documents,
           files [source path], shards [{file, tokens}]}
    """
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise ChoicelmError(f"no manifest.json in {data_dir}; create the data folder with `choicelm prepare`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        ok = (manifest.get("format") == "choicelm-tokens" and isinstance(manifest.get("splits"), dict)
              and all(isinstance(s.get("shards"), list) for s in manifest["splits"].values()))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise ChoicelmError(f"{path} is damaged or not a choicelm manifest; run `choicelm prepare` again")
    if manifest.get("version") != FORMAT_VERSION:
        raise ChoicelmError(f"{path} has format version {manifest.get('version')}, this choicelm reads "
                            f"version {FORMAT_VERSION}; run `choicelm prepare` again")
    return manifest


class TokenDataset:
    """One split of a prepared data folder: its shards memory-mapped read-only, cut into windows."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.dir)
        splits = self.manifest["splits"]
        if split not in splits:
            hint = ("it was prepared without a validation split; run `choicelm prepare` again with "
                    "--val-files or --val-fraction") if split == "val" else f"choose one of {', '.join(splits)}"
            raise ChoicelmError(f"data folder {self.dir} has no '{split}' split; {hint}")
        info = splits[split]
        self.tokens: int = info["tokens"]
        self.bytes: int = info["bytes"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eot_id: int = self.manifest["eot_id"]
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shard_tokens = [s["tokens"] for s in info["shards"]]
        # One read-only map per shard for the dataset's lifetime. nanoGPT re-creates its memmap
        # every batch because a long-lived one seemed to "leak": the pages it touched count in the
        # process's RSS. Those pages are clean, file-backed page cache that the kernel drops under
        # memory pressure, so they cannot exhaust memory; the real hazard is a tensor that keeps a
        # view into the map, which `window` avoids by copying every window out.
        self.shards = [self._open(s["file"], s["tokens"]) for s in info["shards"]]
        self._window_ends: dict[int, np.ndarray] = {}  # block_size -> cumulative windows per shard

    def _open(self, name: str, tokens: int) -> np.memmap:
        path = self.dir / name
        expected = tokens * self.dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise ChoicelmError(f"shard {path} {found} but the manifest says {tokens:,} tokens ({expected:,} "
                                f"bytes); the data folder is damaged, run `choicelm prepare` again")
        shard = np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,))
        # Right size, wrong content (random bytes, another tokenizer's shard): one pass over the map (page cache
        # speed, ~0.1 s per 128 MB shard) finds an id the model has no embedding for, before training reads it.
        top = int(shard.max()) if tokens else 0
        if top >= self.vocab_size:
            raise ChoicelmError(f"shard {path} holds token id {top:,} but the vocabulary has {self.vocab_size:,} "
                                f"tokens; the data folder is damaged or mixed with another tokenizer's shards, run "
                                f"`choicelm prepare` again")
        return shard

    def __len__(self) -> int:
        return self.tokens

    def windows_per_shard(self, block_size: int) -> np.ndarray:
        """Windows of block_size+1 tokens that start every block_size tokens, in each shard."""
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ChoicelmError(f"block_size={block_size!r} must be a positive integer")
        return np.array([max(0, (n - 1) // block_size) for n in self.shard_tokens], dtype=np.int64)

    def n_windows(self, block_size: int) -> int:
        """Number of windows; at least 1, else ChoicelmError."""
        n = int(self.windows_per_shard(block_size).sum())
        if n < 1:
            raise ChoicelmError(f"the {self.split} split of {self.dir} has {self.tokens:,} tokens but a sample "
                                f"needs block_size+1 = {block_size + 1:,} consecutive tokens in one shard; "
                                f"lower block_size or add text")
        return n

    def window(self, index: int, block_size: int) -> np.ndarray:
        """Window `index` (0 <= index < n_windows): block_size+1 tokens as a new int64 array."""
        if block_size not in self._window_ends:
            self._window_ends[block_size] = np.cumsum(self.windows_per_shard(block_size))
        ends = self._window_ends[block_size]
        shard = int(np.searchsorted(ends, index, side="right"))
        if not 0 <= index < (ends[-1] if len(ends) else 0):
            raise IndexError(f"window {index} out of range")
        start = (index - (ends[shard - 1] if shard else 0)) * block_size
        return np.array(self.shards[shard][start:start + block_size + 1], dtype=np.int64)

    def batch(self, indices: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BT, y_BT) int64 tensors for the windows `indices`; y is x shifted left by one."""
        rows_BT1 = torch.from_numpy(np.stack([self.window(int(i), block_size) for i in indices]))
        return rows_BT1[:, :-1].contiguous(), rows_BT1[:, 1:].contiguous()

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.dir)!r}, {self.split!r}, tokens={self.tokens:,}, shards={len(self.shards)})"


class LMBatchSampler:
    """Deterministic, resumable, world-size independent batches of windows (see the module doc)."""

    def __init__(self, dataset: TokenDataset, block_size: int, micro_batch_size: int,
                 global_batch_size: int | None, seed: int, rank: int = 0, world_size: int = 1):
        global_batch_size = global_batch_size or micro_batch_size * world_size  # 0/None: no accumulation
        for name, value in (("micro_batch_size", micro_batch_size), ("global_batch_size", global_batch_size),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChoicelmError(f"{name}={value!r} must be a positive integer")
        if not 0 <= rank < world_size:
            raise ChoicelmError(f"rank={rank} must be in [0, world_size={world_size})")
        if global_batch_size % (world_size * micro_batch_size):
            raise ChoicelmError(f"global_batch_size={global_batch_size} must be divisible by world_size x "
                                f"micro_batch_size = {world_size} x {micro_batch_size}; change one of them")
        self.dataset = dataset
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.n_windows = dataset.n_windows(block_size)
        self.step = 0  # the next optimizer step to serve
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step over all ranks (targets, i.e. G x block_size)."""
        return self.global_batch_size * self.block_size

    @property
    def micro_steps(self) -> int:
        """Micro-batches per optimizer step on each rank (gradient accumulation steps)."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    def window_of(self, g: int) -> int:
        """The window global sample g reads."""
        epoch, i = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_epoch, self._perm = epoch, rng.permutation(self.n_windows)
        return int(self._perm[i])

    def step_windows(self, step: int) -> list[int]:
        """This rank's windows for optimizer step `step`, in micro-batch order."""
        per_rank = self.global_batch_size // self.world_size
        first = step * self.global_batch_size + self.rank * per_rank
        return [self.window_of(g) for g in range(first, first + per_rank)]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches [(x_BT, y_BT), ...] for the next optimizer step."""
        windows = self.step_windows(self.step)
        self.step += 1
        m = self.micro_batch_size
        return [self.dataset.batch(windows[i:i + m], self.block_size) for i in range(0, len(windows), m)]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "block_size": self.block_size, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. Seed, block size and data must match; a different
        global batch size is accepted when the samples already seen fill whole new steps."""
        for key in ("seed", "block_size", "n_windows"):
            if key in state and state[key] != getattr(self, key):
                raise ChoicelmError(f"cannot resume the data order: the checkpoint has {key}={state[key]}, this "
                                    f"run has {getattr(self, key)}; use the same value to resume")
        seen = int(state["step"]) * int(state.get("global_batch_size", self.global_batch_size))
        if seen % self.global_batch_size:
            raise ChoicelmError(f"cannot resume: {seen} samples were seen, not a whole number of steps of "
                                f"global_batch_size={self.global_batch_size}; resume with the checkpoint's "
                                f"global_batch_size={state.get('global_batch_size')}")
        self.step = seen // self.global_batch_size


class StreamBatchSampler(LMBatchSampler):
    """Batches for recurrent models trained with truncated back-propagation through time.

    The global batch is G parallel streams over the training windows: stream r reads windows
    r*L, r*L+1, ... (L = n_windows // G), so row r of step s+1 is the text right after row r of
    step s, and the model's state carries over from one step to the next. Every rank and
    micro-batch slot keeps the same streams at every step. After L steps the streams start over.
    Windows are consecutive within a shard; across shard ends the text jumps, as it does between
    documents. Same interface, resume and world-size independence as LMBatchSampler.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.n_windows < self.global_batch_size:
            raise ChoicelmError(f"{self.n_windows} windows of block_size={self.block_size} cannot fill "
                                f"{self.global_batch_size} parallel streams; lower the batch size or block_size")
        self.stream_len = self.n_windows // self.global_batch_size

    def window_of(self, g: int) -> int:
        step, stream = divmod(g, self.global_batch_size)
        return stream * self.stream_len + step % self.stream_len


def eval_batches(dataset: TokenDataset, block_size: int, micro_batch_size: int, max_batches: int | None,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first windows of `dataset` in order, as (x_BT, y_BT) micro-batches: the same every call.

    The evaluated set is the first max_batches x micro_batch_size windows (all of them for None),
    whatever the number of processes: rank r reads windows r, r+W, r+2W, ... of that set. Ranks may
    get one window more or less than each other, so combine them by summing losses and token
    counts. The last micro-batch may be smaller."""
    if (max_batches is not None and max_batches < 1) or micro_batch_size < 1:
        raise ChoicelmError(f"max_batches={max_batches} and micro_batch_size={micro_batch_size} must be >= 1")
    n = dataset.n_windows(block_size)
    total = n if max_batches is None else min(n, max_batches * micro_batch_size)
    windows = list(range(rank, total, world_size))
    # A generator inside, so that the checks above fail at the call, not at the first next().
    return (dataset.batch(windows[i:i + micro_batch_size], block_size)
            for i in range(0, len(windows), micro_batch_size))


def split_documents(data: TokenDataset, eot_id: int) -> list[np.ndarray]:
    """The split's token stream cut at <|endoftext|> (dropped: the model's </s> stands for it)."""
    docs = []
    for shard in data.shards:
        ids = np.asarray(shard, dtype=np.int64)
        cuts = np.flatnonzero(ids == eot_id)
        start = 0
        for cut in cuts:
            docs.append(ids[start:cut])
            start = cut + 1
        if start < len(ids):
            docs.append(ids[start:])
    return docs


def text_lines(data: TokenDataset) -> list[str]:
    """The non-blank lines of the split's source text files (word models)."""
    lines = []
    for name in data.manifest["splits"][data.split]["files"]:
        path = Path(name)
        if not path.is_file():
            raise ChoicelmError(f"a word n-gram reads the source text, but {path} (listed in {data.dir}/manifest.json) "
                                "is gone; restore it or use ngram.tokenizer=data")
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines
