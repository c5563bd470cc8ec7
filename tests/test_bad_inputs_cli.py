"""Malformed command lines across every verb (issue 18): each must end with exit status 2, exactly one line on
stderr (`choicelm: error: ...`, no traceback) saying what is wrong, and nothing changed on disk (every file under
the test's folders hashed before and after).

The cases run in-process (`choicelm.cli.main`), a few also through the real entry point (`python -m choicelm`).
Generation options that the generation engine validates (temperature, length penalty, --num-samples) are tested
with it; the cases here that touch them are ones the CLI or the checkpoint refuses first."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from choicelm.cli import main

from conftest import ROOT, TINY

CONFIGS = ROOT / "configs"


# --- the world the cases run against: good and damaged inputs, built once ------------------------------------

class World(dict):
    """name -> path; `w.new(name)` is a path that must still not exist after the case (one folder per case, so a
    case that wrongly writes cannot mask a later one by leaving its output behind)."""

    def __init__(self, root: Path, **paths):
        super().__init__(paths)
        self.root = root
        self.case = "none"

    def __getattr__(self, name):
        return self[name]

    def new(self, name: str) -> Path:
        return self.root / "new" / self.case / name


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse
        return e.code


@pytest.fixture(scope="module")
def w(tmp_path_factory, prepared, shakespeare_slice):
    root = tmp_path_factory.mktemp("bad-inputs")
    tok, data = prepared
    p = {"tok": tok, "data": data}

    def write(name, content: bytes | str) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    sonnets = next(f for f in shakespeare_slice if f.name == "sonnets_gut.txt").read_text()[:20_000]
    p["good_txt"] = write("text/good.txt", sonnets)
    p["latin1_txt"] = write("text/latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 10)
    p["binary_txt"] = write("text/binary.txt", b"some text\0\1\2 and more")
    p["empty_txt"] = write("text/empty.txt", b"")
    (root / "emptydir").mkdir()
    p["emptydir"] = root / "emptydir"
    p["notes"] = write("notrun/notes.txt", "mine")
    p["notrun"] = root / "notrun"
    p["tok_bad_json"] = write("tok_bad/tokenizer.json", "{not json")
    p["tok_bad"] = root / "tok_bad"
    p["tok_bad_config"] = root / "tok_badcfg"
    shutil.copytree(tok, p["tok_bad_config"])
    (p["tok_bad_config"] / "tokenizer_config.json").write_text("{oops")
    p["tok_existing"] = root / "tok_existing"
    shutil.copytree(tok, p["tok_existing"])

    # data folders, damaged in one way each
    def data_copy(name, damage):
        folder = root / name
        shutil.copytree(data, folder)
        damage(folder)
        return folder

    def random_shard(folder):
        shard = folder / "train_000.bin"
        shard.write_bytes(np.random.default_rng(0).integers(0, 2**16, shard.stat().st_size // 2,
                                                            dtype=np.uint16).tobytes())

    def manifest(folder, change):
        m = json.loads((folder / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))

    p["data_random"] = data_copy("data_random", random_shard)
    p["data_truncated"] = data_copy("data_truncated", lambda f: (f / "train_000.bin").write_bytes(
        (f / "train_000.bin").read_bytes()[:-2]))
    p["data_nomanifest"] = data_copy("data_nomanifest", lambda f: (f / "manifest.json").unlink())
    p["data_garbage"] = data_copy("data_garbage", lambda f: (f / "manifest.json").write_text("{garbage"))
    p["data_version"] = data_copy("data_version", lambda f: manifest(f, lambda m: m.update(version=99)))

    # configs
    p["cfg_list"] = write("cfg/list.yaml", "- model\n- train\n")
    p["cfg_latin1"] = write("cfg/latin1.yaml", "model:\n  kind: caf\xe9\n".encode("latin-1"))
    p["cfg_scalar"] = write("cfg/scalar.yaml", "42\n")
    p["cfg_invalid"] = write("cfg/invalid.yaml", "model: [unclosed\n")
    p["cfg_section"] = write("cfg/section.yaml", "trian:\n  max_steps: 3\n")
    p["cfg_key"] = write("cfg/key.yaml", "train:\n  max_step: 3\n")
    p["cfg_nan"] = write("cfg/nan.yaml", "optim:\n  lr: .nan\n")
    p["cfg_section_list"] = write("cfg/section_list.yaml", "model:\n  - 1\n")

    # runs: a GPT with checkpoints at 2 and 4, damaged copies, a classifier, an n-gram
    run = root / "run"
    assert cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=4",
               "--train.save_every=2", "--train.keep_last=3", "--train.eval_every=0", "--train.peak_flops=1e12") == 0
    p["run"] = run
    p["run_incomplete"] = root / "run_incomplete"
    shutil.copytree(run, p["run_incomplete"])
    (p["run_incomplete"] / "step-00000004" / "COMPLETE").unlink()
    p["run_truncated"] = root / "run_truncated"
    shutil.copytree(run, p["run_truncated"])
    for step in ("step-00000002", "step-00000004"):
        weights = p["run_truncated"] / step / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    p["run_nomarker"] = root / "run_nomarker"
    shutil.copytree(run, p["run_nomarker"])
    for step in ("step-00000002", "step-00000004"):
        (p["run_nomarker"] / step / "COMPLETE").write_text("x")

    rows = [["text", "label"]] + [[f"{w_} {i}", w_] for i in range(10) for w_ in ("war", "peace")]
    p["train_csv"] = root / "task" / "train.csv"
    p["train_csv"].parent.mkdir()
    with open(p["train_csv"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    p["cls"] = root / "cls"
    assert cli("finetune", "--task", "classify", "--config", CONFIGS / "bert-tiny.yaml", "--tokenizer", tok,
               "--train", p["train_csv"], "--out", p["cls"], "--train.max_steps=2", "--train.eval_every=0",
               "--train.peak_flops=1e12") == 0
    p["ngram"] = root / "ngram"
    assert cli("pretrain", "--config", CONFIGS / "ngram.yaml", "--data", data, "--out", p["ngram"]) == 0

    # task files
    p["csv_latin1"] = write("task/latin1.csv", "text,label\ncaf\xe9,war\nok,peace\n".encode("latin-1"))
    p["csv_nolabel"] = write("task/nolabel.csv", "text,label\nhello,war\nthere,\n")
    p["csv_onelabel"] = write("task/onelabel.csv", "text,label\nhello,war\nthere,war\n")
    p["csv_header"] = write("task/header.csv", "text,label\n")
    p["csv_unseen"] = write("task/unseen.csv", "text,label\nhello,war\nthere,maybe\n")
    p["csv_bigfield"] = write("task/bigfield.csv", 'text,label\n"' + "x" * 200_000 + '",war\n')
    p["jsonl_bad"] = write("task/bad.jsonl", '{"prompt": "a", "response": "b"}\n{oops\n')
    p["jsonl_array"] = write("task/array.jsonl", "[1, 2]\n")
    p["jsonl_noassistant"] = write("task/noassistant.jsonl",
                                   json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    p["jsonl_nokeys"] = write("task/nokeys.jsonl", json.dumps({"question": "hi"}) + "\n")
    p["jsonl_latin1"] = write("task/latin1.jsonl", '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    p["tsv_three"] = write("task/three.tsv", "a b\tb a\tc\n")
    p["tsv_latin1"] = write("task/latin1.tsv", "caf\xe9\tx\n".encode("latin-1"))
    p["task_txt"] = write("task/notes.txt", "just text\n")

    # metrics files for plot
    for name, content in [("binary", b"\x89PNG\r\n\x1a\n\0\0\xff"), ("latin1", b"step,train_loss\n1,\xe9\n"),
                          ("nostep", b"hello\nworld\n"), ("value", b"step,train_loss\n1,2.5\n2,abc\n"),
                          ("short", b"step,train_loss,val_loss\n1,2.5,3\n2,2.4\n"), ("header", b"step,train_loss\n"),
                          ("quote", b'step,train_loss\n1,"2.5\n'), ("nostepvalue", b"step,train_loss\n,2.5\n")]:
        p[f"m_{name}"] = write(f"metrics/{name}/metrics.csv", content).parent

    # a Hugging Face folder, as `save_pretrained` leaves it (never converted)
    p["hf"] = write("hf-bert/config.json", json.dumps({"model_type": "bert", "architectures": ["BertModel"]})).parent
    write("hf-bert/model.safetensors", b"\0" * 16)
    p["hf_noconfig"] = write("hf-noconfig/model.safetensors", b"\0" * 16).parent
    p["afile"] = write("afile", "a file, not a folder\n")
    (root / "new").mkdir()
    return World(root, **p)


def snapshot(*folders: Path) -> dict:
    """Every path under the folders with its type, mode and content hash."""
    out = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            out[str(path)] = (st.st_mode, st.st_size if digest else None, digest)
    return out


# --- the table: (id, argv built from the world, text the one line must hold) -----------------------------------

def T(w, *extra):  # tokenizer train
    return ["tokenizer", "train", *extra]


def R(w, *extra, data=None, config=TINY):  # pretrain into a new run unless --out is given
    out = [] if "--out" in extra else ["--out", w.new("run")]
    return ["pretrain", "--config", config, "--data", data or w.data, *out, "--train.peak_flops=1e12", *extra]


def F(w, *extra, config=CONFIGS / "bert-tiny.yaml"):
    args = ["finetune", "--config", config, "--out", w.new("ft"), "--train.peak_flops=1e12"]
    if "--task" not in extra:
        args += ["--task", "classify"]
    if "--train" not in extra:
        args += ["--train", w.train_csv]
    if "--from" not in extra and "--tokenizer" not in extra and "NO_TOKENIZER" not in extra:
        args += ["--tokenizer", w.tok]
    return args + [e for e in extra if e != "NO_TOKENIZER"]


def E(w, *extra):
    return ["evaluate", *extra]


def G(w, *extra, checkpoint=None):
    return ["generate", "--checkpoint", checkpoint or w.run, "--prompt", "ROMEO:", *extra]


CASES = [
    # no verb, unknown verbs and flags
    ("no-verb", lambda w: [], "the following arguments are required: VERB"),
    ("bogus-verb", lambda w: ["train"], "invalid choice: 'train'"),
    ("bogus-flag", lambda w: ["--bogus"], "the following arguments are required: VERB"),
    ("tokenizer-no-action", lambda w: ["tokenizer"], "the following arguments are required: action"),
    ("tokenizer-bogus-action", lambda w: ["tokenizer", "fit"], "invalid choice: 'fit'"),
    ("convert-bogus-action", lambda w: ["convert", "to-gguf", "a", "b"], "invalid choice: 'to-gguf'"),
    ("study-bogus-action", lambda w: ["study", "moe"], "invalid choice: 'moe'"),
    ("plot-unknown-flag", lambda w: ["plot", w.run, "--dpi", "3"], "unrecognized arguments: --dpi 3"),
    ("generate-unknown-flag", lambda w: G(w, "--beams", "2"), "unrecognized arguments: --beams 2"),

    # tokenizer train
    ("tok-missing-input", lambda w: T(w, "--input", w.new("missing.txt"), "--out", w.new("tok")), "does not exist"),
    ("tok-empty-dir", lambda w: T(w, "--input", w.emptydir, "--out", w.new("tok")), "holds no (non-hidden) files"),
    ("tok-latin1", lambda w: T(w, "--input", w.latin1_txt, "--out", w.new("tok")), "is not UTF-8 text"),
    ("tok-binary", lambda w: T(w, "--input", w.binary_txt, "--out", w.new("tok")), "looks binary"),
    ("tok-only-empty", lambda w: T(w, "--input", w.empty_txt, "--out", w.new("tok")), "no text"),
    ("tok-all-skipped", lambda w: T(w, "--input", w.latin1_txt, "--errors", "skip", "--out", w.new("tok")), "no text"),
    ("tok-vocab-small", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "10", "--out", w.new("tok")),
     "vocab_size=10 is out of range"),
    ("tok-vocab-negative", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "-5", "--out", w.new("tok")),
     "out of range"),
    ("tok-vocab-huge", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "99999999999", "--out", w.new("tok")),
     "out of range"),
    ("tok-vocab-text", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "lots", "--out", w.new("tok")),
     "invalid int value: 'lots'"),
    ("tok-vocab-empty", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "", "--out", w.new("tok")),
     "invalid int value"),
    ("tok-kind", lambda w: T(w, "--input", w.good_txt, "--kind", "wordpiece", "--out", w.new("tok")),
     "invalid choice: 'wordpiece'"),
    ("tok-errors", lambda w: T(w, "--input", w.good_txt, "--errors", "ignore", "--out", w.new("tok")),
     "invalid choice: 'ignore'"),
    ("tok-no-input", lambda w: T(w, "--out", w.new("tok")), "the following arguments are required: --input"),
    ("tok-no-out", lambda w: T(w, "--input", w.good_txt), "the following arguments are required: --out"),
    ("tok-existing", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "300", "--out", w.tok_existing),
     "already holds a tokenizer"),
    ("tok-out-file", lambda w: T(w, "--input", w.good_txt, "--vocab-size", "300", "--out", w.afile),
     "afile"),
    ("tok-input-empty-list", lambda w: T(w, "--input", "--out", w.new("tok")), "expected at least one argument"),

    # prepare
    ("prep-missing-input", lambda w: ["prepare", "--input", w.new("x.txt"), "--tokenizer", w.tok, "--out",
                                      w.new("d")], "does not exist"),
    ("prep-missing-tok", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.new("tok"), "--out",
                                    w.new("d")], "no tokenizer at"),
    ("prep-tok-empty-dir", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.emptydir, "--out",
                                      w.new("d")], "no tokenizer at"),
    ("prep-tok-garbage", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok_bad, "--out",
                                    w.new("d")], "is not a valid tokenizer.json"),
    ("prep-tok-config-garbage", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok_bad_config,
                                           "--out", w.new("d")], "is not valid JSON"),
    ("prep-tok-is-text", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.good_txt, "--out",
                                    w.new("d")], "is not a valid tokenizer.json"),
    ("prep-out-nonempty", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.notrun],
     "exists and is not empty"),
    ("prep-out-file", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.afile],
     "exists and is a file"),
    ("prep-input-inside-out", lambda w: ["prepare", "--input", w.notes, "--tokenizer", w.tok, "--out", w.notrun,
                                         "--overwrite"], "lies inside the output folder"),
    ("prep-val-missing", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                    "--val-files", "nope.txt"], "'nope.txt' is not among the inputs"),
    ("prep-val-all", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                "--val-files", "good.txt"], "every input file is a validation file"),
    ("prep-frac-big", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                 "--val-fraction", "0.9"], "val_fraction=0.9 is out of range"),
    ("prep-frac-negative", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                      "--val-fraction", "-0.1"], "out of range"),
    ("prep-frac-nan", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                 "--val-fraction", "nan"], "'nan' is not a finite number"),
    ("prep-frac-inf", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                 "--val-fraction", "inf"], "'inf' is not a finite number"),
    ("prep-frac-text", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                  "--val-fraction", "half"], "'half' is not a number"),
    ("prep-both-val", lambda w: ["prepare", "--input", w.good_txt, w.notes, "--tokenizer", w.tok, "--out",
                                 w.new("d"), "--val-files", "notes.txt", "--val-fraction", "0.1"],
     "either --val-files or --val-fraction"),
    ("prep-errors-choice", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                      "--errors", "replace"], "invalid choice: 'replace'"),
    ("prep-latin1", lambda w: ["prepare", "--input", w.latin1_txt, "--tokenizer", w.tok, "--out", w.new("d")],
     "is not UTF-8 text"),
    ("prep-binary", lambda w: ["prepare", "--input", w.binary_txt, "--tokenizer", w.tok, "--out", w.new("d")],
     "looks binary"),
    ("prep-all-skipped", lambda w: ["prepare", "--input", w.latin1_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                    "--errors", "skip"], "no text"),
    ("prep-no-tokenizer", lambda w: ["prepare", "--input", w.good_txt, "--out", w.new("d")],
     "the following arguments are required: --tokenizer"),
    ("prep-unknown-flag", lambda w: ["prepare", "--input", w.good_txt, "--tokenizer", w.tok, "--out", w.new("d"),
                                     "--shards", "3"], "unrecognized arguments: --shards 3"),

    # pretrain: data
    ("pre-no-data", lambda w: ["pretrain", "--config", TINY, "--out", w.new("run")], "no training data"),
    ("pre-data-missing", lambda w: R(w, data=w.new("data")), "no manifest.json"),
    ("pre-data-not-prepared", lambda w: R(w, data=w.emptydir), "no manifest.json"),
    ("pre-data-file", lambda w: R(w, data=w.good_txt), "no manifest.json"),
    ("pre-data-garbage-manifest", lambda w: R(w, data=w.data_garbage), "damaged or not a choicelm manifest"),
    ("pre-data-version", lambda w: R(w, data=w.data_version), "format version 99"),
    ("pre-data-truncated", lambda w: R(w, data=w.data_truncated), "the data folder is damaged"),
    ("pre-data-random-bytes", lambda w: R(w, data=w.data_random), "but the vocabulary has 512 tokens"),
    ("pre-data-no-manifest", lambda w: R(w, data=w.data_nomanifest), "no manifest.json"),
    # pretrain: config files
    ("pre-config-missing", lambda w: R(w, config=w.new("c.yaml")), "does not exist"),
    ("pre-config-list", lambda w: R(w, config=w.cfg_list), "holds a YAML list, not a mapping"),
    ("pre-config-list-overrides", lambda w: R(w, "--train.max_steps=3", config=w.cfg_list), "holds a YAML list"),
    ("pre-config-latin1", lambda w: R(w, config=w.cfg_latin1), "is not UTF-8 text"),
    ("pre-config-scalar", lambda w: R(w, config=w.cfg_scalar), "holds a YAML int"),
    ("pre-config-invalid", lambda w: R(w, config=w.cfg_invalid), "is not valid YAML"),
    ("pre-config-section", lambda w: R(w, config=w.cfg_section), "unknown section 'trian' (did you mean train?)"),
    ("pre-config-key", lambda w: R(w, config=w.cfg_key), "unknown key 'train.max_step'"),
    ("pre-config-nan", lambda w: R(w, config=w.cfg_nan), "optim.lr=nan must be a finite number"),
    ("pre-config-section-list", lambda w: R(w, config=w.cfg_section_list), "section 'model' must be a mapping"),
    ("pre-config-is-dir", lambda w: R(w, config=w.emptydir), "does not exist"),
    # pretrain: overrides
    ("pre-typo-key", lambda w: R(w, "--model.n_layers=2"), "did you mean model.n_layer"),
    ("pre-typo-section", lambda w: R(w, "--trian.max_steps=2"), "unknown section 'trian'"),
    ("pre-empty-section", lambda w: R(w, "--.max_steps=2"), "unknown section ''"),
    ("pre-empty-key", lambda w: R(w, "--model.=2"), "unknown key 'model.'"),
    ("pre-not-an-override", lambda w: R(w, "steps=3"), "unexpected argument 'steps=3'"),
    ("pre-override-no-dot", lambda w: R(w, "--max_steps=3"), "unexpected argument '--max_steps=3'"),
    ("pre-swallow", lambda w: R(w, "--train.max_steps", "--train.eval_every=0"),
     "override --train.max_steps needs a value"),
    ("pre-no-value-last", lambda w: R(w, "--train.max_steps"), "override --train.max_steps needs a value"),
    ("pre-lr-inf", lambda w: R(w, "--optim.lr=.inf"), "optim.lr=inf must be a finite number"),
    ("pre-lr-nan", lambda w: R(w, "--optim.lr=.nan"), "optim.lr=nan must be a finite number"),
    ("pre-lr-neg-inf", lambda w: R(w, "--optim.lr=-.inf"), "must be a finite number"),
    ("pre-lr-text-inf", lambda w: R(w, "--optim.lr=inf"), "optim.lr=inf must be a finite number"),
    ("pre-lr-overflow", lambda w: R(w, "--optim.lr=1e400"), "must be a finite number"),
    ("pre-lr-negative", lambda w: R(w, "--optim.lr=-1"), "optim.lr=-1.0 must be > 0"),
    ("pre-lr-zero", lambda w: R(w, "--optim.lr=0"), "must be > 0"),
    ("pre-lr-bool", lambda w: R(w, "--optim.lr=true"), "must be of type float"),
    ("pre-lr-list", lambda w: R(w, "--optim.lr=[1]"), "must be of type float"),
    ("pre-max-time-nan", lambda w: R(w, "--train.max_time=.nan"), "train.max_time=nan must be a finite number"),
    ("pre-max-time-inf", lambda w: R(w, "--train.max_time=.inf"), "must be a finite number"),
    ("pre-max-time-negative", lambda w: R(w, "--train.max_time=-5"), "must be >= 0"),
    ("pre-max-steps-zero", lambda w: R(w, "--train.max_steps=0"), "train.max_steps=0 must be > 0"),
    ("pre-max-steps-text", lambda w: R(w, "--train.max_steps=many"), "must be of type int"),
    ("pre-max-steps-float", lambda w: R(w, "--train.max_steps=2.5"), "must be of type int"),
    ("pre-max-steps-overflow", lambda w: R(w, "--train.max_steps=1e400"), "is out of range"),
    ("pre-max-steps-inf", lambda w: R(w, "--train.max_steps=.inf"), "is out of range"),
    ("pre-max-steps-huge-int", lambda w: R(w, "--train.max_steps=" + "9" * 30), "is out of range"),
    ("pre-seed-negative", lambda w: R(w, "--train.seed=-1"), "train.seed=-1 must be >= 0"),
    ("pre-micro-batch-zero", lambda w: R(w, "--train.micro_batch_size=0"), "must be > 0"),
    ("pre-global-batch", lambda w: R(w, "--train.global_batch_size=6"), "must be divisible by"),
    ("pre-keep-last-zero", lambda w: R(w, "--train.keep_last=0"), "train.keep_last=0 must be > 0"),
    ("pre-eval-every-negative", lambda w: R(w, "--train.eval_every=-1"), "must be >= 0"),
    ("pre-precision", lambda w: R(w, "--train.precision=fp8"), "choose one of auto, bf16, fp32"),
    ("pre-device-config", lambda w: R(w, "--train.device=tpu"), "train.device='tpu' is not allowed"),
    ("pre-device-list", lambda w: R(w, "--train.device=[cpu]"), "must be of type str"),
    ("pre-compile-text", lambda w: R(w, "--train.compile=maybe"), "must be of type bool"),
    ("pre-kind", lambda w: R(w, "--model.kind=transformer"), "choose one of gpt, lstm, ngram, seq2seq, bert"),
    ("pre-heads", lambda w: R(w, "--model.n_head=5"), "divisible"),
    ("pre-kv-heads", lambda w: R(w, "--model.n_kv_head=3"), "divisible by model.n_kv_head=3"),
    ("pre-width", lambda w: R(w, "--model.n_embd=33"), "divisible"),
    ("pre-dropout-one", lambda w: R(w, "--model.dropout=1.0"), "model.dropout=1.0 must be in [0, 1)"),
    ("pre-dropout-nan", lambda w: R(w, "--model.dropout=.nan"), "must be a finite number"),
    ("pre-norm-eps-nan", lambda w: R(w, "--model.norm_eps=.nan"), "must be a finite number"),
    ("pre-rope-theta-inf", lambda w: R(w, "--model.rope_theta=.inf"), "must be a finite number"),
    ("pre-norm", lambda w: R(w, "--model.norm=batchnorm"), "choose one of layernorm, rmsnorm"),
    ("pre-pos-sinusoidal", lambda w: R(w, "--model.pos=sinusoidal"), "only implemented for model.kind=seq2seq"),
    ("pre-qk-norm-lstm", lambda w: R(w, "--model.kind=lstm", "--model.qk_norm=true"), "qk_norm=true is only"),
    ("pre-n-labels-one", lambda w: R(w, "--model.n_labels=1"), "use 0 for a language model or >= 2 classes"),
    ("pre-nsp-gpt", lambda w: R(w, "--model.nsp=true"), "next-sentence prediction"),
    ("pre-vocab-small", lambda w: R(w, "--model.vocab_size=100"), "is smaller than the tokenizer's 512 tokens"),
    ("pre-block-too-long", lambda w: R(w, "--model.block_size=60000", "--train.micro_batch_size=1"),
     "needs block_size+1 = 60,001"),
    ("pre-too-big", lambda w: R(w, "--model.n_layer=1e9"), "GiB to train"),
    ("pre-moe-one", lambda w: R(w, "--moe.experts=1"), "moe.experts=1 is not a mixture"),
    ("pre-moe-topk", lambda w: R(w, "--moe.experts=4", "--moe.top_k=5"), "moe.top_k=5 exceeds moe.experts=4"),
    ("pre-moe-router", lambda w: R(w, "--moe.experts=4", "--moe.router=hash"), "choose one of expert_choice"),
    ("pre-moe-capacity-inf", lambda w: R(w, "--moe.capacity=.inf"), "must be a finite number"),
    ("pre-moe-momentum", lambda w: R(w, "--moe.threshold_momentum=1"), "must be in [0, 1)"),
    ("pre-beta1-one", lambda w: R(w, "--optim.beta1=1.0"), "optim.beta1=1.0 must be in [0, 1)"),
    ("pre-beta2", lambda w: R(w, "--optim.beta2=1.5"), "must be in [0, 1)"),
    ("pre-min-lr", lambda w: R(w, "--optim.min_lr_ratio=2"), "must be in [0, 1]"),
    ("pre-schedule", lambda w: R(w, "--optim.schedule=linear"), "choose one of cosine, wsd, constant"),
    ("pre-optim-name", lambda w: R(w, "--optim.name=sgd"), "choose one of adamw, muon"),
    ("pre-grad-clip-nan", lambda w: R(w, "--optim.grad_clip=.nan"), "must be a finite number"),
    ("pre-ngram-order", lambda w: R(w, "--ngram.order=9", config=CONFIGS / "ngram.yaml"), "must be in 1..6"),
    ("pre-ngram-k-nan", lambda w: R(w, "--ngram.k=.nan", config=CONFIGS / "ngram.yaml"), "must be a finite number"),
    ("pre-finetune-task", lambda w: R(w, "--finetune.task=summarize"), "choose one of , classify"),
    ("pre-cuda", lambda w: R(w, "--train.device=cuda"), "device 'cuda'"),
    ("pre-cuda-n", lambda w: R(w, "--train.device=cuda:7"), "device 'cuda:7'"),
    # pretrain: run folders
    ("pre-out-existing", lambda w: R(w, "--out", w.run), "already holds a run (checkpoint at step 4)"),
    ("pre-out-not-run", lambda w: R(w, "--out", w.notrun), "is not empty and is not a choicelm run"),
    ("pre-out-not-run-overwrite", lambda w: R(w, "--out", w.notrun, "--overwrite"), "is not a choicelm run"),
    ("pre-out-file", lambda w: R(w, "--out", w.afile), "is a file"),
    ("pre-resume-missing", lambda w: R(w, "--resume", w.new("ckpt")), "does not exist"),
    ("pre-resume-incomplete", lambda w: R(w, "--resume", w.run_incomplete / "step-00000004"), "is incomplete"),
    ("pre-resume-not-run", lambda w: R(w, "--resume", w.notrun), "holds no complete checkpoint"),
    ("pre-resume-hf", lambda w: R(w, "--resume", w.hf), "is a Hugging Face model folder"),
    ("pre-resume-other-run", lambda w: R(w, "--out", w.run_incomplete, "--resume", w.run / "step-00000002"),
     "is a checkpoint of another run"),
    ("pre-resume-older", lambda w: R(w, "--out", w.run, "--resume", w.run / "step-00000002",
                                     "--train.max_steps=6"), "older than this run's newer checkpoint(s)"),
    ("pre-resume-overwrite-own", lambda w: R(w, "--out", w.run, "--resume", w.run / "step-00000004", "--overwrite"),
     "--overwrite would delete"),
    ("pre-resume-other-model", lambda w: R(w, "--out", w.run, "--resume", "auto", "--train.max_steps=6",
                                           "--model.n_layer=3"), "the model config differs"),
    ("pre-resume-other-optim", lambda w: R(w, "--out", w.run, "--resume", "auto", "--train.max_steps=6",
                                           "--optim.name=muon"), "trained with optim.name=adamw"),
    ("pre-resume-other-seed", lambda w: R(w, "--out", w.run, "--resume", "auto", "--train.max_steps=6",
                                          "--train.seed=7"), "cannot resume the data order"),
    ("pre-resume-damaged", lambda w: R(w, "--out", w.run_nomarker, "--resume", "auto", "--train.max_steps=6"),
     "no complete checkpoint to resume from"),
    ("pre-resume-truncated", lambda w: R(w, "--out", w.run_truncated, "--resume", "auto", "--train.max_steps=6"),
     "truncated or not a choicelm checkpoint"),
    ("pre-no-out", lambda w: ["pretrain", "--config", TINY, "--data", w.data],
     "the following arguments are required: --out"),

    # finetune
    ("ft-no-task", lambda w: ["finetune", "--train", w.train_csv, "--out", w.new("ft")],
     "the following arguments are required: --task"),
    ("ft-bogus-task", lambda w: F(w, "--task", "summarize"), "invalid choice: 'summarize'"),
    ("ft-no-train", lambda w: ["finetune", "--task", "classify", "--out", w.new("ft")],
     "the following arguments are required: --train"),
    ("ft-train-missing", lambda w: F(w, "--train", w.new("x.csv")), "does not exist"),
    ("ft-train-latin1", lambda w: F(w, "--train", w.csv_latin1), "latin1.csv:2: not UTF-8 text"),
    ("ft-train-no-label", lambda w: F(w, "--train", w.csv_nolabel), "the column 'label' is missing or empty"),
    ("ft-train-one-label", lambda w: F(w, "--train", w.csv_onelabel), "a classifier needs at least 2 classes"),
    ("ft-train-header-only", lambda w: F(w, "--train", w.csv_header), "holds no examples"),
    ("ft-train-big-field", lambda w: F(w, "--train", w.csv_bigfield), "cannot read this line as CSV"),
    ("ft-train-txt", lambda w: F(w, "--train", w.task_txt), "unknown file type '.txt'"),
    ("ft-text-column", lambda w: F(w, "--finetune.text_column=body"), "the column 'body' is missing"),
    ("ft-val-unseen", lambda w: F(w, "--val", w.csv_unseen), "that the model was not trained on"),
    ("ft-val-latin1", lambda w: F(w, "--val", w.csv_latin1), "not UTF-8 text"),
    ("ft-sft-bad-json", lambda w: F(w, "--task", "sft", "--train", w.jsonl_bad, config=TINY), "bad.jsonl:2: not valid"),
    ("ft-sft-array", lambda w: F(w, "--task", "sft", "--train", w.jsonl_array, config=TINY),
     "expected a JSON object per line"),
    ("ft-sft-no-assistant", lambda w: F(w, "--task", "sft", "--train", w.jsonl_noassistant, config=TINY),
     "has no assistant message"),
    ("ft-sft-no-keys", lambda w: F(w, "--task", "sft", "--train", w.jsonl_nokeys, config=TINY),
     "expected \"prompt\" and \"response\""),
    ("ft-sft-latin1", lambda w: F(w, "--task", "sft", "--train", w.jsonl_latin1, config=TINY), "not UTF-8 text"),
    ("ft-sft-template-missing", lambda w: F(w, "--task", "sft", "--train", w.jsonl_noassistant, config=TINY,
                                            ) + ["--finetune.chat_template=" + str(w.new("t.jinja"))],
     "does not exist"),
    ("ft-seq2seq-three", lambda w: F(w, "--task", "seq2seq", "--train", w.tsv_three,
                                     config=CONFIGS / "seq2seq-tiny.yaml"), "expected a source and a target"),
    ("ft-seq2seq-latin1", lambda w: F(w, "--task", "seq2seq", "--train", w.tsv_latin1,
                                      config=CONFIGS / "seq2seq-tiny.yaml"), "latin1.tsv:1: not UTF-8 text"),
    ("ft-seq2seq-gpt", lambda w: F(w, "--task", "seq2seq", "--train", w.tsv_three, config=TINY),
     "--task seq2seq does not fit a gpt model"),
    ("ft-sft-bert", lambda w: F(w, "--task", "sft", "--train", w.jsonl_bad), "--task sft does not fit a bert model"),
    ("ft-ngram", lambda w: F(w, config=CONFIGS / "ngram.yaml"), "--task classify does not fit a ngram model"),
    ("ft-from-missing", lambda w: F(w, "--from", w.new("ckpt")), "does not exist"),
    ("ft-from-hf", lambda w: F(w, "--from", w.hf), "convert it first with `choicelm convert from-hf"),
    ("ft-from-truncated", lambda w: F(w, "--from", w.run_truncated), "truncated or not a choicelm checkpoint"),
    ("ft-from-and-tokenizer", lambda w: F(w, "--from", w.run, "--tokenizer", w.tok), "drop one of them"),
    ("ft-no-tokenizer", lambda w: F(w, "NO_TOKENIZER"), "a fresh model needs a tokenizer"),
    ("ft-tokenizer-missing", lambda w: F(w, "--tokenizer", w.new("tok")), "no tokenizer at"),
    ("ft-lora-negative", lambda w: F(w, "--finetune.lora_r=-1"), "must be >= 0"),
    ("ft-lora-dropout", lambda w: F(w, "--finetune.lora_dropout=1"), "must be in [0, 1)"),
    ("ft-lora-alpha-inf", lambda w: F(w, "--finetune.lora_alpha=.inf"), "must be a finite number"),
    ("ft-adversarial", lambda w: F(w, "--finetune.adversarial=fgsm"), "choose one of none, fgm, pgd"),
    ("ft-epochs-nan", lambda w: F(w, "--finetune.epochs=.nan"), "must be a finite number"),
    ("ft-adv-epsilon-nan", lambda w: F(w, "--finetune.adv_epsilon=.nan"), "must be a finite number"),
    ("ft-out-existing", lambda w: F(w) + ["--out", w.cls], "already holds a run"),
    ("ft-lr-inf", lambda w: F(w, "--optim.lr=.inf"), "must be a finite number"),
    ("ft-device", lambda w: F(w, "--train.device=cuda"), "device 'cuda'"),

    # evaluate
    ("ev-no-checkpoint", lambda w: E(w, "--data", w.data), "the following arguments are required: --checkpoint"),
    ("ev-no-data", lambda w: E(w, "--checkpoint", w.run), "the following arguments are required: --data"),
    ("ev-checkpoint-missing", lambda w: E(w, "--checkpoint", w.new("run"), "--data", w.data), "does not exist"),
    ("ev-checkpoint-not-run", lambda w: E(w, "--checkpoint", w.notrun, "--data", w.data),
     "holds no complete checkpoint"),
    ("ev-checkpoint-hf", lambda w: E(w, "--checkpoint", w.hf, "--data", w.data), "is a Hugging Face model folder"),
    ("ev-checkpoint-incomplete", lambda w: E(w, "--checkpoint", w.run_incomplete / "step-00000004", "--data",
                                             w.data), "is incomplete"),
    ("ev-checkpoint-truncated", lambda w: E(w, "--checkpoint", w.run_truncated, "--data", w.data),
     "truncated or not a choicelm checkpoint"),
    ("ev-data-missing", lambda w: E(w, "--checkpoint", w.run, "--data", w.new("data")), "no manifest.json"),
    ("ev-data-text-file", lambda w: E(w, "--checkpoint", w.run, "--data", w.good_txt),
     "perplexity is measured on a folder written by `choicelm prepare`"),
    ("ev-data-random", lambda w: E(w, "--checkpoint", w.run, "--data", w.data_random),
     "but the vocabulary has 512 tokens"),
    ("ev-metric-unknown", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--metrics", "accuracy"),
     "unknown metric(s) accuracy"),
    ("ev-split", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--split", "test"), "has no 'test' split"),
    ("ev-batch-size-zero", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--batch-size", "0"),
     "--batch-size: 0 is out of range"),
    ("ev-max-batches", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--max-batches", "-1"),
     "--max-batches: -1 is out of range"),
    ("ev-stride-zero", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--stride", "0"),
     "--stride 0 must be a positive number of tokens"),
    ("ev-stride-long", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--stride", "1000"),
     "is longer than the model's block size 32"),
    ("ev-num-beams", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--num-beams", "0"), "out of range"),
    ("ev-routing-dense", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--routing", "topk"),
     "needs an MoE model; this GPT is dense"),
    ("ev-device-cuda", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--device", "cuda"), "device 'cuda'"),
    ("ev-device-bogus", lambda w: E(w, "--checkpoint", w.run, "--data", w.data, "--device", "gpu"),
     "device 'gpu' is not a device"),
    ("ev-several-task-file", lambda w: E(w, "--checkpoint", w.cls, w.cls, "--data", w.train_csv),
     "one --checkpoint at a time"),
    ("ev-several-bleu", lambda w: E(w, "--checkpoint", w.run, w.run, "--data", w.data, "--metrics", "bleu"),
     "compared on perplexity only"),
    ("ev-classifier-bleu", lambda w: E(w, "--checkpoint", w.cls, "--data", w.train_csv, "--metrics", "bleu"),
     "bleu"),
    ("ev-classifier-unseen", lambda w: E(w, "--checkpoint", w.cls, "--data", w.csv_unseen),
     "that the model was not trained on"),
    ("ev-classifier-latin1", lambda w: E(w, "--checkpoint", w.cls, "--data", w.csv_latin1), "not UTF-8 text"),
    ("ev-gpt-csv", lambda w: E(w, "--checkpoint", w.run, "--data", w.train_csv), "expected \"prompt\" and "),
    ("ev-ngram-task-file", lambda w: E(w, "--checkpoint", w.ngram, "--data", w.train_csv),
     "has no fine-tuning task metrics"),

    # generate and chat (checkpoint and device; sampling options belong to the generation engine's validator)
    ("gen-checkpoint-missing", lambda w: G(w, checkpoint=w.new("run")), "does not exist"),
    ("gen-checkpoint-not-run", lambda w: G(w, checkpoint=w.notrun), "holds no complete checkpoint"),
    ("gen-checkpoint-hf", lambda w: G(w, checkpoint=w.hf), "is a Hugging Face model folder"),
    ("gen-checkpoint-hf-noconfig", lambda w: G(w, checkpoint=w.hf_noconfig), "is incomplete"),
    ("gen-checkpoint-incomplete", lambda w: G(w, checkpoint=w.run_incomplete / "step-00000004"), "is incomplete"),
    ("gen-checkpoint-truncated", lambda w: G(w, checkpoint=w.run_truncated), "truncated or not a choicelm"),
    ("gen-checkpoint-damaged-markers", lambda w: G(w, checkpoint=w.run_nomarker), "holds no complete checkpoint"),
    ("gen-classifier", lambda w: G(w, checkpoint=w.cls), "a bert model does not generate text"),
    ("gen-device-cuda", lambda w: G(w, "--device", "cuda"), "device 'cuda'"),
    ("gen-device-bogus", lambda w: G(w, "--device", "tpu:0"), "device 'tpu:0'"),
    ("gen-no-prompt", lambda w: ["generate", "--checkpoint", w.run], "the following arguments are required: --prompt"),
    ("gen-max-new-tokens-text", lambda w: G(w, "--max-new-tokens", "ten"), "invalid int value: 'ten'"),
    ("gen-max-new-tokens-long", lambda w: G(w, "--max-new-tokens", "100000"), "exceeds the model's block size"),
    ("gen-top-p", lambda w: G(w, "--top-p", "1.5"), "top_p=1.5 must be in (0, 1]"),
    ("gen-temperature-negative", lambda w: G(w, "--temperature", "-1"), "temperature=-1.0 must be >= 0"),
    ("gen-seed-text", lambda w: G(w, "--seed", "abc"), "invalid int value: 'abc'"),
    ("chat-checkpoint-missing", lambda w: ["chat", "--checkpoint", w.new("run")], "does not exist"),
    ("chat-classifier", lambda w: ["chat", "--checkpoint", w.cls], "a bert model does not generate text"),
    ("chat-device", lambda w: ["chat", "--checkpoint", w.run, "--device", "cuda:1"], "device 'cuda:1'"),
    ("chat-ngram-hf", lambda w: ["chat", "--checkpoint", w.hf], "is a Hugging Face model folder"),

    # serve (every case fails before a server starts)
    ("serve-port-high", lambda w: ["serve", "--checkpoint", w.run, "--port", "99999"],
     "--port: 99999 is out of range; use an integer from 1 to 65535"),
    ("serve-port-zero", lambda w: ["serve", "--checkpoint", w.run, "--port", "0"], "--port: 0 is out of range"),
    ("serve-port-negative", lambda w: ["serve", "--checkpoint", w.run, "--port", "-80"], "--port"),
    ("serve-port-text", lambda w: ["serve", "--checkpoint", w.run, "--port", "http"], "'http' is not an integer"),
    ("serve-max-batch", lambda w: ["serve", "--checkpoint", w.run, "--max-batch", "0"], "--max-batch: 0 is out"),
    ("serve-max-queue", lambda w: ["serve", "--checkpoint", w.run, "--max-queue", "-1"], "--max-queue: -1 is out"),
    ("serve-dtype", lambda w: ["serve", "--checkpoint", w.run, "--dtype", "fp16"], "invalid choice: 'fp16'"),
    ("serve-checkpoint-missing", lambda w: ["serve", "--checkpoint", w.new("run")], "does not exist"),
    ("serve-checkpoint-hf", lambda w: ["serve", "--checkpoint", w.hf], "is a Hugging Face model folder"),
    ("serve-device-cuda", lambda w: ["serve", "--checkpoint", w.run, "--device", "cuda"], "device 'cuda'"),
    ("serve-device-bogus", lambda w: ["serve", "--checkpoint", w.run, "--device", "npu"], "device 'npu'"),
    ("serve-no-checkpoint", lambda w: ["serve"], "the following arguments are required: --checkpoint"),

    # plot
    ("plot-missing", lambda w: ["plot", w.new("run")], "has no metrics.csv"),
    ("plot-not-run", lambda w: ["plot", w.notrun], "has no metrics.csv"),
    ("plot-binary", lambda w: ["plot", w.m_binary], "is damaged"),
    ("plot-latin1", lambda w: ["plot", w.m_latin1], "is damaged"),
    ("plot-no-step", lambda w: ["plot", w.m_nostep], "has no step column"),
    ("plot-bad-value", lambda w: ["plot", w.m_value], "is damaged at line 3"),
    ("plot-short-row", lambda w: ["plot", w.m_short], "is damaged at line 3"),
    ("plot-no-rows", lambda w: ["plot", w.m_header], "has no rows yet"),
    ("plot-open-quote", lambda w: ["plot", w.m_quote], "is damaged"),
    ("plot-empty-step", lambda w: ["plot", w.m_nostepvalue], "is damaged at line 2"),
    ("plot-out-file", lambda w: ["plot", w.run, "--out", w.afile], "afile"),
    ("plot-no-run", lambda w: ["plot"], "the following arguments are required: run"),

    # study routing
    ("study-no-arms", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--out", w.new("s"),
                                 "--max-tokens", "1000"], "the following arguments are required: --arms"),
    ("study-bogus-arm", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense,magic",
                                   "--out", w.new("s"), "--max-tokens", "1000"], "magic"),
    ("study-seeds-zero", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                    "--seeds", "0", "--out", w.new("s"), "--max-tokens", "1000"], "--seeds 0"),
    ("study-max-time-nan", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                      "--out", w.new("s"), "--max-time", "nan"], "'nan' is not a finite number"),
    ("study-max-time-inf", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                      "--out", w.new("s"), "--max-time", "inf"], "'inf' is not a finite number"),
    ("study-max-time-negative", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                           "--out", w.new("s"), "--max-time", "-3"], "must be > 0 seconds"),
    ("study-two-budgets", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                     "--out", w.new("s"), "--max-time", "3", "--max-tokens", "9"],
     "give exactly one budget"),
    ("study-no-budget", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms", "dense",
                                   "--out", w.new("s")], "give exactly one budget"),
    ("study-max-tokens-negative", lambda w: ["study", "routing", "--data", w.data, "--config", TINY, "--arms",
                                             "dense", "--out", w.new("s"), "--max-tokens", "-5"],
     "must be a positive integer"),
    ("study-data-missing", lambda w: ["study", "routing", "--data", w.new("d"), "--config", TINY, "--arms", "dense",
                                      "--out", w.new("s"), "--max-tokens", "1000"], "holds no manifest.json"),
    ("study-config-missing", lambda w: ["study", "routing", "--data", w.data, "--config", w.new("c.yaml"), "--arms",
                                        "dense", "--out", w.new("s"), "--max-tokens", "1000"], "does not exist"),
    ("study-config-ngram", lambda w: ["study", "routing", "--data", w.data, "--config", CONFIGS / "ngram.yaml",
                                      "--arms", "dense", "--out", w.new("s"), "--max-tokens", "1000"],
     "needs a decoder base config that takes MoE layers"),

    # convert
    ("from-hf-missing", lambda w: ["convert", "from-hf", w.new("hf"), w.new("ck")], "does not exist"),
    ("from-hf-no-config", lambda w: ["convert", "from-hf", w.hf_noconfig, w.new("ck")], "config.json"),
    ("from-hf-out-nonempty", lambda w: ["convert", "from-hf", w.hf, w.notrun], "not empty"),
    ("from-hf-no-out", lambda w: ["convert", "from-hf", w.hf], "the following arguments are required: OUT"),
    ("to-hf-missing", lambda w: ["convert", "to-hf", w.new("run"), w.new("hf")], "does not exist"),
    ("to-hf-not-run", lambda w: ["convert", "to-hf", w.notrun, w.new("hf")], "holds no complete checkpoint"),
    ("to-hf-ngram", lambda w: ["convert", "to-hf", w.ngram, w.new("hf")], "no Hugging Face equivalent"),
    ("to-hf-out-nonempty", lambda w: ["convert", "to-hf", w.run, w.notrun], "exists and is not empty"),
    ("to-hf-out-is-input", lambda w: ["convert", "to-hf", w.run, w.run, "--overwrite"], "would replace the input"),
    ("to-hf-truncated", lambda w: ["convert", "to-hf", w.run_truncated, w.new("hf")], "truncated"),
    ("to-arpa-gpt", lambda w: ["convert", "to-arpa", w.run, w.new("lm.arpa")], "is not an n-gram checkpoint"),
    ("to-arpa-missing", lambda w: ["convert", "to-arpa", w.new("run"), w.new("lm.arpa")], "does not exist"),
    ("to-arpa-out-exists", lambda w: ["convert", "to-arpa", w.ngram, w.afile], "afile"),
]

IDS = [c[0] for c in CASES]
assert len(set(IDS)) == len(IDS), "duplicate case ids"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(w, capsys, case):
    w.case, make_argv, expected = case
    argv = make_argv(w)
    before = snapshot(w.root, w.tok, w.data)
    capsys.readouterr()
    code = cli(*argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("choicelm: error: ") and "Traceback" not in err, err[-2000:]
    assert expected in lines[0], lines[0]
    assert snapshot(w.root, w.tok, w.data) == before, "the case changed files on disk"


def test_the_table_is_big_enough():
    assert len(CASES) >= 150


# A few through the real entry point: a child `python -m choicelm`, its stderr and exit status as a shell sees them.
REAL = ["bogus-verb", "serve-port-high", "pre-lr-nan", "pre-config-list", "plot-binary", "ft-train-latin1",
        "pre-data-random-bytes", "ev-data-text-file"]


@pytest.mark.parametrize("name", REAL)
def test_the_real_entry_point_is_one_line_too(w, name):
    w.case, make_argv, expected = CASES[IDS.index(name)]
    w.case += "-real"
    before = snapshot(w.root)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "choicelm", *map(str, make_argv(w))], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert snapshot(w.root) == before
