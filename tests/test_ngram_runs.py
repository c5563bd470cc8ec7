"""n-gram models through the CLI: `pretrain` counts, `evaluate` scores, `convert to-arpa` exports, and KenLM,
reading that ARPA file, gives the same validation loss as `choicelm evaluate`."""

import json
import math

import numpy as np
import pytest

import choicelm
from choicelm.cli import main
from choicelm.data.loader import TokenDataset
from choicelm.core.errors import ChoicelmError

from conftest import TINY


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def evaluate_cli(run, data, capsys) -> dict:
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", run, "--data", data, "--metrics", "ppl") == 0
    return json.loads(capsys.readouterr().out)


def kenlm_loss(arpa, sentences) -> tuple[float, int]:
    """Mean natural-log loss per prediction (</s> included) of KenLM reading our ARPA file."""
    kenlm = pytest.importorskip("kenlm")
    model = kenlm.Model(str(arpa))
    log10 = sum(model.score(s, bos=True, eos=True) for s in sentences)
    count = sum(len(s.split()) + 1 for s in sentences)
    return -log10 * math.log(10) / count, count


@pytest.fixture(scope="module")
def token_run(prepared, tmp_path_factory):
    _, data = prepared
    run = tmp_path_factory.mktemp("ngram") / "run"
    assert run_cli("pretrain", "--config", "configs/ngram.yaml", "--data", data, "--out", run, "--ngram.order=4") == 0
    return run


def test_token_ngram_run_scores_like_kenlm(prepared, token_run, tmp_path, capsys):
    _, data = prepared
    result = evaluate_cli(token_run, data, capsys)
    assert run_cli("convert", "to-arpa", token_run, tmp_path / "lm.arpa") == 0
    val = TokenDataset(data, "val")
    stream = np.concatenate([np.asarray(s) for s in val.shards])
    docs = [d for d in np.split(stream, np.flatnonzero(stream == val.manifest["eot_id"]) + 1)]
    sentences = [" ".join(map(str, d[d != val.manifest["eot_id"]])) for d in docs if len(d)]
    loss, count = kenlm_loss(tmp_path / "lm.arpa", sentences)
    assert result["tokens"] == count == val.tokens  # </s> stands for each <|endoftext|>
    assert result["loss"] == pytest.approx(loss, abs=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * val.tokens / math.log(2)
                                                    / val.manifest["splits"]["val"]["bytes"])
    summary = json.loads((token_run / "summary.json").read_text())
    assert len(summary["ngrams"]) == 4 and summary["val"]["loss"] == pytest.approx(result["loss"])
    rows = (token_run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")


def test_word_ngram_run_scores_like_kenlm(prepared, tmp_path, capsys):
    _, data = prepared
    run = tmp_path / "words"
    assert run_cli("pretrain", "--config", "configs/ngram.yaml", "--data", data, "--out", run,
                   "--ngram.tokenizer=words", "--ngram.prune_singletons=true") == 0
    result = evaluate_cli(run, data, capsys)
    assert run_cli("convert", "to-arpa", run, tmp_path / "w.arpa") == 0
    files = TokenDataset(data, "val").manifest["splits"]["val"]["files"]
    lines = [ln for f in files for ln in open(f, encoding="utf-8").read().splitlines() if ln.strip()]
    loss, count = kenlm_loss(tmp_path / "w.arpa", [" ".join(ln.split()) for ln in lines])
    assert result["tokens"] == count and result["loss"] == pytest.approx(loss, abs=1e-4)
    lm = choicelm.load(run)
    text = lm.generate("the king", max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert text.startswith(" ") and len(text.split()) == 6  # words joined by spaces; </s> never drawn
    assert text == lm.generate("the king", max_new_tokens=6, temperature=0, stop_at_eos=False)


def test_ngram_generates_resumes_and_refuses(prepared, token_run, tmp_path, capsys):
    _, data = prepared
    lm = choicelm.load(token_run)
    greedy = lm.generate("ROMEO:", max_new_tokens=12, temperature=0)
    assert greedy == lm.generate("ROMEO:", max_new_tokens=12, temperature=0)
    sampled = {lm.generate("ROMEO:", max_new_tokens=12, temperature=1.0, top_k=20, seed=s) for s in range(4)}
    assert len(sampled) > 1 and lm.generate("ROMEO:", max_new_tokens=12, seed=3) == lm.generate(
        "ROMEO:", max_new_tokens=12, seed=3)
    with pytest.raises(ChoicelmError, match="num_beams need a neural model"):
        lm.generate("ROMEO:", num_beams=4)
    # counting is one step: --resume auto on a finished run returns its checkpoint
    assert run_cli("pretrain", "--config", "configs/ngram.yaml", "--data", data, "--out", token_run,
                   "--ngram.order=4", "--resume", "auto") == 0
    capsys.readouterr()
    assert run_cli("pretrain", "--config", "configs/ngram.yaml", "--data", data, "--out", tmp_path / "x",
                   "--ngram.order=7") == 2
    assert "ngram.order=7 must be in 1..6" in capsys.readouterr().err
    (tmp_path / "taken.arpa").write_text("mine")
    assert run_cli("convert", "to-arpa", token_run, tmp_path / "taken.arpa") == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "taken.arpa").read_text() == "mine"
    gpt = tmp_path / "gpt"
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", gpt, "--train.max_steps=1", "--train.eval_every=0")
    capsys.readouterr()
    assert run_cli("convert", "to-arpa", gpt, tmp_path / "gpt.arpa") == 2
    assert "not an n-gram checkpoint" in capsys.readouterr().err
