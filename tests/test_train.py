"""The training loop against independent references: hand-computed losses, straight vs killed-and-resumed
runs, one process vs two (DDP), and every bad input the CLI promises to refuse."""

import csv
import random
import re
import shlex
import signal
import time
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from choicelm.cli import main
from choicelm.core.config import load_config
from choicelm.core.errors import ChoicelmError
from choicelm.data.loader import LMBatchSampler, TokenDataset
from choicelm.models import build_model
from choicelm.core import checkpoint as ckpt
from choicelm.train.loop import KILL_AFTER_STEP_ENV, STEP_SLEEP_ENV, NonFiniteLossError, pretrain
from choicelm.core.run_dir import COLUMNS, read_metrics
from choicelm.train.optim import lr_at

from conftest import TINY, free_port


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def losses(run: Path) -> dict[int, str]:
    """Per-step train loss as written (exact text, so equality is bit-level up to 10 digits). The rows must be
    strictly increasing steps: a resume that duplicated or reordered rows fails here, not hidden in the dict."""
    with open(run / "metrics.csv") as f:
        rows = [(int(r["step"]), r["train_loss"]) for r in csv.DictReader(f)]
    steps = [step for step, _ in rows]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order metrics rows: {steps}"
    return dict(rows)


def weights(step_dir: Path) -> dict:
    return load_file(str(step_dir / "model.safetensors"))


def cli_subprocess(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "choicelm", *map(str, args)], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def test_pretrain_writes_a_complete_run(prepared, tmp_path):
    _, data = prepared
    run = tmp_path / "run"
    assert run_cli("pretrain", "--config", TINY, "--data", data, "--out", run) == 0
    rows = read_metrics(run)
    with open(run / "metrics.csv") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5  # it learns
    val = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in val] == [10, 20]
    assert math.isclose(val[-1]["val_ppl"], math.exp(val[-1]["val_loss"]), rel_tol=1e-6)
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["data_wait"] < 1 for r in rows)
    assert rows[-1]["tokens"] == 20 * 4 * 32
    assert [c.step for c in ckpt.list_checkpoints(run)] == [10, 20]
    step = run / "step-00000020"
    for name in ("model.safetensors", "optimizer.pt", "trainer.pt", "config.yaml", "tokenizer/tokenizer.json", "COMPLETE"):
        assert (step / name).exists(), name
    assert (run / "config.yaml").exists() and list((run / "tensorboard").glob("events.*"))
    cfg = load_config(run / "config.yaml")
    assert cfg.model.vocab_size == 512 and cfg.data.path == str(data)


def test_first_step_loss_equals_hand_computed_cross_entropy(prepared, tmp_path):
    """Two micro-batches of 4 (gradient accumulation) must report the mean over all 8 x 32 tokens,
    equal to F.cross_entropy on a freshly built model with the same seed and the same windows."""
    _, data = prepared
    run = tmp_path / "run"
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=1",
            "--train.global_batch_size=8", "--train.eval_every=0")
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    sampler = LMBatchSampler(TokenDataset(data, "train"), 32, 4, 8, cfg.train.seed)
    micro = sampler.next_step()
    assert len(micro) == 2
    x, y = torch.cat([b[0] for b in micro]), torch.cat([b[1] for b in micro])
    logits = model(x).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    assert float(losses(run)[1]) == pytest.approx(expected, abs=1e-6)


def test_gradient_accumulation_matches_one_big_batch(prepared, tmp_path):
    _, data = prepared
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--config", TINY, "--data", data, "--train.max_steps=4", "--train.eval_every=0"]
    run_cli("pretrain", *common, "--out", a, "--train.micro_batch_size=8")
    run_cli("pretrain", *common, "--out", b, "--train.micro_batch_size=2", "--train.global_batch_size=8")
    la, lb = losses(a), losses(b)
    for step in la:
        assert float(la[step]) == pytest.approx(float(lb[step]), abs=1e-5)


def test_resume_after_a_real_kill_is_bit_identical(prepared, tmp_path):
    """12 steps straight == 6 steps, checkpoint, 3 more steps, SIGKILL, then --resume auto to 12."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.max_steps=12", "--train.save_every=6",
              "--train.eval_every=4", "--model.dropout=0.1"]  # dropout: the RNG state must be restored too
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli_subprocess("pretrain", *common, "--out", straight)
    proc = cli_subprocess("pretrain", *common, "--out", killed, env_extra={KILL_AFTER_STEP_ENV: "9"}, check=False)
    assert proc.returncode == -9  # SIGKILL: no cleanup ran
    assert max(losses(killed)) == 9 and [c.step for c in ckpt.list_checkpoints(killed)] == [6]
    cli_subprocess("pretrain", *common, "--out", killed, "--resume", "auto")
    assert losses(killed) == losses(straight)
    wa, wb = weights(straight / "step-00000012"), weights(killed / "step-00000012")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_muon_resume_after_a_real_kill_is_bit_identical(prepared, tmp_path):
    """optim.name=muon (Muon momentum buffers + AdamW moments in the checkpoint) on a qk_norm model: 8 steps
    straight == 5 steps, checkpoint at 4, SIGKILL after 5, then --resume auto to 8."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.max_steps=8", "--train.save_every=4",
              "--train.eval_every=0", "--optim.name=muon", "--optim.muon_lr=0.02", "--model.qk_norm=true"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli_subprocess("pretrain", *common, "--out", straight)
    proc = cli_subprocess("pretrain", *common, "--out", killed, env_extra={KILL_AFTER_STEP_ENV: "5"}, check=False)
    assert proc.returncode == -9
    assert max(losses(killed)) == 5 and [c.step for c in ckpt.list_checkpoints(killed)] == [4]
    cli_subprocess("pretrain", *common, "--out", killed, "--resume", "auto")
    assert losses(killed) == losses(straight)
    wa, wb = weights(straight / "step-00000008"), weights(killed / "step-00000008")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "transformer.h.0.attn.q_norm.weight" in wa
    assert set(torch.load(straight / "step-00000008" / "optimizer.pt", weights_only=False)) == {"muon", "adamw"}


def test_resume_refuses_a_different_optimizer(prepared, tmp_path, capsys):
    _, data = prepared
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.eval_every=0"]
    assert run_cli(*args, "--train.max_steps=2") == 0
    assert run_cli(*args, "--resume", "auto", "--train.max_steps=4", "--optim.name=muon") == 2
    err = capsys.readouterr().err
    assert "trained with optim.name=adamw" in err and "--optim.name=adamw" in err and len(err.strip().splitlines()) == 1


def test_ddp_two_processes_match_one(prepared, tmp_path):
    """torchrun with 2 ranks x micro 2 == one process with micro 2 x accumulation 2 (global batch 4)."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.max_steps=4", "--train.eval_every=2",
              "--train.micro_batch_size=2", "--train.global_batch_size=4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    cli_subprocess("pretrain", *common, "--out", single)
    torchrun("pretrain", *common, "--out", ddp)
    ls, ld = read_metrics(single), read_metrics(ddp)
    assert len(ls) == len(ld) == 4
    for rs, rd in zip(ls, ld):
        assert rd["train_loss"] == pytest.approx(rs["train_loss"], abs=1e-5)
        if rs["val_loss"] is not None:
            assert rd["val_loss"] == pytest.approx(rs["val_loss"], abs=1e-5)
    ws, wd = weights(single / "step-00000004"), weights(ddp / "step-00000004")
    assert all(torch.allclose(ws[k], wd[k], atol=1e-5) for k in ws)
    assert [c.step for c in ckpt.list_checkpoints(ddp)] == [4]


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "choicelm", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_resume_with_dropout_is_exact(prepared, tmp_path):
    """4 steps straight == 2 steps + resume to 4, on 2 ranks, with dropout drawing from the restored RNG."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.eval_every=0", "--model.dropout=0.2",
              "--optim.schedule=constant", "--optim.warmup_steps=0", "--train.save_every=2"]
    torchrun("pretrain", *common, "--out", tmp_path / "straight", "--train.max_steps=4")
    torchrun("pretrain", *common, "--out", tmp_path / "split", "--train.max_steps=2")
    torchrun("pretrain", *common, "--out", tmp_path / "split", "--train.max_steps=4", "--resume", "auto")
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    wa, wb = weights(tmp_path / "straight" / "step-00000004"), weights(tmp_path / "split" / "step-00000004")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nonfinite_losses_skip_steps_then_stop(prepared, tmp_path, monkeypatch):
    from choicelm import objectives

    _, data = prepared
    calls = {"n": 0}
    real = objectives.causal_lm

    def poisoned(model, batch):  # steps 3 and 4 produce NaN, then everything after step 6
        calls["n"] += 1
        loss, n, out = real(model, batch)
        return (loss * float("nan") if calls["n"] in (3, 4) or calls["n"] > 6 else loss), n, out

    monkeypatch.setitem(objectives.OBJECTIVES, "causal_lm", poisoned)
    cfg = load_config(TINY, [f"--data.path={data}", "--train.eval_every=0", "--train.max_nonfinite=3"])
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        pretrain(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 2, 2, 2, 3, 4]


def test_stop_on_max_tokens_and_max_time(prepared, tmp_path):
    _, data = prepared
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", tmp_path / "a", "--train.max_tokens=1000")
    assert read_metrics(tmp_path / "a")[-1]["step"] == 8  # 8 x 128 tokens >= 1000
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", tmp_path / "b", "--train.max_time=1e-9")
    assert read_metrics(tmp_path / "b")[-1]["step"] == 1


def test_lr_schedules_against_hand_values():
    cfg = load_config(None, ["--optim.lr=1.0", "--optim.min_lr_ratio=0.1", "--optim.warmup_steps=10"]).optim
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    wsd = load_config(None, ["--optim.lr=1.0", "--optim.schedule=wsd", "--optim.warmup_steps=0",
                             "--optim.decay_fraction=0.2", "--optim.min_lr_ratio=0"]).optim
    assert lr_at(79, wsd, 100) == 1.0 and lr_at(90, wsd, 100) == pytest.approx(0.5)


# --- bad input: one clear error, non-zero exit, nothing overwritten --------------------------------------

def test_existing_run_is_refused_unless_resume_or_overwrite(prepared, tmp_path, capsys):
    _, data = prepared
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=2", "--train.eval_every=0"]
    assert run_cli(*args) == 0
    before = (run / "step-00000002" / "model.safetensors").read_bytes()
    assert run_cli(*args) == 2
    assert "already holds a run (checkpoint at step 2)" in capsys.readouterr().err
    assert (run / "step-00000002" / "model.safetensors").read_bytes() == before
    assert run_cli(*args, "--overwrite") == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_cli(*args[:-4], "--out", other, "--overwrite") == 2
    assert "not a choicelm run" in capsys.readouterr().err and (other / "notes.txt").exists()


def test_resume_refuses_a_different_model_config(prepared, tmp_path, capsys):
    _, data = prepared
    run = tmp_path / "run"
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=2", "--train.eval_every=0")
    assert run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--resume", "auto",
                   "--train.max_steps=4", "--model.n_layer=3") == 2
    err = capsys.readouterr().err
    assert "model config differs" in err and "n_layer: checkpoint 2 vs now 3" in err


def test_incomplete_truncated_and_foreign_checkpoints(prepared, tmp_path, capsys):
    _, data = prepared
    run = tmp_path / "run"
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=4",
            "--train.save_every=2", "--train.eval_every=0")
    # An interrupted save (no marker) is invisible to --resume auto and to load().
    (run / "step-00000004" / "COMPLETE").unlink()
    assert ckpt.resolve_checkpoint(run) == run / "step-00000002"
    assert run_cli("generate", "--checkpoint", run / "step-00000004", "--prompt", "a") == 2
    assert "incomplete" in capsys.readouterr().err
    # A truncated weights file behind a marker.
    weights_file = run / "step-00000002" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    assert run_cli("generate", "--checkpoint", run, "--prompt", "a") == 2
    assert "truncated or not a choicelm checkpoint" in capsys.readouterr().err
    # A folder that is no checkpoint at all.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 10)
    assert run_cli("evaluate", "--checkpoint", foreign, "--data", data) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def test_keep_last_and_best(prepared, tmp_path):
    _, data = prepared
    run = tmp_path / "run"
    run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=8", "--train.save_every=2",
            "--train.eval_every=2", "--train.keep_last=1")
    kept = [c.step for c in ckpt.list_checkpoints(run)]
    rows = {r["step"]: r["val_loss"] for r in read_metrics(run) if r["val_loss"] is not None}
    best = min(rows, key=rows.get)
    assert kept == sorted({8, int(best)})
    assert not list(run.glob(".tmp-*"))


MOE_FLAGS = ["--moe.experts=4", "--moe.every=1", "--moe.router=token_choice", "--moe.dropless=true"]


@pytest.mark.parametrize("flags,model", [(["--train.compile=true"], []), (["--train.precision=bf16"], []),
                                         (["--train.compile=true"], MOE_FLAGS)], ids=["compile", "bf16", "compile-moe"])
def test_compile_and_bf16_track_the_fp32_eager_losses(prepared, tmp_path, flags, model):
    """A compiled MoE block runs its (dynamic-shape) routing eagerly, with the same losses."""
    _, data = prepared
    common = ["--config", TINY, "--data", data, "--train.max_steps=3", "--train.eval_every=0", *model]
    run_cli("pretrain", *common, "--out", tmp_path / "eager")
    run_cli("pretrain", *common, "--out", tmp_path / "other", *flags)
    eager, other = losses(tmp_path / "eager"), losses(tmp_path / "other")
    tol = 1e-4 if "compile" in flags[0] else 2e-2  # bf16 matmuls round to 8 bits of mantissa
    assert all(float(other[s]) == pytest.approx(float(eager[s]), abs=tol) for s in eager)
    assert read_metrics(tmp_path / "other")[-1]["step"] == 3


# --- run folders: nothing lost, nothing mixed (issue 18) --------------------------------------------------

def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and mtime: equal snapshots = nothing changed on disk."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [folder, *sorted(folder.rglob("*"))]}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("choicelm: error: "), err
    return err


def test_resume_auto_refuses_a_run_without_a_complete_checkpoint(prepared, tmp_path, capsys):
    """Every checkpoint damaged (a garbled marker, a missing one): --resume auto must not delete the run and start
    over; it names what is wrong and the way out (--overwrite), and changes nothing."""
    _, data = prepared
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=4", "--train.save_every=2",
            "--train.eval_every=0"]
    assert run_cli(*args) == 0
    (run / "step-00000004" / "COMPLETE").write_text("x")
    (run / "step-00000002" / "COMPLETE").unlink()
    before = snapshot(run)
    assert run_cli(*args, "--resume", "auto") == 2
    err = one_error_line(capsys)
    assert "no complete checkpoint" in err and "step-00000004: unreadable COMPLETE" in err
    assert "step-00000002: no COMPLETE" in err and "up to step 4" in err and "--overwrite" in err
    assert snapshot(run) == before
    # The way out the message names: start over.
    assert run_cli(*args, "--resume", "auto", "--overwrite") == 0
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]


def test_resume_from_another_run_refuses_an_existing_out(prepared, tmp_path, capsys):
    """--resume A/step-N --out B, B an existing run: refused, B untouched (it used to cut and merge B's metrics
    and prune the new checkpoints). A new --out starts from A's checkpoint; --overwrite replaces B."""
    _, data = prepared
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["pretrain", "--config", TINY, "--data", data, "--train.eval_every=0", "--train.save_every=2"]
    assert run_cli(*common, "--out", a, "--train.max_steps=2") == 0
    assert run_cli(*common, "--out", b, "--train.max_steps=6") == 0
    before_a, before_b = snapshot(a), snapshot(b)
    assert run_cli(*common, "--out", b, "--train.max_steps=8", "--resume", a / "step-00000002") == 2
    err = one_error_line(capsys)
    assert "another run" in err and "mix" in err and "--overwrite" in err
    assert snapshot(a) == before_a and snapshot(b) == before_b
    # A checkpoint inside B and --overwrite of B: the checkpoint would be deleted first.
    assert run_cli(*common, "--out", b, "--train.max_steps=8", "--resume", b / "step-00000006", "--overwrite") == 2
    assert "would delete" in one_error_line(capsys) and snapshot(b) == before_b
    # A fresh --out forks A at step 2; its losses continue A's (the same as a straight run).
    assert run_cli(*common, "--out", c, "--train.max_steps=4", "--resume", a / "step-00000002") == 0
    assert sorted(losses(c)) == [3, 4] and [x.step for x in ckpt.list_checkpoints(c)] == [4]
    assert run_cli(*common, "--out", b, "--train.max_steps=4", "--resume", a / "step-00000002", "--overwrite") == 0
    assert losses(b) == losses(c) and [x.step for x in ckpt.list_checkpoints(b)] == [4]
    assert snapshot(a) == before_a


def test_a_second_writer_is_refused_while_a_run_is_live(prepared, tmp_path, capsys):
    """A live run holds RUN/.lock (flock): --resume auto and --overwrite from a second process are refused in one
    line and change nothing; once the writer is gone (even by SIGKILL) the lock goes with it."""
    import signal
    import time

    _, data = prepared
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.eval_every=0", "--train.save_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "choicelm", *map(str, args), "--train.max_steps=100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(run):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for extra in (["--resume", "auto"], ["--overwrite"], ["--resume", "auto", "--overwrite"]):
            assert run_cli(*args, "--train.max_steps=100000", *extra) == 2
            err = one_error_line(capsys)
            assert "in use by another choicelm process" in err and f"pid {proc.pid}" in err
            assert proc.poll() is None and (run / "config.yaml").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = ckpt.list_checkpoints(run)[-1].step
    assert run_cli(*args, f"--train.max_steps={last + 2}", "--resume", "auto") == 0
    assert ckpt.list_checkpoints(run)[-1].step == last + 2
    assert (run / ".lock").read_text().strip() == str(os.getpid())  # this process took the lock over


def test_overwrite_checks_everything_before_deleting_the_old_run(prepared, tmp_path, capsys):
    """--overwrite with a setting that cannot work refuses before touching the old run: a validation split shorter
    than block_size+1 (found only at the first evaluation before), a model far larger than the memory."""
    _, data = prepared
    run = tmp_path / "run"
    args = ["pretrain", "--config", TINY, "--data", data, "--out", run, "--train.eval_every=1", "--train.max_steps=2"]
    assert run_cli(*args) == 0
    before = snapshot(run)
    assert run_cli(*args, "--overwrite", "--model.block_size=60000", "--train.micro_batch_size=1") == 2
    err = one_error_line(capsys)
    assert "val split" in err and "60,001" in err
    assert snapshot(run) == before
    assert run_cli(*args, "--overwrite", "--model.n_layer=1e9") == 2
    err = one_error_line(capsys)
    assert "GiB to train" in err and "available" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("overrides", [
    [], ["--model.mlp=swiglu", "--model.pos=rope", "--model.tie_embeddings=false", "--model.bias=false",
         "--model.n_kv_head=1", "--model.norm=rmsnorm"],
    ["--moe.experts=4", "--moe.every=1"], ["--moe.experts=4", "--moe.router=token_choice", "--moe.shared_expert=true"],
    ["--model.kind=bert"], ["--model.kind=bert", "--moe.experts=4", "--moe.every=1"], ["--model.kind=seq2seq"],
    ["--model.kind=lstm"]],
    ids=["gpt", "llama", "moe-ec", "moe-tc-shared", "bert", "bert-moe", "seq2seq", "lstm"])
def test_parameter_estimate_matches_the_built_model(overrides):
    """The memory check counts parameters from the config alone; it must agree with the model built from it."""
    from choicelm.train.loop import estimate_parameters

    cfg = load_config(TINY, ["--model.vocab_size=512", "--model.n_embd=64", *overrides])
    real = sum(p.numel() for p in build_model(cfg.model, cfg.moe).parameters())
    assert estimate_parameters(cfg) == pytest.approx(real, rel=0.05)


# --- non-finite training: one line, never a checkpoint of nan weights (issue 18, item 7) ---------------------

def test_weights_that_turn_inf_stop_the_run_before_anything_is_saved(prepared, tmp_path, capsys):
    """lr=3e38 (finite, so the config allows it) blows the weights up to inf in one AdamW step: the run stops at the
    next step in one line, with no checkpoint of those weights (it used to save them and exit 0)."""
    _, data = prepared
    run = tmp_path / "run"
    assert run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--optim.lr=3e38",
                   "--optim.warmup_steps=0", "--train.max_steps=4", "--train.eval_every=0") == 2
    err = one_error_line(capsys)
    assert "stopped at step 2: the weights are no longer finite" in err and "lower optim.lr" in err
    assert ckpt.list_checkpoints(run) == [] and not list(run.glob("step-*")) and not list(run.glob(".tmp-*"))


def test_a_run_that_ends_on_nonfinite_losses_saves_no_final_checkpoint(prepared, tmp_path, capsys):
    """lr=1e30: the weights stay finite but huge, every later loss is nan (skipped), and the run reaches max_steps
    before max_nonfinite; it must not end with exit 0 and a final checkpoint of a broken model, nor save one at a
    skipped step (the save is deferred to the next step with a finite loss)."""
    _, data = prepared
    run = tmp_path / "run"
    assert run_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--optim.lr=1e30",
                   "--optim.warmup_steps=0", "--train.max_steps=4", "--train.eval_every=0", "--train.save_every=1") == 2
    err = one_error_line(capsys)
    assert "stopped at step 4: 3 non-finite losses in a row" in err and "the run ended there" in err
    assert [c.step for c in ckpt.list_checkpoints(run)] == [1]  # before the blow-up; never one after it


# --- SIGINT / SIGTERM: finish the step, save, say how to resume (issue 18, item 5) ----------------------------

def wait_for_rows(run: Path, n: int, proc) -> int:
    """Block until RUN/metrics.csv has at least n rows (the child is training); returns the row count."""
    deadline = time.monotonic() + 120
    while True:
        try:
            rows = len(read_metrics(run))
        except (OSError, ValueError, KeyError, ChoicelmError):
            rows = 0
        if rows >= n:
            return rows
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)


def wait_for_checkpoint_after(run: Path, step: int, proc) -> None:
    """Block until RUN holds a complete checkpoint newer than `step`, or the child ended with status 0."""
    deadline = time.monotonic() + 120
    while not any(c.step > step for c in ckpt.list_checkpoints(run)):
        if proc.poll() == 0:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def popen_cli(*args, env_extra=None):
    """The CLI in a child with one thread, as this process (conftest.py): weights compare bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "choicelm", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_and_resume_continues_exactly(prepared, tmp_path, sig):
    """A real signal from outside in the middle of a run: it finishes the step, writes a checkpoint (no periodic save
    is due), exits 128+signal with one line naming the checkpoint and the command to continue; that command ends
    with the same losses and weights as an uninterrupted run (rows every 3 steps: the partial window is saved too)."""
    _, data = prepared
    common = ["pretrain", "--config", TINY, "--data", data, "--train.max_steps=40", "--train.save_every=100",
              "--train.eval_every=0", "--train.log_every=3", "--model.dropout=0.1", "--train.peak_flops=1e12"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(*common, "--out", straight) == 0
    proc = popen_cli(*common, "--out", stopped, env_extra={STEP_SLEEP_ENV: "0.05"})
    wait_for_rows(stopped, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    (line,) = err.strip().splitlines()
    found = re.fullmatch(rf"choicelm: stopped by {sig.name} after step (\d+); saved (\S+); to continue: (.+)", line)
    assert found, line
    step = int(found.group(1))
    assert 6 <= step < 40 and found.group(2) == str(stopped / ckpt.step_dir_name(step))
    assert [c.step for c in ckpt.list_checkpoints(stopped)] == [step] and not list(stopped.glob(".tmp-*"))
    command = shlex.split(found.group(3))
    assert command[:2] == ["choicelm", "pretrain"] and command[-2:] == ["--resume", "auto"]
    assert run_cli(*command[1:]) == 0
    assert losses(stopped) == losses(straight)
    wa, wb = weights(straight / "step-00000040"), weights(stopped / "step-00000040")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_second_ctrl_c_exits_at_once_without_saving(prepared, tmp_path):
    """Two SIGINTs within one (slow) step: the second does not wait for the step and the save; exit 130 in one
    line, and the run keeps only what it had (no checkpoint, no temporary folder)."""
    _, data = prepared
    run = tmp_path / "run"
    proc = popen_cli("pretrain", "--config", TINY, "--data", data, "--out", run, "--train.max_steps=40",
                     "--train.save_every=100", "--train.eval_every=0", "--train.peak_flops=1e12",
                     env_extra={STEP_SLEEP_ENV: "3"})
    rows = wait_for_rows(run, 1, proc)  # step 1 just ended: step 2 starts within milliseconds and sleeps 3 s
    time.sleep(0.5)  # inside step 2 (signalled before it began, the run stops at once and saves step 1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    assert line.startswith("choicelm: interrupted (a second SIGINT stopped the run at once, without saving")
    assert len(read_metrics(run)) == rows and not list(run.glob("step-*")) and not list(run.glob(".tmp-*"))


# --- kills from outside at random moments, saves included (issue 18, tests that must be able to fail) ----------

def test_random_sigkills_including_during_saves_never_break_an_exact_resume(prepared, tmp_path):
    """A checkpoint every step (so most of a step's time is the save: model, optimizer, fsync, rename, marker,
    pruning) and SIGKILL from outside at random moments, five times, each followed by --resume auto: the final
    losses and weights equal an uninterrupted run's, metrics rows are never duplicated, and no kill leaves a
    checkpoint that loads wrong (every complete one is resumed from at least once on the way)."""
    _, data = prepared
    common = ["pretrain", "--config", TINY, "--data", data, "--train.max_steps=20", "--train.save_every=1",
              "--train.keep_last=2", "--train.eval_every=5", "--model.dropout=0.1", "--train.peak_flops=1e12"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli(*common, "--out", straight) == 0
    rng = random.Random(18)
    resumed_from = []
    for attempt in range(5):
        extra = ["--resume", "auto"] if attempt else []
        if attempt and not ckpt.list_checkpoints(killed):  # killed before its first checkpoint: start over
            extra.append("--overwrite")
        found = ckpt.list_checkpoints(killed)
        proc = popen_cli(*common, "--out", killed, *extra)
        wait_for_checkpoint_after(killed, found[-1].step if found else 0, proc)  # it is training: kill it soon
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.communicate()
        if proc.returncode == 0:  # it finished before the kill landed
            break
        found = ckpt.list_checkpoints(killed)
        resumed_from.append(found[-1].step if found else 0)
    assert run_cli(*common, "--out", killed, "--resume", "auto") == 0
    assert len(resumed_from) >= 3 and resumed_from == sorted(set(resumed_from)), resumed_from
    assert losses(killed) == losses(straight)
    wa, wb = weights(straight / "step-00000020"), weights(killed / "step-00000020")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(killed.glob(".tmp-*")) and [c.step for c in ckpt.list_checkpoints(killed)][-1] == 20


# --- resuming an older checkpoint of the same run loses nothing ------------------------------------------------

def test_resume_from_an_older_checkpoint_of_the_run_is_refused(prepared, tmp_path, capsys):
    """--resume RUN/step-2 while RUN holds step-4 and step-6: continuing would replace the newer checkpoints (and
    keep_last counts by step number, so it pruned them). Refused with nothing changed; a new --out forks it."""
    _, data = prepared
    run, fork = tmp_path / "run", tmp_path / "fork"
    common = ["pretrain", "--config", TINY, "--data", data, "--train.eval_every=0", "--train.save_every=2",
              "--train.keep_last=3"]
    assert run_cli(*common, "--out", run, "--train.max_steps=6") == 0
    before = snapshot(run)
    assert run_cli(*common, "--out", run, "--train.max_steps=8", "--resume", run / "step-00000002") == 2
    err = one_error_line(capsys)
    assert "older than this run's newer checkpoint(s) step-00000004, step-00000006" in err
    assert "nothing was changed" in err and "--resume auto" in err and "--out NEW_DIR" in err
    assert snapshot(run) == before
    assert run_cli(*common, "--out", fork, "--train.max_steps=6", "--resume", run / "step-00000002") == 0
    assert {s: v for s, v in losses(run).items() if s > 2} == losses(fork)
