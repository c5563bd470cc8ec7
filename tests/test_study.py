"""`choicelm study routing`: one training run per (recipe, seed) with several arms read out of it, runs.csv and
report.md, paired 95% intervals checked against hand computations, resume after a finished or killed run, and
one-line errors for bad input."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from choicelm.cli import main
from choicelm.core.errors import ChoicelmError
from choicelm.study import run_routing_study
from choicelm.study.arms import ARMS, recipe_of
from choicelm.study.report import interpolate, mean_sd, paired_interval, t_quantile_975
from choicelm.train.loop import KILL_AFTER_STEP_ENV

from conftest import ROOT

ARMS_UNDER_TEST = "dense,tc2,ec,ec_threshold,ec_predictor"
TOKENS = 6 * 4 * 32  # 6 steps of 4 x 32 tokens

TINY = {"model": {"vocab_size": 0, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
        "optim": {"lr": 3.0e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 4, "precision": "fp32", "eval_batches": 2, "log_every": 1, "keep_last": 2,
                  "progress": False, "device": "cpu"}}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory, prepared, tiny_config):
    """The study run once: 3 recipes x 2 seeds, 6 steps each."""
    out = tmp_path_factory.mktemp("study") / "routing"
    lines = []
    report = run_routing_study(tiny_config, prepared[1], out, ARMS_UNDER_TEST, 2, max_tokens=TOKENS, log=lines.append)
    return out, report, lines


def read_rows(out):
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def metrics_rows(run_dir, up_to_step):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= up_to_step]


def num(x):
    return float(x) if x not in ("", None) else None


def test_arm_table_is_declarative_and_shares_runs():
    assert recipe_of("ec") == recipe_of("ec_threshold") == recipe_of("ec_predictor") == "ec"
    assert recipe_of("et") == "et" and recipe_of("tc2") == "tc2"
    assert [a for a, arm in ARMS.items() if not arm.causal_eval] == ["ec"]  # the one LEAKY number


def test_study_writes_its_files_and_trains_one_run_per_recipe(study):
    out, report, lines = study
    assert report == out / "report.md"
    for name in ("runs.csv", "report.md", "study.json", "curves_tokens.png", "curves_time.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "dense-seed1", "dense-seed2", "ec-seed1", "ec-seed2", "tc2-seed1", "tc2-seed2"]  # ec arms share a run
    assert sum("starting" in line for line in lines) == 6
    state = json.loads((out / "study.json").read_text())
    assert state["budget"]["max_steps"] == 6 and all(r["status"] == "done" for r in state["runs"].values())
    for run in (out / "runs").iterdir():
        assert json.loads((run / "summary.json").read_text())["step"] == 6
    text = report.read_text()
    assert "LEAKY" in text and "T* =" in text and "− dense" in text and "− tc2" in text


def test_runs_csv_rows(study):
    out, _, _ = study
    rows = read_rows(out)
    assert [(r["arm"], r["seed"]) for r in rows] == [(a, s) for a in ARMS_UNDER_TEST.split(",") for s in ("1", "2")]
    by = {(r["arm"], r["seed"]): r for r in rows}
    for seed in ("1", "2"):
        ec, thr, pred = by["ec", seed], by["ec_threshold", seed], by["ec_predictor", seed]
        assert ec["run"] == thr["run"] == pred["run"] == f"runs/ec-seed{seed}"
        assert num(ec["loss"]) == num(ec["loss_topk"]) == num(thr["loss_topk"])
        assert num(thr["loss"]) == num(thr["loss_threshold"]) and num(pred["loss"]) == num(pred["loss_predictor"])
        assert ec["number_is"] == "LEAKY" and thr["number_is"] == pred["number_is"] == "causal"
        # the final evaluation reads the windows the loop validated on: it reproduces the logged curves' last point
        for r in (ec, thr, pred, by["dense", seed], by["tc2", seed]):
            assert abs(num(r["loss"]) - num(r["last_val_loss_logged"])) < 1e-4, r["arm"]
        # equal active width: h = 4 x 32 = 128 per token; FLOPs equal up to the router and predictor
        dense_flops = num(by["dense", seed]["fwd_flops_per_token"])
        for r in (ec, by["tc2", seed]):
            assert num(r["expert_width_per_token"]) == 128
            assert abs(num(r["fwd_flops_per_token"]) / dense_flops - 1) < 0.05
        # measured leak: teacher-forced top-k reads the future, the causal rules do not
        assert int(ec["leak_eval_flipped_routes"]) > 0 and num(ec["leak_eval_max_logprob_diff"]) > 1e-4
        for r in (thr, pred, by["tc2", seed], by["dense", seed]):
            assert num(r["leak_eval_max_logprob_diff"]) < 1e-4 and int(r["leak_eval_flipped_routes"]) == 0, r["arm"]
        assert int(thr["leak_train_flipped_routes"]) > 0  # trained with the top-k teacher
    tstars = {r["tstar_s"] for r in rows}
    assert len(tstars) == 1 and num(tstars.pop()) > 0
    # every arm read at T* on its own curve (None only where T* falls before a run's first validation point)
    at_tstar = [r for r in rows if r["loss_at_tstar"]]
    assert len(at_tstar) >= len(rows) // 2 and all(0 < num(r["progress_at_tstar"]) <= 1 for r in at_tstar)
    assert all(num(r["tokens_per_s"]) > 0 and num(r["train_s"]) > 0 for r in rows)


def test_paired_interval_matches_hand_computation():
    a = {1: 2.00, 2: 2.50, 3: 1.90, 4: 9.99}  # seed 4 has no partner: left out
    b = {1: 1.80, 2: 2.10, 3: 1.85}
    p = paired_interval(a, b)
    # d = 0.20, 0.40, 0.05; mean 0.65/3; sd = sqrt(((-1/60)^2 + (11/60)^2 + (-10/60)^2) / 2) = sqrt(0.0308333..)
    mean, sd = 0.65 / 3, math.sqrt(0.061666666666666 / 2)
    half = 4.3027 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert p["n"] == 3
    assert p["mean"] == pytest.approx(0.2166667, abs=1e-6) == pytest.approx(mean)
    assert p["sd"] == pytest.approx(0.1755942, abs=1e-6) == pytest.approx(sd)
    assert p["lo"] == pytest.approx(0.2166667 - 0.4362051, abs=1e-6) == pytest.approx(mean - half)
    assert p["hi"] == pytest.approx(0.6528718, abs=1e-6)
    assert paired_interval({1: 1.0}, {1: 0.5}) == {"n": 1, "mean": 0.5, "sd": None, "lo": None, "hi": None}
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(30) == 2.0423
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4) and t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert interpolate([10, 20], [3.0, 2.0], 15) == 2.5
    assert interpolate([10, 20], [3.0, 2.0], 25) == 2.0 and interpolate([10, 20], [3.0, 2.0], 5) is None


def test_rerun_skips_finished_runs_and_resumes_a_broken_one(study, tiny_config, prepared):
    out, report, _ = study
    mtimes = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    before = read_rows(out)
    # break one run as a kill would: its summary and newest checkpoint gone, an older checkpoint left
    broken = out / "runs" / "dense-seed2"
    (broken / "summary.json").unlink()
    import shutil

    shutil.rmtree(broken / "step-00000006")
    early = metrics_rows(broken, 5)
    assert (broken / "step-00000005" / "COMPLETE").is_file()
    lines = []
    run_routing_study(tiny_config, prepared[1], out, ARMS_UNDER_TEST, 2, max_tokens=TOKENS, log=lines.append)
    assert sum("skipped" in line for line in lines) == 5
    assert any("dense-seed2: resuming from step 5" in line for line in lines)
    for p in (out / "runs").iterdir():
        if p.name != "dense-seed2":
            assert (p / "summary.json").stat().st_mtime_ns == mtimes[p.name]
    assert json.loads((broken / "summary.json").read_text())["step"] == 6
    assert metrics_rows(broken, 5) == early  # resumed, not retrained: the rows before the checkpoint are the old ones
    after = read_rows(out)
    for r0, r1 in zip(before, after):  # a resume on CPU is exact
        assert r0["loss"] == r1["loss"], r0["arm"]


def test_killed_study_resumes(tmp_path, tiny_config, prepared):
    """A real SIGKILL mid-run (the loop's test hook), then the same command again: resumed, and the same loss as
    an uninterrupted run."""
    out = tmp_path / "killed"
    args = ["study", "routing", "--data", prepared[1], "--config", tiny_config, "--arms", "dense", "--seeds", "1",
            "--max-tokens", str(TOKENS), "--out", out, "--train.save_every=2"]
    env = dict(os.environ, **{KILL_AFTER_STEP_ENV: "3"}, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "choicelm", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    state = json.loads((out / "study.json").read_text())
    assert state["runs"]["dense-seed1"]["status"] == "running"
    assert not (out / "runs" / "dense-seed1" / "summary.json").exists()
    early = metrics_rows(out / "runs" / "dense-seed1", 2)  # a resume keeps these rows (timings and all)
    lines = []
    run_routing_study(tiny_config, prepared[1], out, "dense", 1, max_tokens=TOKENS, overrides=["--train.save_every=2"],
                      log=lines.append)
    assert any("dense-seed1: resuming from step 2" in line for line in lines)
    assert metrics_rows(out / "runs" / "dense-seed1", 2) == early
    straight = tmp_path / "straight"
    run_routing_study(tiny_config, prepared[1], straight, "dense", 1, max_tokens=TOKENS, log=lines.append)
    assert read_rows(out)[0]["loss"] == read_rows(straight)[0]["loss"]


def test_max_time_probe_is_stored_and_a_different_command_is_refused(tmp_path, tiny_config, prepared):
    out = tmp_path / "timed"
    lines = []
    run_routing_study(tiny_config, prepared[1], out, "dense", 1, max_time=0.15, log=lines.append)
    budget = json.loads((out / "study.json").read_text())["budget"]
    assert budget["probe"]["tokens_per_s"] > 0 and budget["max_steps"] >= 1
    assert budget["max_steps"] == max(1, round(0.15 * budget["probe"]["tokens_per_s"] / 128))
    assert any("probing" in line for line in lines) and not (out / "probe").exists()
    lines = []
    run_routing_study(tiny_config, prepared[1], out, "dense", 1, max_time=0.15, log=lines.append)
    assert not any("probing" in line for line in lines) and any("skipped" in line for line in lines)
    with pytest.raises(ChoicelmError, match="different command"):
        run_routing_study(tiny_config, prepared[1], out, "dense", 2, max_time=0.15, log=lines.append)
    run_routing_study(tiny_config, prepared[1], out, "dense", 1, max_tokens=256, overwrite=True, log=lines.append)
    assert json.loads((out / "study.json").read_text())["budget"]["max_steps"] == 2


@pytest.mark.parametrize("change, message", [
    ({"--arms": "dense,moe9"}, "unknown arm 'moe9'"),
    ({"--seeds": "0"}, "--seeds 0 must be"),
    ({"--max-time": "10"}, "exactly one budget"),
    ({"--max-tokens": None}, "exactly one budget"),
    ({"--data": "/nonexistent/data"}, "holds no manifest.json"),
    ({"extra": "--train.max_steps=5"}, "set by the study"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_config, prepared, capsys, change, message):
    flags = {"--data": str(prepared[1]), "--config": str(tiny_config), "--arms": "dense", "--seeds": "1",
             "--max-tokens": "256", "--out": str(tmp_path / "s")}
    flags.update({k: v for k, v in change.items() if k != "extra"})
    argv = ["study", "routing"] + [x for k, v in flags.items() if v is not None for x in (k, v)]
    argv += [change["extra"]] if "extra" in change else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("choicelm: error:") and message in err
    assert not (tmp_path / "s").exists()
