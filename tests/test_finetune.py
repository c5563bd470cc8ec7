"""`choicelm finetune` against independent references: scikit-learn and sacrebleu on the model's own outputs,
Hugging Face's GPT-2 sequence classifier and chat-template renderer, hand-built SFT targets, LoRA's merge, an
uninterrupted run for resume, and every bad input the issue names."""

import csv
import json
import random

import pytest
import torch

import choicelm
from choicelm.cli import main
from choicelm.core.config import load_config
from choicelm.core.errors import ChoicelmError
from choicelm.data import tasks as fd
from choicelm.finetune.run import finetune
from choicelm.text.chat_template import SFT_TEMPLATE, render_chat
from choicelm.models import build_model
from choicelm.text import Tokenizer
from choicelm.core import checkpoint as ckpt

from conftest import ROOT

WORDS = "the king queen sword crown night day love death blood".split()


def write_classification(path, n, rng):
    """war if the text holds 'sword blood', peace if 'love day', among random words."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.choice(["war", "peace"])
            words = [rng.choice(WORDS) for _ in range(5)] + ("sword blood" if label == "war" else "love day").split()
            rng.shuffle(words)
            w.writerow([" ".join(words), label])


def write_reversal(path, n, rng):
    with open(path, "w") as f:
        f.write("source\ttarget\n")
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            f.write(f"{' '.join(words)}\t{' '.join(reversed(words))}\n")


def write_repeat_chats(path, n, rng):
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            if i % 2:
                f.write(json.dumps({"prompt": f"repeat: {words}", "response": words}) + "\n")
            else:
                f.write(json.dumps({"messages": [{"role": "system", "content": "Echo."},
                                                 {"role": "user", "content": f"repeat: {words}"},
                                                 {"role": "assistant", "content": words}]}) + "\n")


@pytest.fixture(scope="session")
def tasks(tmp_path_factory, prepared):
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    write_classification(root / "train.csv", 400, rng)
    write_classification(root / "val.csv", 60, rng)
    write_reversal(root / "train.tsv", 600, rng)
    write_reversal(root / "val.tsv", 40, rng)
    write_repeat_chats(root / "train.jsonl", 600, rng)
    write_repeat_chats(root / "val.jsonl", 40, rng)
    return root, prepared[0]


def run(tasks, out, task, config, train, val=None, *extra):
    root, tok = tasks
    overrides = [f"--finetune.task={task}", f"--finetune.train_file={root / train}", "--train.progress=false",
                 *([f"--finetune.val_file={root / val}"] if val else []), *extra]
    if not any(o.startswith("--finetune.init") for o in extra):
        overrides.append(f"--finetune.tokenizer={tok}")
    return finetune(load_config(ROOT / "configs" / config, overrides), out)


@pytest.fixture(scope="session")
def bert_classifier(tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    run(tasks, out, "classify", "bert-tiny.yaml", "train.csv", "val.csv", "--train.max_steps=120",
        "--train.micro_batch_size=16")
    return out


def test_classifier_learns_and_its_metrics_equal_scikit_learns(bert_classifier, tasks):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    report = json.loads((bert_classifier / "eval.json").read_text())
    lm = choicelm.load(bert_classifier)
    assert lm.labels == ["peace", "war"]
    rows = fd.read_classification(tasks[0] / "val.csv")
    truth, predicted = [label for _, label in rows], lm.classify([text for text, _ in rows])
    assert report["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert report["f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert report["confusion_matrix"] == confusion_matrix(truth, predicted, labels=lm.labels).tolist()
    assert report["accuracy"] > 0.8
    label, probs = lm.classify("sword blood the king", return_probs=True)
    assert label == "war" and sum(probs.values()) == pytest.approx(1.0)


def test_gpt_classifier_pools_the_last_real_token_as_hugging_face_does():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from choicelm.interop.hf import state_dict_to_hf
    from choicelm.models.gpt_hf import GPT2

    torch.manual_seed(0)
    config = load_config(None, ["--model.vocab_size=96", "--model.block_size=16", "--model.n_layer=2",
                                "--model.n_head=2", "--model.n_embd=32", "--model.n_labels=3"]).model
    ours = build_model(config).eval()
    torch.nn.init.zeros_(ours.classifier.bias)  # Hugging Face's score layer has no bias
    hf = GPT2ForSequenceClassification(GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                                  num_labels=3, pad_token_id=0)).eval()
    state = state_dict_to_hf(ours.state_dict(), config, GPT2)
    state["score.weight"] = ours.classifier.weight
    hf.load_state_dict(state, strict=False)
    ids = torch.randint(1, 96, (3, 10))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # right padding (pad id 0 tells HF where the row ends)
    ids[2, 3:], mask[2, 3:] = 0, 0
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask_BS=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gpt_classification_fine_tunes_from_a_language_model(tasks, tmp_path):
    lm_run = tmp_path / "lm"
    run(tasks, lm_run, "sft", "tiny.yaml", "train.jsonl", None, "--train.max_steps=2")
    out = run(tasks, tmp_path / "cls", "classify", "tiny.yaml", "train.csv", "val.csv", f"--finetune.init={lm_run}",
              "--train.max_steps=3")
    lm = choicelm.load(out)
    assert lm.config.model.kind == "gpt" and lm.config.model.n_labels == 2 and lm.labels == ["peace", "war"]
    assert json.loads((tmp_path / "cls" / "eval.json").read_text())["examples"] == 60
    from choicelm.serve.scheduler import Scheduler

    for refuse in (lambda: lm.generate("hi"), lambda: Scheduler(lm)):
        with pytest.raises(ChoicelmError, match="classif"):
            refuse()


def test_seq2seq_learns_to_reverse_and_its_bleu_rouge_equal_the_libraries(tasks, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    run(tasks, tmp_path / "s2s", "seq2seq", "seq2seq-tiny.yaml", "train.tsv", "val.tsv", "--train.max_steps=150")
    report = json.loads((tmp_path / "s2s" / "eval.json").read_text())
    lm = choicelm.load(tmp_path / "s2s")
    pairs = fd.read_pairs(tasks[0] / "val.tsv")
    outputs = lm.generate([s for s, _ in pairs], max_new_tokens=63, temperature=0)
    refs = [t for _, t in pairs]
    assert report["bleu"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [refs]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = sum(scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outputs)) / len(refs)
    assert report["rouge"]["rougeL"] == pytest.approx(rouge_l)
    assert report["bleu"]["bleu"] > 60, report["samples"]
    assert report["bleu"]["signature"].startswith("nrefs:1|case:mixed")


def test_sft_trains_on_reply_tokens_only(tasks):
    tok = Tokenizer.load(tasks[1])
    messages = [{"role": "system", "content": "Echo."}, {"role": "user", "content": "repeat: king"},
                {"role": "assistant", "content": "king"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "king queen"}]
    ids, trained = fd.sft_ids(tok, SFT_TEMPLATE, messages, 200)
    eos = tok.special_tokens["eos"]
    assert tok.decode(ids) == render_chat(SFT_TEMPLATE, messages, eos_token=eos)
    learned = [tok.decode([i for i, t in zip(ids, trained) if t])]
    assert learned == [f" king{eos}\n king queen{eos}\n"]  # the replies, their end tokens, the template's newline
    x_BT, y_BT = fd.SFTDataset([ids], [trained], 0).collate([0])
    assert (y_BT[0] != -100).tolist() == trained[1:]


def test_chat_template_renders_as_transformers_and_travels_with_the_model(tasks, tmp_path):
    from transformers import PreTrainedTokenizerFast

    out = run(tasks, tmp_path / "sft", "sft", "tiny.yaml", "train.jsonl", "val.jsonl", "--train.max_steps=300",
              "--train.micro_batch_size=16", "--model.block_size=64")
    lm = choicelm.load(out)
    assert lm.tokenizer.chat_template == SFT_TEMPLATE
    hf = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    messages = [{"role": "system", "content": "Echo."}, {"role": "user", "content": "repeat: king"},
                {"role": "assistant", "content": "king"}, {"role": "user", "content": "repeat: love day"}]
    from choicelm.text.chat_template import chat_prompt

    assert chat_prompt(lm.tokenizer, messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    from choicelm.generation.chat import ChatSession

    session = ChatSession(lm, max_new_tokens=12, temperature=0)
    reply = "".join(session.reply("repeat: king queen night"))
    assert 2 <= len(reply.split()) <= 4 and set(reply.split()) <= {"king", "queen", "night"}  # echoes, then stops
    assert json.loads((tmp_path / "sft" / "eval.json").read_text())["loss"] < 0.5


def test_lora_run_keeps_the_base_frozen_and_loads_merged(bert_classifier, tasks, tmp_path):
    from choicelm.models.lora import apply_lora, has_lora, lora_settings

    out = run(tasks, tmp_path / "lora", "classify", "bert-tiny.yaml", "train.csv", "val.csv",
              f"--finetune.init={bert_classifier}", "--finetune.lora_r=4", "--train.max_steps=5")
    cfg = choicelm.load(out).config
    base = choicelm.load(bert_classifier, device="cpu").model
    adapted = apply_lora(build_model(cfg.model, cfg.moe), lora_settings(cfg))
    ckpt.load_weights(adapted, out)
    state, base_state = adapted.state_dict(), base.state_dict()
    frozen = [k for k in state if ".base_layer." in k]
    assert frozen and all(torch.equal(state[k], base_state[k.replace(".base_layer", "")]) for k in frozen)
    assert not torch.equal(state["classifier.weight"], base_state["classifier.weight"])  # the head trains in full
    merged = choicelm.load(out, device="cpu")
    assert not has_lora(merged.model)
    ids = torch.randint(5, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, adapted.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_adversarial_fine_tuning_runs_and_changes_the_updates(bert_classifier, tasks, tmp_path):
    plain = run(tasks, tmp_path / "plain", "classify", "bert-tiny.yaml", "train.csv", None,
                f"--finetune.init={bert_classifier}", "--train.max_steps=3")
    fgm = run(tasks, tmp_path / "fgm", "classify", "bert-tiny.yaml", "train.csv", None,
              f"--finetune.init={bert_classifier}", "--train.max_steps=3", "--finetune.adversarial=fgm",
              "--finetune.adv_epsilon=0.5")
    a, b = choicelm.load(plain).model.state_dict(), choicelm.load(fgm).model.state_dict()
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])


def test_fine_tuning_killed_for_real_resumes_exactly(tasks, tmp_path):
    """8 steps straight == the same command SIGKILLed after step 6 (checkpoint at 4) then --resume auto. Warmup 1 and
    max_steps fixed, so the cosine schedule (which depends on max_steps) is live across the kill: a test that stops
    at max_steps=4 and resumes with max_steps=8 would hide a schedule that ignores the restored position."""
    from choicelm.train.loop import KILL_AFTER_STEP_ENV
    from test_train import cli_subprocess, losses

    root, tok = tasks
    common = ["finetune", "--task", "classify", "--config", ROOT / "configs" / "bert-tiny.yaml", "--tokenizer", tok,
              "--train", root / "train.csv", "--val", root / "val.csv", "--train.max_steps=8",
              "--train.save_every=4", "--train.eval_every=3", "--model.dropout=0.1", "--optim.warmup_steps=1",
              "--train.peak_flops=1e12"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # every part in a child with the same thread count: bit-equal weights need the same reduction order, and an
    # earlier test may have changed this process's torch threads
    one_thread = {"OMP_NUM_THREADS": "1"}
    cli_subprocess(*common, "--out", straight, env_extra=one_thread)
    proc = cli_subprocess(*common, "--out", killed, env_extra={KILL_AFTER_STEP_ENV: "6", **one_thread}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert max(losses(killed)) == 6 and [c.step for c in ckpt.list_checkpoints(killed)] == [4]
    cli_subprocess(*common, "--out", killed, "--resume", "auto", env_extra=one_thread)
    assert losses(killed) == losses(straight)  # no duplicated rows either
    a = choicelm.load(straight).model.state_dict()
    b = choicelm.load(killed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_evaluate_cli_scores_a_task_file(bert_classifier, tasks, capsys):
    assert main(["evaluate", "--checkpoint", str(bert_classifier), "--data", str(tasks[0] / "val.csv"),
                 "--metrics", "accuracy,f1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "classify" and 0 <= report["f1"] <= 1
    assert main(["evaluate", "--checkpoint", str(bert_classifier), "--data", str(tasks[0] / "val.csv"),
                 "--metrics", "bleu"]) == 2
    assert "bleu" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing_column", "unseen_label", "pair_column", "ngram", "decoder_seq2seq",
                                  "bert_sft", "no_tokenizer", "one_label"])
def test_bad_input_is_one_clear_error(case, tasks, bert_classifier, tmp_path, capsys):
    root, tok = tasks
    bad = tmp_path / "bad.csv"
    cfg = ROOT / "configs" / "bert-tiny.yaml"
    args = {"task": "classify", "config": cfg, "train": root / "train.csv"}
    expected = ""
    if case == "missing_column":
        bad.write_text("text,label\nhello,war\nthere,\n")
        args["train"], expected = bad, f"{bad}:3: the column 'label' is missing or empty"
    elif case == "unseen_label":
        bad.write_text("text,label\nhello,war\nthere,maybe\n")
        args["val"], expected = bad, "label(s) 'maybe' that the model was not trained on; known labels: peace, war"
    elif case == "pair_column":
        bad_tsv = tmp_path / "bad.tsv"
        bad_tsv.write_text("a b\tb a\nonly a source\n")
        args.update(task="seq2seq", config=ROOT / "configs" / "seq2seq-tiny.yaml", train=bad_tsv)
        expected = f"{bad_tsv}:2: expected a source and a target separated by one tab"
    elif case == "ngram":
        args["config"], expected = ROOT / "configs" / "ngram.yaml", "--task classify does not fit a ngram model"
    elif case == "decoder_seq2seq":
        args.update(task="seq2seq", config=ROOT / "configs" / "tiny.yaml", train=root / "train.tsv")
        expected = "--task seq2seq does not fit a gpt model; it needs an encoder-decoder"
    elif case == "bert_sft":
        args.update(task="sft", train=root / "train.jsonl")
        expected = "--task sft does not fit a bert model; it needs a gpt decoder"
    elif case == "no_tokenizer":
        expected = "a fresh model needs a tokenizer: pass --tokenizer DIR"
    elif case == "one_label":
        bad.write_text("text,label\nhello,war\nthere,war\n")
        args["train"], expected = bad, "a classifier needs at least 2 classes"
    argv = ["finetune", "--out", str(tmp_path / "run"), "--train.progress=false"]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    if case != "no_tokenizer":
        argv += ["--tokenizer", str(tok)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_fine_tuning_data_splits_are_deterministic_batches(tasks):
    tok = Tokenizer.load(tasks[1])
    rows = fd.read_classification(tasks[0] / "val.csv")
    ids = [fd.classification_ids(tok, t, "bert", 16) for t, _ in rows]
    assert all(len(i) <= 16 and i[0] == tok.bos_id and i[-1] == tok.eos_id for i in ids)
    data = fd.ClassificationDataset(ids, fd.label_ids([lb for _, lb in rows], ["peace", "war"], "val"), 0)
    ids_BT, mask_BT, labels_B = data.batch([3, 1], 16)
    assert mask_BT.sum(1).tolist() == [len(ids[3]), len(ids[1])] and labels_B.shape == (2,)
    with pytest.raises(ChoicelmError, match="not trained on"):
        fd.label_ids(["war", "maybe"], ["peace", "war"], "test.csv")


def test_ddp_fine_tuning_matches_one_process(tasks, tmp_path):
    """torchrun with 2 ranks x micro 2 == one process with micro 2 x accumulation 2: examples of different
    lengths on each rank still weigh the same, as the loss is divided by the global count of labels."""
    from test_train import cli_subprocess, torchrun

    root, tok = tasks
    common = ["--task", "seq2seq", "--config", ROOT / "configs" / "seq2seq-tiny.yaml", "--tokenizer", tok,
              "--train", root / "train.tsv", "--train.max_steps=3", "--train.micro_batch_size=2",
              "--train.global_batch_size=4", "--train.eval_every=0"]
    cli_subprocess("finetune", *common, "--out", tmp_path / "single")
    torchrun("finetune", *common, "--out", tmp_path / "ddp")
    a = choicelm.load(tmp_path / "single", device="cpu").model.state_dict()
    b = choicelm.load(tmp_path / "ddp", device="cpu").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
