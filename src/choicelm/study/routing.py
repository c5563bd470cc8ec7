"""`choicelm study routing`: MoE routing rules against each other and a dense model, at equal active FLOPs per
token, equal training tokens and equal training wall-clock, over several seeds, saying for every number whether
a causal rule produced it.

    run_routing_study("configs/shakespeare.yaml", "data/", "studies/routing",
                      arms=["dense", "tc1", "tc2", "ec", "ec_threshold", "et", "ec_predictor"],
                      seeds=3, max_time=300)                    # or max_tokens=N; overrides=["--train.x=y"]

An arm is a training recipe (moe.* overrides on the base config, which is the dense recipe) plus the rule it is
evaluated and decoded with (ARMS in study/arms.py; adding an arm is one line). Arms whose recipes are identical share one
training run per seed: ec, ec_threshold and ec_predictor are one causal-expert-choice run (top-k as the teacher;
thresholds and a predictor learn it) read out with three rules.

Equal active FLOPs: with h the base MLP width (model.mlp_hidden or 4*n_embd), every MoE arm spends h of expert
width per token on average in its MoE blocks (top-1 x h, top-2 x h/2, expert choice c=2 x h/2); attention, the
dense blocks and the head are the same in every arm.

Budget: max_tokens sets every run's max_steps (tokens / tokens per step); max_time is "about S seconds of dense
training per run": a few-step dense probe measures tokens/s and converts S into max_steps, stored in study.json
so a resumed study uses the same value. Every arm trains that many steps with its full learning-rate schedule.
Two budgets come out of one set of runs: equal tokens (the final losses) and equal wall-clock (every arm's
validation loss interpolated at T* = the training time of the fastest arm).

out/
  study.json                   the command, its arguments, the budget, each run's status
  runs/<recipe>-seed<k>/       ordinary pretrain run directories (+ study_eval.json: final losses per rule, leak;
                               study_curves.csv: validation curves of rules the loop does not log)
  runs.csv, report.md, curves_tokens.png, curves_time.png
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shlex
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..core import checkpoint as ckpt
from ..core.config import Config, merge, parse_overrides
from ..core.errors import ChoicelmError
from ..core.run_dir import read_metrics
from ..core.runtime import autocast, keep_freed_memory, pick_device, use_bf16
from ..data.loader import TokenDataset, eval_batches
from ..models import registry
from ..models.moe import summarize_stats, thresholds_frozen
from ..train.loop import Trainer, pretrain, pretraining_inputs
from .arms import ARMS, moe_overrides, parse_arms, recipe_of
from .report import CURVES_FILE, _read_csv, _write_csv, collect_rows, curve_column, write_outputs


# The study owns these: the budget flags and --seeds set them for every run.
_OWNED = {"train": ("max_steps", "max_tokens", "max_time", "seed")}
PROBE_STEPS = 10
EVAL_POINTS = 20  # validation points per run (train.eval_every = max_steps / this)
LEAK_TRIALS = 2
LEAK_ROWS = 4
EVAL_FILE = "study_eval.json"


# ----------------------------------------------------------------------------- configs


def _base_raw(config) -> tuple[dict, str]:
    """The base config as a raw dict of sections, and how to name it."""
    if isinstance(config, Config):
        return config.to_dict(), "<Config object>"
    path = Path(config)
    if not path.is_file():
        raise ChoicelmError(f"config file {path} does not exist; pass a YAML file such as configs/shakespeare.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ChoicelmError(f"{path} is not valid YAML: {e}") from None
    return raw, str(path)


def _user_overrides(overrides) -> dict:
    extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or ()))
    for section, keys in _OWNED.items():
        for key in keys:
            if key in (extra.get(section) or {}):
                flag = {"seed": "--seeds"}.get(key, "--max-time or --max-tokens")
                raise ChoicelmError(f"--{section}.{key} is set by the study for every run; use {flag} instead")
    if "data" in extra:
        raise ChoicelmError("--data.* is set by --data for every run; drop the override")
    return extra


def arm_config(base: dict, user: dict, data_dir: Path, arm: str, *, seed: int, max_steps: int,
               defaults: dict | None = None) -> Config:
    """base <- the study's train defaults <- the arm's moe overrides <- the user's overrides (never moe.* for the
    dense arm: nothing MoE-only changes it) <- data, seed and budget (owned by the study)."""
    h = Config.from_dict(merge(base, _drop_moe(user))).model.hidden_size
    extra = merge({"train": dict(defaults or {})}, {"moe": moe_overrides(arm, h)})
    extra = merge(extra, _drop_moe(user) if ARMS[arm].routing is None else user)
    extra = merge(extra, {"data": {"path": str(data_dir)},
                          "train": {"seed": seed, "max_steps": max_steps, "max_tokens": 0, "max_time": 0.0}})
    return Config.from_dict(merge(base, extra), f"arm {arm}")


def _drop_moe(user: dict) -> dict:
    return {k: v for k, v in user.items() if k != "moe"}


def tokens_per_step(cfg: Config) -> int:
    return (cfg.train.global_batch_size or cfg.train.micro_batch_size) * cfg.model.block_size


# ----------------------------------------------------------------------------- training


class _StudyTrainer(Trainer):
    """The ordinary loop, plus: at every validation point, the validation loss of each rule in extra_rules (rules
    the loop does not log itself, e.g. the predictor of a threshold run), appended to study_curves.csv. Evaluation
    uses no randomness and does not touch the thresholds, so training is exactly the same as without it."""

    extra_rules: tuple[str, ...] = ()

    def run(self) -> Path:
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / CURVES_FILE
            kept = []
            if self.resumed_step is not None and path.exists():  # rows past the checkpoint are redone
                kept = [r for r in _read_csv(path) if int(float(r["step"])) <= self.resumed_step]
            _write_csv(path, kept, self._curve_columns())
        return super().run()

    def _curve_columns(self) -> list[str]:
        return ["step", "tokens", "elapsed_s", *(f"val_loss_{r}" for r in self.extra_rules)]

    def evaluate(self, routing: str | None = None) -> float:
        loss = super().evaluate(routing)
        if routing is None and self.extra_rules:
            row = {"step": self.step, "tokens": self.tokens, "elapsed_s": f"{self.elapsed:.6g}"}
            for rule in self.extra_rules:
                row[f"val_loss_{rule}"] = f"{super().evaluate(rule):.10g}"
            if self.dist.is_main:
                with open(self.out_dir / CURVES_FILE, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self._curve_columns()).writerow(row)
        return loss


def train_run(cfg: Config, run_dir: Path, extra_rules: tuple[str, ...] = ()) -> Path:
    """pretrain(cfg, run_dir, resume="auto"), logging the validation curves of extra_rules too. The study owns its
    run folders, so one killed before its first checkpoint starts over (overwrite) instead of being refused."""
    if not extra_rules:
        return pretrain(cfg, run_dir, resume="auto", overwrite=True)
    from ..train.distributed import init_distributed, shutdown

    if cfg.train.tune_allocator:
        keep_freed_memory()
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device.type)
    try:
        trainer = _StudyTrainer(cfg, run_dir, dist_info, device, "auto", True, pretraining_inputs(cfg))
        trainer.extra_rules = tuple(extra_rules)
        return trainer.run()
    finally:
        shutdown(dist_info)


def run_complete(run_dir: Path, max_steps: int) -> bool:
    """summary.json says the run reached max_steps and that step's checkpoint is complete."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    step = summary.get("step")
    return isinstance(step, int) and step >= max_steps and \
        ckpt.read_info(run_dir / ckpt.step_dir_name(step)) is not None


def probe_throughput(cfg: Config, probe_dir: Path, steps: int = PROBE_STEPS) -> dict:
    """Dense tokens/s over a few training steps (median of the per-step rates after the first two)."""
    cfg = copy.deepcopy(cfg)
    t = cfg.train
    t.max_steps, t.eval_every, t.save_every, t.log_every, t.progress, t.seed = steps, 0, 0, 1, False, 0
    if probe_dir.exists():
        shutil.rmtree(probe_dir)
    try:
        pretrain(cfg, probe_dir)
        rates = [r["tokens_per_s"] for r in read_metrics(probe_dir) if r["tokens_per_s"]]
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    rates = rates[2:] if len(rates) > 4 else rates
    return {"steps": steps, "tokens_per_s": statistics.median(rates)}


# ----------------------------------------------------------------------------- final evaluation


@torch.no_grad()
def _score(model, batches, device, bf16) -> dict:
    loss_sum, count, stats = 0.0, 0, {}
    for x_BT, y_BT in batches:
        with autocast(device, bf16):
            out = model(x_BT.to(device), y_BT.to(device), loss_reduction="sum", return_logits=False)
        loss_sum += float(out.loss)
        count += int((y_BT != -100).sum())
        for key, value in summarize_stats(getattr(out, "stats", None) or {}).items():
            stats.setdefault(key, []).append(value)
    result = {"loss": loss_sum / max(count, 1), "tokens": count}
    for key in ("moe_load_max", "moe_experts_per_token", "moe_no_expert"):
        if key in stats:
            result[key[4:]] = sum(stats[key]) / len(stats[key])
    return result


def evaluate_run(run_dir: Path, cfg: Config, leak_trials: int = LEAK_TRIALS) -> dict:
    """Final checkpoint of a run: validation loss and routing stats under every rule the model has, on the same
    windows for every arm (the first train.eval_batches x micro_batch_size validation windows, the windows the
    loop validated on), in the run's training precision; its active FLOPs; and the measured leak (eval mode per
    rule, train mode with the training rule). Cached in run_dir/study_eval.json."""
    from .. import api

    step_dir = ckpt.resolve_checkpoint(run_dir)
    key = {"checkpoint": step_dir.name, "eval_batches": cfg.train.eval_batches,
           "micro_batch_size": cfg.train.micro_batch_size, "leak_trials": leak_trials}
    cache = run_dir / EVAL_FILE
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    except (OSError, ValueError):
        pass
    lm = api.load(step_dir, device=cfg.train.device)
    model, device = lm.model, lm.device
    bf16 = use_bf16(cfg.train.precision, device)
    batches = list(eval_batches(TokenDataset(Path(cfg.data.path), "val"), cfg.model.block_size,
                                cfg.train.micro_batch_size, cfg.train.eval_batches))
    layers = model.moe_layers()
    rules = list(layers[0].rules) if layers else [None]
    result = {"key": key, "step": ckpt.read_info(step_dir).step, "rules": {}, "leak_eval": {}, "leak_train": None,
              "train_rule": layers[0].train_rule if layers else None,
              "precision": "bf16" if bf16 else "fp32", "windows": sum(len(b[0]) for b in batches)}
    for rule in rules:
        with model.routing_as(rule):
            result["rules"][rule or "dense"] = _score(model, batches, device, bf16)
    n_active = model.num_params(exclude_embeddings=True) - sum(m.inactive_params() for m in layers)
    result["active_params"] = n_active
    result["fwd_flops_per_token"] = model.flops_per_token(cfg.model.block_size) / 3
    result["attention_flops_per_token"] = 4 * cfg.model.n_layer * cfg.model.n_embd * cfg.model.block_size
    result["leak_error"] = None
    try:
        from ..models.causality import measure_leak
    except ImportError:
        result["leak_error"] = "choicelm.models.causality is not available"
    else:
        ids_BT = batches[0][0][:LEAK_ROWS].to(device)
        split = ids_BT.shape[1] // 2
        if split < 1:
            result["leak_error"] = f"block_size {ids_BT.shape[1]} is too short to split"
        else:
            with thresholds_frozen(model):
                for rule in rules:
                    with model.routing_as(rule):
                        result["leak_eval"][rule or "dense"] = _leak(measure_leak(
                            model, ids_BT, split, train_mode=False, trials=leak_trials))
                with model.routing_as(None):
                    result["leak_train"] = _leak(measure_leak(model, ids_BT, split, train_mode=True,
                                                              trials=leak_trials))
    model.eval()
    if result["leak_error"] is None:  # a missing module is not cached: the next run measures once it lands
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, cache)
    return result


def _leak(found: dict) -> dict:
    return {"max_logprob_diff": float(found["max_logprob_diff"]), "flipped_routes": int(found["flipped_routes"]),
            "past_decisions": found.get("past_decisions"), "routing": found.get("routing")}


# ----------------------------------------------------------------------------- the study


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def equivalent_command(config_name: str, data_dir, out_dir, arms, seeds, max_time, max_tokens, overrides) -> str:
    budget = f"--max-time {max_time:g}" if max_time else f"--max-tokens {max_tokens}"
    parts = ["choicelm", "study", "routing", "--data", str(data_dir), "--config", config_name, "--arms",
             ",".join(arms), "--seeds", str(seeds), *budget.split(), "--out", str(out_dir)]
    parts += [o for o in overrides] if not isinstance(overrides, dict) else \
        [f"--{s}.{k}={v}" for s, kv in overrides.items() for k, v in kv.items()]
    return " ".join(shlex.quote(p) for p in parts)


def _prepare_study_dir(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The existing state if `out` holds this same study; None for a fresh start. Refuses anything else."""
    if out.exists() and not out.is_dir():
        raise ChoicelmError(f"--out {out} is a file; choose a directory for the study")
    state_file = out / "study.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            state = {}
        if state.get("identity") == identity:
            return state
        if not overwrite:
            old = state.get("command") or "another command"
            raise ChoicelmError(f"--out {out} holds a study made by a different command ({old}); rerun that "
                                "command to resume it, pass --overwrite to start over, or choose another --out")
        shutil.rmtree(out)
        return None
    if out.is_dir() and any(out.iterdir()):
        raise ChoicelmError(f"--out {out} is not empty and holds no study (no study.json); choose a new directory")
    return None


def _check_budget(seeds, max_time: float | None, max_tokens: int | None) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ChoicelmError(f"--seeds {seeds!r} must be an integer >= 1")
    if (max_time is None) == (max_tokens is None):
        raise ChoicelmError("give exactly one budget: --max-time SECONDS (of dense training per run) or "
                            "--max-tokens N (per run)")
    if max_time is not None and not max_time > 0:
        raise ChoicelmError(f"--max-time {max_time} must be > 0 seconds")
    if max_tokens is not None and (isinstance(max_tokens, bool) or int(max_tokens) != max_tokens or max_tokens < 1):
        raise ChoicelmError(f"--max-tokens {max_tokens} must be a positive integer")


def _plan_budget(dense_cfg: Config, max_time: float | None, max_tokens: int | None, out: Path,
                 log: Callable[[str], None]) -> dict:
    """Steps per run (every arm trains as many): --max-tokens / tokens a step, or --max-time x the dense recipe's
    throughput measured by a short probe run. Fixed once, in study.json, so a resumed study uses the same."""
    tps = tokens_per_step(dense_cfg)
    probe = None
    if max_tokens is not None:
        max_steps = max(1, round(max_tokens / tps))
    else:
        log(f"probing dense throughput ({PROBE_STEPS} steps) to turn --max-time {max_time:g} s into steps")
        probe = probe_throughput(dense_cfg, out / "probe")
        max_steps = max(1, round(max_time * probe["tokens_per_s"] / tps))
        log(f"dense: {probe['tokens_per_s']:,.0f} tokens/s -> {max_steps} steps of {tps:,} tokens per run")
    return {"max_steps": max_steps, "tokens_per_step": tps, "tokens_per_run": max_steps * tps,
            "eval_every": max(1, round(max_steps / EVAL_POINTS)), "probe": probe}


def run_routing_study(config, data_dir, out_dir, arms, seeds: int, max_time: float | None = None,
                      max_tokens: int | None = None, overrides=(), overwrite: bool = False,
                      command: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Train one run per (training recipe, seed), read every arm out of its run, write runs.csv, report.md and the
    curves; return out_dir/report.md. config: a YAML path or a Config (the dense recipe); overrides:
    ["--section.key=value", ...] applied to every arm (moe.* ones not to dense). Running it again skips finished
    runs, resumes a killed one from its newest checkpoint and rewrites the report."""
    arms = parse_arms(arms)
    _check_budget(seeds, max_time, max_tokens)
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").is_file():
        raise ChoicelmError(f"--data {data_dir} holds no manifest.json; pass a directory written by `choicelm prepare`")
    base, config_name = _base_raw(config)
    user = _user_overrides(overrides)
    dense_cfg = arm_config(base, user, data_dir, "dense", seed=1, max_steps=1)  # validates the overrides early
    spec = registry.get(dense_cfg.model.kind)
    if not (spec.moe and spec.generates):  # the study compares a decoder's routing rules (causality included)
        decoders = [s.kind for s in registry.SPECS.values() if s.moe and s.generates]
        raise ChoicelmError(f"a routing study needs a decoder base config that takes MoE layers (model.kind="
                            f"{' or '.join(decoders)}), got {dense_cfg.model.kind}")
    if "val" not in TokenDataset(data_dir, "train").manifest["splits"]:
        raise ChoicelmError(f"--data {data_dir} has no validation split; prepare it with --val-files or --val-fraction")
    for arm in arms:  # every arm's config must be valid before anything trains
        arm_config(base, user, data_dir, arm, seed=1, max_steps=1)

    out = Path(out_dir)
    command = command or equivalent_command(config_name, data_dir, out, arms, seeds, max_time, max_tokens, overrides)
    identity = json.loads(json.dumps({  # as it reads back from study.json
        "config": config_name, "base": base, "data": str(data_dir.resolve()), "arms": arms, "seeds": seeds,
        "max_time": max_time, "max_tokens": max_tokens, "overrides": user}, default=str))
    state = _prepare_study_dir(out, identity, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "study.json"
    if state is None or "budget" not in state:
        state = {"version": 1, "command": command, "identity": identity, "runs": {},
                 "budget": _plan_budget(dense_cfg, max_time, max_tokens, out, log)}
        _write_json(state_file, state)
    budget = state["budget"]
    max_steps = budget["max_steps"]
    defaults = {"eval_every": budget["eval_every"], "save_every": budget["eval_every"] * 5, "progress": False}

    recipes = list(dict.fromkeys(recipe_of(a) for a in ARMS if a in arms))  # ARMS order
    rules_of = {r: [ARMS[a].routing for a in arms if recipe_of(a) == r] for r in recipes}
    runs = [(seed, recipe) for seed in range(1, seeds + 1) for recipe in recipes]
    evals: dict[str, dict] = {}
    for i, (seed, recipe) in enumerate(runs, 1):
        name = f"{recipe}-seed{seed}"
        run_dir = out / "runs" / name
        cfg = arm_config(base, user, data_dir, recipe, seed=seed, max_steps=max_steps, defaults=defaults)
        extra = tuple(r for r in rules_of[recipe] if curve_column(cfg, r).startswith("val_loss_"))
        info = state["runs"].setdefault(name, {"recipe": recipe, "seed": seed, "arms": [
            a for a in arms if recipe_of(a) == recipe], "status": "pending"})
        tag = f"[{i}/{len(runs)}] {name}"
        trained = not run_complete(run_dir, max_steps)
        if not trained:
            info["status"] = "done"
        else:
            found = ckpt.list_checkpoints(run_dir)
            start = f"resuming from step {found[-1].step}" if found else "starting"
            log(f"{tag}: {start} ({max_steps} steps, {', '.join(info['arms'])})")
            info.update(status="running", started=time.time())
            _write_json(state_file, state)
            t0 = time.perf_counter()
            try:
                train_run(cfg, run_dir, extra)
            except ChoicelmError as e:  # e.g. a diverged arm: the others still run
                info.update(status="failed", error=str(e))
                _write_json(state_file, state)
                log(f"{tag}: failed: {e}")
                continue
            info.update(status="done", wall_s=round(time.perf_counter() - t0, 3), resumed=bool(found))
        evals[name] = evaluate_run(run_dir, cfg)
        info["final"] = {k: v["loss"] for k, v in evals[name]["rules"].items()}
        _write_json(state_file, state)
        summary = json.loads((run_dir / "summary.json").read_text())
        finals = ", ".join(f"{k} {v:.4f}" for k, v in info["final"].items())
        done = "done" if trained else "finished earlier, skipped"
        log(f"{tag}: {done}, {summary['elapsed_s']:.1f} s of training, val loss {finals}")

    def cfg_for(recipe, seed):
        return arm_config(base, user, data_dir, recipe, seed=seed, max_steps=max_steps, defaults=defaults)

    rows, curves = collect_rows(out, state, arms, evals, cfg_for)
    _write_json(state_file, state)  # with T*
    report = write_outputs(out, state, arms, rows, curves, {r: cfg_for(r, 1) for r in recipes}, user, log)
    log(f"wrote {out / 'runs.csv'} and {report}")
    return report
