"""Fair perplexity (evaluation/perplexity.py): every model kind scores exactly the N tokens of a split, preceded by a
virtual <|endoftext|>; a GPT through strided windows, checked here against one forward pass per token over
exactly the context the stride rule gives it; an LSTM with its state carried; an n-gram by documents."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from choicelm.api import LanguageModel
from choicelm.cli import main
from choicelm.core.config import Config
from choicelm.data.loader import TokenDataset
from choicelm.data.prepare import prepare
from choicelm.core.errors import ChoicelmError
from choicelm.evaluation.perplexity import compare, evaluate, format_table, perplexity, unigram_perplexity
from choicelm.models import build_model
from choicelm.models.ngram import NGramLM
from choicelm.text import Tokenizer
from choicelm.data.loader import split_documents
from choicelm.objectives import score_split

from conftest import TINY

T = 16  # block size of the tiny models


@pytest.fixture(scope="module")
def small(prepared, shakespeare_slice, tmp_path_factory):
    """(tokenizer dir, data dir): a few KB of text in 100-token shards (documents span shards); the val split is
    two short documents."""
    tok_dir, _ = prepared
    root = tmp_path_factory.mktemp("small")
    texts = {p.name: p.read_text(encoding="utf-8") for p in shakespeare_slice}
    files = {"a.txt": texts["macbeth_gut.txt"][5000:25000], "b.txt": texts["sonnets_gut.txt"][5000:25000],
             "v1.txt": texts["tempest_gut.txt"][5000:5900], "v2.txt": texts["tempest_gut.txt"][9000:9500]}
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    prepare([root / n for n in files], tok_dir, root / "data", val_files=["v1.txt", "v2.txt"], shard_tokens=100)
    return tok_dir, root / "data"


def tiny_lm(tok_dir, kind="gpt", block_size=T, seed=0) -> LanguageModel:
    """A random model whose outputs depend strongly on the context (large weights), in eval mode, fp32."""
    cfg = Config.from_dict({"model": dict(kind=kind, vocab_size=512, block_size=block_size, n_layer=2, n_head=2,
                                          n_embd=32, dropout=0.0)})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return LanguageModel(model.eval(), Tokenizer.load(tok_dir), cfg, Path("."))


def stream(data_dir, split="val") -> np.ndarray:
    """<|endoftext|> + the split's shards, read with numpy."""
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    shards = [np.fromfile(Path(data_dir) / s["file"], dtype=np.uint16) for s in manifest["splits"][split]["shards"]]
    return np.concatenate([[manifest["eot_id"]]] + shards).astype(np.int64)


@torch.no_grad()
def nll_given(model, s: np.ndarray, t: int, start: int) -> float:
    """-log p(s[t] | s[start:t]), one forward pass over exactly that context."""
    logits = model(torch.from_numpy(s[start:t])[None]).logits[0, -1]
    return -float(F.log_softmax(logits.double(), -1)[s[t]])


def test_strided_loss_equals_one_forward_per_token_with_the_stride_rule_context(small):
    tok_dir, data = small
    lm = tiny_lm(tok_dir)
    s = stream(data)
    N = len(s) - 1
    assert N > 3 * T and (N - T) % 5  # several windows, and a last window that is not on the stride grid
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["splits"]["val"]["shards"]) > 1 and (s[1:-1] == s[0]).any()  # shards and documents
    for stride in (5, T // 2):
        # Target t (1..N) is scored by the first window covering it: windows start at 0, stride, 2 stride, ...
        # and the last one at N - T; so its context starts at min(k stride, N - T), k the first that reaches t.
        starts = [0 if t <= T else min(math.ceil((t - T) / stride) * stride, N - T) for t in range(1, N + 1)]
        expected = sum(nll_given(lm.model, s, t, b) for t, b in zip(range(1, N + 1), starts)) / N
        result = perplexity(lm, data, stride=stride, batch_size=3)
        assert result["tokens"] == N
        assert result["loss"] == pytest.approx(expected, abs=1e-5)
        assert result["method"] == f"strided, stride {stride}, block {T}"


def test_stride_one_gives_every_token_its_full_context(small):
    tok_dir, data = small
    lm = tiny_lm(tok_dir)
    s = stream(data)
    N = len(s) - 1
    # the i-th token of the split (t = i + 1 in the stream) sees the min(i + 1, T) stream tokens before it:
    # the virtual <|endoftext|> and the split so far, or the last T tokens
    expected = sum(nll_given(lm.model, s, t, max(0, t - T)) for t in range(1, N + 1)) / N
    result = perplexity(lm, data, stride=1, batch_size=64)
    assert result["tokens"] == N and result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["bits_per_byte"] == pytest.approx(expected / math.log(2) * N
                                                    / TokenDataset(data, "val").bytes, rel=1e-6)


@torch.no_grad()
def test_stride_of_block_size_is_the_old_non_overlapping_windows(small):
    tok_dir, data = small
    lm = tiny_lm(tok_dir)
    s = stream(data)
    N = len(s) - 1
    # The old figure, by hand: complete non-overlapping windows of T + 1 tokens (over the stream with its BOS).
    n = N // T
    x = torch.from_numpy(np.stack([s[i * T:i * T + T] for i in range(n)]))
    y = torch.from_numpy(np.stack([s[i * T + 1:i * T + T + 1] for i in range(n)]))
    old_sum = F.cross_entropy(lm.model(x).logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    capped = perplexity(lm, data, stride=T, batch_size=1, max_batches=n)
    assert capped["tokens"] == n * T and capped["loss"] == pytest.approx(old_sum / (n * T), abs=1e-5)
    assert capped["method"] == f"strided, stride {T}, block {T}, first {n} of {n + (N % T > 0)} windows"
    # The whole split adds the tokens the old windows dropped, from one last window aligned to the end.
    tail = sum(nll_given(lm.model, s, t, N - T) for t in range(n * T + 1, N + 1))
    full = perplexity(lm, data, stride=T)
    assert full["tokens"] == N and full["loss"] == pytest.approx((old_sum + tail) / N, abs=1e-5)


@torch.no_grad()
def test_lstm_carries_its_state_through_the_whole_split(small):
    tok_dir, data = small
    lm = tiny_lm(tok_dir, kind="lstm")
    s = torch.from_numpy(stream(data))
    N = len(s) - 1
    expected = F.cross_entropy(lm.model(s[None, :-1]).logits[0], s[1:]).item()  # one pass, all the context
    result = perplexity(lm, data)
    assert result["tokens"] == N and result["loss"] == pytest.approx(expected, abs=1e-5)
    assert result["method"] == f"state carried through the split, chunks of {T}"
    first = perplexity(lm, data, batch_size=1, max_batches=1)  # the first chunk: the <|endoftext|> weighs more
    assert first["tokens"] == T and first["loss"] == pytest.approx(F.cross_entropy(
        lm.model(s[None, :T]).logits[0], s[1:T + 1]).item(), abs=1e-6)
    assert first["method"].endswith(f", first 1 of {math.ceil(N / T)} chunks")


@pytest.mark.parametrize("split", ["val", "train"])
def test_every_kind_scores_the_same_tokens(small, tmp_path, split):
    """On val (ends with <|endoftext|>) and on a train split that stops mid-document (--val-fraction cuts the
    token stream), the n-gram, GPT, LSTM and unigram all score the split's N tokens."""
    tok_dir, small_data = small
    manifest = json.loads((small_data / "manifest.json").read_text())
    files = [f for f in manifest["splits"]["train"]["files"]]
    data = tmp_path / "cut"
    m = prepare(files, tok_dir, data, val_fraction=0.1, shard_tokens=1000)
    assert m["val_method"] == "fraction-tokens"
    train, test = TokenDataset(data, "train"), TokenDataset(data, split)
    assert (np.asarray(test.shards[-1])[-1] == test.eot_id) == (split == "val")
    ngram = NGramLM.fit(split_documents(train, train.eot_id), 3, vocab_size=train.vocab_size, discount_fallback=True)
    counted = score_split(ngram, test, test.eot_id)
    gpt = perplexity(tiny_lm(tok_dir), data, split, stride=T, batch_size=64)
    lstm = perplexity(tiny_lm(tok_dir, kind="lstm", block_size=64), data, split)
    assert counted["tokens"] == gpt["tokens"] == lstm["tokens"] == len(test)
    assert counted["method"] == "documents (3-gram, kneser_ney)"
    # the n-gram by hand: each document's tokens, </s> for each <|endoftext|>, none after a cut-off last document
    s = stream(data, split)[1:]
    docs = np.split(s, np.flatnonzero(s == test.eot_id) + 1)
    nats = -sum(ngram.logprob(d[:-1] if d[-1] == test.eot_id else d, eos=d[-1] == test.eot_id).sum()
                for d in docs if len(d))
    assert counted["loss"] == pytest.approx(nats / len(test), rel=1e-9)
    assert counted["bits_per_byte"] == pytest.approx(nats / math.log(2) / test.bytes, rel=1e-9)
    if split == "val":
        assert gpt["unigram_ppl"] == pytest.approx(unigram_perplexity(train, test))


@pytest.fixture(scope="module")
def runs(small, tmp_path_factory):
    """A GPT trained for a few steps and a counted 3-gram on the small data."""
    _, data = small
    root = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", "--config", str(TINY), "--data", str(data), "--out", str(root / "gpt"),
                 "--train.max_steps=3", "--train.eval_every=0"]) == 0
    assert main(["pretrain", "--config", "configs/ngram.yaml", "--data", str(data), "--out", str(root / "kn3"),
                 "--ngram.discount_fallback=true"]) == 0
    return root / "gpt", root / "kn3"


def test_cli_compares_several_checkpoints_in_one_table(small, runs, capsys):
    _, data = small
    gpt, kn3 = runs
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(kn3), str(gpt), "--data", str(data), "--stride", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | scored tokens | ppl | bits per byte | method |" and len(lines) == 5
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["add-one unigram", str(kn3), str(gpt)]
    n = TokenDataset(data, "val").tokens
    assert {c[1] for c in cells} == {f"{n:,}"}  # the same tokens for every row
    assert cells[1][4] == "documents (3-gram, kneser_ney)" and cells[2][4] == "strided, stride 8, block 32"
    rows = compare([kn3, gpt], data, stride=8)  # the Python API gives the same rows
    one = evaluate(gpt, data, ["ppl"], stride=8)
    assert rows[2]["ppl"] == pytest.approx(one["ppl"]) and f"{rows[2]['ppl']:.2f}" == cells[2][2]
    assert rows[0]["ppl"] == pytest.approx(one["unigram_ppl"]) and format_table(rows).splitlines() == lines
    # one checkpoint keeps its JSON, now saying how it was measured
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(gpt), "--data", str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == n and result["method"] == "strided, stride 16, block 32"
    assert {"split", "loss", "ppl", "bits_per_byte", "unigram_ppl"} <= set(result)


@pytest.mark.parametrize("stride, message", [("0", "must be a positive"), ("-3", "must be a positive"),
                                             ("33", "longer than the model's block size 32")])
def test_bad_stride_is_one_clear_error(small, runs, capsys, stride, message):
    _, data = small
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(runs[0]), "--data", str(data), "--stride", stride]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("choicelm: error: --stride") and message in err and len(err.splitlines()) == 1
    with pytest.raises(ChoicelmError, match="--stride"):
        compare([runs[1], runs[0]], data, stride=int(stride))
