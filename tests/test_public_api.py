"""The Python API as the README and docs show it, called the way a user calls it (`import choicelm;
choicelm.load(...)`), on tiny models: every documented argument reaches the code behind it (issue 18: the
package-level load dropped dtype="bf16")."""

import csv
import inspect
import json
import random

import pytest
import torch

import choicelm
from choicelm.core.errors import ChoicelmError

from conftest import ROOT, TINY


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    """README: `pretrain(load_config(...), "runs/x")`."""
    from choicelm.core.config import load_config
    from choicelm.train.loop import pretrain

    _, data = prepared
    out = tmp_path_factory.mktemp("api") / "x"
    cfg = load_config(TINY, ["--train.max_steps=6", f"--data.path={data}", "--train.eval_every=0",
                             "--train.peak_flops=1e12"])
    pretrain(cfg, out)
    return out


def test_package_load_takes_every_argument_api_load_takes():
    """The package-level wrapper must not drop arguments again: same parameters, same defaults."""
    from choicelm import api

    assert inspect.signature(choicelm.load).parameters.keys() == inspect.signature(api.load).parameters.keys()
    for name, p in inspect.signature(api.load).parameters.items():
        assert inspect.signature(choicelm.load).parameters[name].default == p.default


def test_readme_python_example(run, prepared):
    from choicelm.evaluation import perplexity

    _, data = prepared
    lm = choicelm.load(run)
    ids = torch.tensor([lm.tokenizer.encode("To be, or not to be")])
    out = lm.model(ids[:, :-1], ids[:, 1:])
    assert out.logits.shape == (1, ids.shape[1] - 1, lm.config.model.vocab_size) and torch.isfinite(out.loss)
    sampled = lm.generate("ROMEO:", max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.95, seed=1)
    assert isinstance(sampled, str) and sampled == lm.generate("ROMEO:", max_new_tokens=5, temperature=0.8,
                                                               top_k=50, top_p=0.95, seed=1)
    assert isinstance(lm.generate("ROMEO:", max_new_tokens=5, temperature=0), str)
    result = perplexity(lm, data)
    assert {"loss", "ppl", "bits_per_byte"} <= result.keys() and result["ppl"] > 1


def test_load_passes_dtype_and_device_through(run):
    """docs/generation.md: `choicelm.load("runs/x", dtype="bf16")` halves the bytes read per token."""
    bf16 = choicelm.load(run, dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert isinstance(bf16.generate("ROMEO:", max_new_tokens=4, temperature=0), str)
    fp32 = choicelm.load(run, "cpu", "fp32")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32} and fp32.device.type == "cpu"
    with pytest.raises(ChoicelmError, match="dtype='fp16' is not allowed"):
        choicelm.load(run, dtype="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ChoicelmError, match="device 'cuda'"):
            choicelm.load(run, device="cuda")
    with pytest.raises(ChoicelmError, match="device 'gpu0' is not a device"):
        choicelm.load(run, device="gpu0")


def test_generation_doc_examples(run):
    lm = choicelm.load(run)
    batched = lm.generate(["ROMEO:", "JULIET: O"], max_new_tokens=4, temperature=0.8, top_k=50, seed=1)
    assert isinstance(batched, list) and len(batched) == 2 and all(isinstance(t, str) for t in batched)
    beams = lm.generate("ROMEO:", max_new_tokens=4, num_beams=4, num_return_sequences=2)
    assert isinstance(beams, list) and len(beams) == 2
    streamed = "".join(lm.stream("ROMEO:", max_new_tokens=8, temperature=0, stop=["\n\n"]))
    assert streamed == lm.generate("ROMEO:", max_new_tokens=8, temperature=0, stop=["\n\n"])


def test_fine_tuning_doc_example(prepared, tmp_path):
    """docs/fine-tuning.md, From Python: finetune(load_config(...), out), load, classify, evaluate_file."""
    from choicelm.core.config import load_config
    from choicelm.evaluation.tasks import evaluate_file
    from choicelm.finetune.run import finetune

    tok, _ = prepared
    rng = random.Random(0)
    for name, n in (("train.csv", 40), ("val.csv", 10)):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                label = rng.choice(["war", "peace"])
                w.writerow([f"{'sword blood' if label == 'war' else 'love day'} {rng.random():.3f}", label])
    out = tmp_path / "cls"
    finetune(load_config(ROOT / "configs" / "bert-tiny.yaml", [
        "--finetune.task=classify", f"--finetune.tokenizer={tok}", f"--finetune.train_file={tmp_path / 'train.csv'}",
        f"--finetune.val_file={tmp_path / 'val.csv'}", "--train.max_steps=3", "--train.eval_every=0",
        "--train.progress=false", "--train.peak_flops=1e12"]), out)
    lm = choicelm.load(out)
    assert lm.classify("sword blood") in ("war", "peace")
    (label, probs), = lm.classify(["love day"], return_probs=True)
    assert set(probs) == {"war", "peace"} and label == max(probs, key=probs.get)
    report = evaluate_file(lm, tmp_path / "val.csv")
    assert report["task"] == "classify" and report["examples"] == 10
    assert json.loads((out / "eval.json").read_text())["examples"] == 10


def test_an_imported_wordpiece_tokenizer_says_so(tmp_path):
    """A BERT WordPiece tokenizer reported itself as kind='char' (issue 18)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from choicelm.text import Tokenizer

    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.train_from_iterator(["the king and the queen are reading"] * 10, trainers.WordPieceTrainer(
        vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"sep_token": "[SEP]", "cls_token": "[CLS]"}))
    tok = Tokenizer.load(tmp_path)
    assert tok.kind == "wordpiece" and repr(tok).startswith("Tokenizer(kind='wordpiece'")
    lengths = tok.token_byte_lengths()
    for token in ("king", "##ing"):
        if hf.token_to_id(token) is not None:
            assert lengths[hf.token_to_id(token)] == len(token.removeprefix("##"))


def test_finetune_from_a_hugging_face_folder_says_what_to_run(tmp_path, capsys):
    """--from HF_DIR said the checkpoint 'is incomplete (no COMPLETE marker ...)'; it must say to convert it."""
    from choicelm.cli import main

    hf = tmp_path / "hf-bert"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (hf / "model.safetensors").write_bytes(b"\0" * 16)
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    assert main(["finetune", "--task", "classify", "--from", str(hf), "--train", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a Hugging Face model folder" in err
    assert f"choicelm convert from-hf {hf} OUT" in err and "COMPLETE" not in err
    assert not (tmp_path / "run").exists()
