"""Text -> token shards (`prepare`) -> deterministic, resumable, rank-aware LM batches (`loader`)."""

from .loader import LMBatchSampler, TokenDataset, eval_batches, read_manifest
from .prepare import prepare

__all__ = ["LMBatchSampler", "TokenDataset", "eval_batches", "prepare", "read_manifest"]
