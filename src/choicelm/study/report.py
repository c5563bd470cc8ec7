"""A routing study's numbers: per-run rows (runs.csv), per-arm means and paired 95% intervals (report.md), and
validation curves against tokens and wall-clock (curves_*.png). Small functions, tested on fixed numbers.

Paired intervals: for arm A against a reference R, d_s = loss(A, seed s) - loss(R, seed s) over the seeds both
finished; mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n) (Student t; exact table to 30 degrees of freedom, a
Cornish-Fisher expansion beyond, no scipy).
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from pathlib import Path
from typing import Callable

import yaml

from ..core.config import Config
from ..core.run_dir import read_metrics
from .arms import ARMS, recipe_of

CURVES_FILE = "study_curves.csv"  # validation losses of the rules a run's metrics.csv does not log


def default_eval_rule(cfg: Config) -> str | None:
    """The rule the loop's val_loss uses (the model's causal default in eval mode)."""
    moe = cfg.moe
    if not moe.enabled:
        return None
    if moe.router == "token_choice":
        return "dropless"
    return moe.causal_mode if moe.router == "expert_choice_causal" else "threshold"


def curve_column(cfg: Config, rule: str | None) -> str:
    """Where a run logs the validation loss of `rule`: metrics.csv's val_loss or moe_val_loss_topk, or
    study_curves.csv's val_loss_<rule>."""
    if rule is None or rule == default_eval_rule(cfg):
        return "val_loss"
    if rule == "topk" and cfg.moe.router != "token_choice":
        return "moe_val_loss_topk"
    return f"val_loss_{rule}"


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_curve(run_dir: Path, column: str) -> list[dict]:
    """[{step, tokens, elapsed_s, loss}] of one validation column of a run (metrics.csv or study_curves.csv)."""
    source = run_dir / ("metrics.csv" if column in ("val_loss", "moe_val_loss_topk") else CURVES_FILE)
    if not source.exists():
        return []
    points = {}
    for r in _read_csv(source):
        if r.get(column) not in (None, ""):
            points[int(float(r["step"]))] = {"step": int(float(r["step"])), "tokens": float(r["tokens"]),
                                             "elapsed_s": float(r["elapsed_s"]), "loss": float(r[column])}
    return [points[s] for s in sorted(points)]


# Two-sided 95% quantiles of Student's t, t_{0.975, dof}, dof = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile_975(dof: int) -> float:
    """t_{0.975, dof}: the table to 30, then z + (z^3+z)/(4v) + (5z^5+16z^3+3z)/(96v^2) (error < 1e-4)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); sd is None for one value, both None for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_interval(a: dict, b: dict) -> dict:
    """a, b: seed -> value. The mean of a - b over the seeds in both, with its 95% t-interval (lo, hi are None
    with fewer than two pairs)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean, sd = mean_sd(d)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """Linear interpolation of y at x; the last y beyond the last x (the run had stopped); None before the first."""
    if not xs or x < xs[0]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


# ----------------------------------------------------------------------------- rows


RUN_COLUMNS = [
    "arm", "seed", "run", "status", "train_rule", "eval_rule", "causal_train", "causal_eval", "number_is",
    "steps", "tokens", "loss", "loss_topk", "loss_threshold", "loss_predictor", "loss_capacity", "loss_dropless",
    "loss_dense", "last_val_loss_logged", "tstar_s", "loss_at_tstar", "progress_at_tstar", "train_s", "wall_s",
    "tokens_per_s", "fwd_flops_per_token", "active_params", "expert_width_per_token", "load_max",
    "experts_per_token", "no_expert", "train_load_max", "leak_eval_max_logprob_diff", "leak_eval_flipped_routes",
    "leak_train_max_logprob_diff", "leak_train_flipped_routes", "leak_past_decisions", "error"]


def expert_width_per_token(cfg) -> float:
    """Nominal expert width a token uses in an MoE block (experts per token x expert width); h for dense."""
    h = cfg.model.hidden_size
    if not cfg.moe.enabled:
        return h
    per_token = cfg.moe.top_k if cfg.moe.router == "token_choice" else cfg.moe.capacity
    return per_token * (cfg.moe.expert_width or h)


def collect_rows(out: Path, state: dict, arms: list[str], evals: dict, cfg_for: Callable) -> tuple[list, dict]:
    """One row per arm x seed (RUN_COLUMNS), T* filled in; and curves: arm -> seed -> [{step, tokens, elapsed_s,
    loss}] of the loss the arm reports."""
    seeds = state["identity"]["seeds"]
    max_steps = state["budget"]["max_steps"]
    rows, curves = [], {}
    for arm in arms:
        spec, recipe = ARMS[arm], recipe_of(arm)
        curves[arm] = {}
        for seed in range(1, seeds + 1):
            name = f"{recipe}-seed{seed}"
            run_dir = out / "runs" / name
            info = state["runs"].get(name, {})
            row = {"arm": arm, "seed": seed, "run": f"runs/{name}", "status": info.get("status", "missing"),
                   "eval_rule": spec.routing or "dense", "causal_train": spec.causal_train,
                   "causal_eval": spec.causal_eval, "number_is": "causal" if spec.causal_eval else "LEAKY",
                   "error": info.get("error", "")}
            rows.append(row)
            if name not in evals:
                continue
            ev, cfg = evals[name], cfg_for(recipe, seed)
            result = ev["rules"][spec.routing or "dense"]
            metrics = read_metrics(run_dir)
            rates = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
            loads = [m["moe_load_max"] for m in metrics if m.get("moe_load_max") is not None]
            leak_eval = (ev.get("leak_eval") or {}).get(spec.routing or "dense") or {}
            leak_train = ev.get("leak_train") or {}
            row.update({
                "train_rule": ev.get("train_rule") or "dense", "steps": ev["step"], "tokens": metrics[-1]["tokens"],
                "loss": result["loss"], "last_val_loss_logged": _last(read_curve(run_dir, curve_column(cfg, spec.routing))),
                "train_s": metrics[-1]["elapsed_s"], "wall_s": info.get("wall_s"),
                "tokens_per_s": statistics.median(rates) if rates else None,
                "fwd_flops_per_token": ev["fwd_flops_per_token"], "active_params": ev["active_params"],
                "expert_width_per_token": expert_width_per_token(cfg),
                "load_max": result.get("load_max"), "experts_per_token": result.get("experts_per_token"),
                "no_expert": result.get("no_expert"), "train_load_max": loads[-1] if loads else None,
                "leak_eval_max_logprob_diff": leak_eval.get("max_logprob_diff"),
                "leak_eval_flipped_routes": leak_eval.get("flipped_routes"),
                "leak_train_max_logprob_diff": leak_train.get("max_logprob_diff"),
                "leak_train_flipped_routes": leak_train.get("flipped_routes"),
                "leak_past_decisions": leak_eval.get("past_decisions")})
            for rule, res in ev["rules"].items():
                row[f"loss_{rule}"] = res["loss"]
            curves[arm][seed] = read_curve(run_dir, curve_column(cfg, spec.routing))
    tstar, fastest = equal_time(rows)
    for row in rows:
        curve = curves[row["arm"]].get(row["seed"])
        if tstar is None or not curve:
            continue
        times = [p["elapsed_s"] for p in curve]
        row["tstar_s"] = tstar
        row["loss_at_tstar"] = interpolate(times, [p["loss"] for p in curve], tstar)
        step = interpolate(times, [p["step"] for p in curve], tstar)
        row["progress_at_tstar"] = None if step is None else min(1.0, step / max_steps)
    state["equal_time"] = {"tstar_s": tstar, "fastest_arm": fastest}
    return rows, curves


def _last(curve: list[dict]) -> float | None:
    return curve[-1]["loss"] if curve else None


def equal_time(rows: list[dict]) -> tuple[float | None, str | None]:
    """T* = the smallest over arms of the median over seeds of the training time at the last step."""
    per_arm = {}
    for row in rows:
        if row.get("train_s") is not None:
            per_arm.setdefault(row["arm"], []).append(row["train_s"])
    if not per_arm:
        return None, None
    medians = {arm: statistics.median(v) for arm, v in per_arm.items()}
    fastest = min(medians, key=medians.get)
    return medians[fastest], fastest


# ----------------------------------------------------------------------------- the report


def _f(x, digits=4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pm(values: list, digits=4) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def _interval(p: dict) -> str:
    if p["mean"] is None:
        return "-"
    if p["lo"] is None:
        return f"{p['mean']:+.4f} (1 seed)"
    return f"{p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}]"


def arm_table(arms: list[str], rows: list[dict]) -> list[str]:
    head = ("| arm | rules (train → eval) | number is | fwd MFLOPs/token | expert width/token | loss, equal tokens "
            "| loss at T* | share of run at T* | tokens/s | train s | load max | experts/token | no expert "
            "| leak eval: max Δlogp, flips | leak train: max Δlogp, flips |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm and r.get("loss") is not None]
        if not mine:
            lines.append(f"| {arm} | - | - | - | - | no finished run |" + " - |" * 9)
            continue
        col = lambda key: [r.get(key) for r in mine]  # noqa: E731

        def leak(prefix):
            diffs = [v for v in col(f"leak_{prefix}_max_logprob_diff") if v is not None]
            flips = [v for v in col(f"leak_{prefix}_flipped_routes") if v is not None]
            if not diffs:
                return "not measured"
            return f"{max(diffs):.2g} nats, {sum(flips)}" if flips else f"{max(diffs):.2g} nats"

        first = mine[0]
        causal = "causal" if first["causal_eval"] else "**LEAKY**"
        train_tag = "" if first["causal_train"] else " (leaky training rule)"
        lines.append(
            f"| {arm} | {first['train_rule']} → {first['eval_rule']} | {causal}{train_tag} "
            f"| {first['fwd_flops_per_token'] / 1e6:.4g} | {first['expert_width_per_token']:g} "
            f"| {_pm(col('loss'))} | {_pm(col('loss_at_tstar'))} | {_f(mean_sd(col('progress_at_tstar'))[0], 2)} "
            f"| {_f(mean_sd(col('tokens_per_s'))[0], 0)} | {_f(mean_sd(col('train_s'))[0], 1)} "
            f"| {_f(mean_sd(col('load_max'))[0], 2)} | {_f(mean_sd(col('experts_per_token'))[0], 2)} "
            f"| {_f(mean_sd(col('no_expert'))[0], 3)} | {leak('eval')} | {leak('train')} |")
    return lines


def difference_table(arms: list[str], rows: list[dict]) -> list[str]:
    refs = [r for r in ("dense", "tc2") if r in arms]
    if not refs:
        return ["(no reference arm: add dense or tc2 to --arms for paired differences)"]
    head = "| arm |" + "".join(f" − {r}, equal tokens | − {r}, at T* |" for r in refs)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def by_seed(arm, key):
        return {r["seed"]: r.get(key) for r in rows if r["arm"] == arm and r.get(key) is not None}

    for arm in arms:
        cells = []
        for ref in refs:
            for key in ("loss", "loss_at_tstar"):
                cells.append("·" if arm == ref else _interval(paired_interval(by_seed(arm, key), by_seed(ref, key))))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _overrides_text(user: dict) -> str:
    flat = [f"--{section}.{k}={v}" for section, kv in user.items() for k, v in kv.items()]
    return " ".join(flat) if flat else "none"


def write_report(out: Path, state: dict, arms: list[str], rows: list[dict], recipe_cfgs: dict, user: dict,
                 plot_note: str) -> Path:
    """report.md: the command, the budget, T*, the arm table, the paired differences, how to read them, the config.
    recipe_cfgs: recipe -> the Config its runs trained with (seed 1)."""
    budget, eq = state["budget"], state.get("equal_time", {})
    first_cfg = next(iter(recipe_cfgs.values()))
    ident = state["identity"]
    lines = ["# Routing study", "", "Command:", "", "```", state["command"], "```", ""]
    probe = budget.get("probe")
    how = (f"--max-time {ident['max_time']:g} s of dense training per run: a {probe['steps']}-step dense probe "
           f"measured {probe['tokens_per_s']:,.0f} tokens/s" if probe else f"--max-tokens {ident['max_tokens']:,}")
    lines += [f"Budget: {how} -> every run trains **{budget['max_steps']:,} steps x {budget['tokens_per_step']:,} "
              f"tokens = {budget['tokens_per_run']:,} tokens** with its full learning-rate schedule; validation "
              f"every {budget['eval_every']} steps on the first {first_cfg.train.eval_batches} x "
              f"{first_cfg.train.micro_batch_size} validation windows of {first_cfg.model.block_size} tokens (the same "
              f"windows for every arm and every rule). Seeds: {ident['seeds']} (train.seed = 1..{ident['seeds']}).", ""]
    if eq.get("tstar_s") is not None:
        lines += [f"Equal wall-clock: T* = **{eq['tstar_s']:.1f} s** of training (excluding evaluation and "
                  f"checkpoints), the median over seeds of the fastest arm, `{eq['fastest_arm']}`. Every arm's "
                  "validation loss is interpolated at T* on its own curve; a slower arm read at T* is mid-schedule "
                  "(its learning rate has not decayed yet; 'share of run at T*' says how far it got), which "
                  "favours the faster arms, as a wall-clock budget should. Timings on a shared machine are noisy.", ""]
    lines += ["## Arms (mean ± sd over seeds)", ""] + arm_table(arms, rows) + [""]
    lines += ["## Differences (paired by seed: mean and 95% t-interval of the per-seed differences; negative = "
              "lower loss than the reference)", ""] + difference_table(arms, rows) + [""]
    h = first_cfg.model.hidden_size
    lines += [
        "## How to read it", "",
        f"- Equal active FLOPs: h = {h} (the base MLP width). Every MoE arm spends h of expert width per token on "
        "average in each MoE block ('expert width/token': e.g. top-1 x h, top-2 x h/2, expert choice c=2 x h/2, top-4 or c=4 x h/4); "
        "attention, the dense blocks, embeddings and the head are common to all arms. 'fwd MFLOPs/token' is 2 x the "
        "active parameters (matmul weights incl. the head; routers and the predictor counted) + attention, at the "
        "nominal experts per token; a threshold or predictor rule's real count varies with 'experts/token'.",
        "- 'number is': **causal** when the reported loss comes from a rule in which no later token can change an "
        "earlier token's routing (threshold, predictor, dropless); **LEAKY** for teacher-forced top-k expert choice, "
        "whose number a decoder cannot reach when generating. '(leaky training rule)' marks arms trained with a "
        "non-causal rule (top-k as the teacher; token choice with capacity drops) but evaluated causally.",
        "- Leak: `choicelm.models.causality.measure_leak` on the first validation windows, future half replaced by "
        "random tokens: the largest move of a past next-token log-probability (nats) and the past routing "
        "decisions that flipped, in eval mode (the arm's rule) and train mode (the training rule). Float rounding "
        "alone gives ~1e-6; a real leak moves nats.",
        "- 'loss, equal tokens' is the final checkpoint evaluated with the arm's rule (runs.csv has every rule's "
        "loss); 'loss at T*' comes from the validation curve logged while training.",
        "- Load max = busiest expert / mean, experts/token and no expert = share of tokens no expert took, all under "
        "the arm's rule on the validation windows.", ""]
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        lines += ["Runs without results: " + ", ".join(f"{r['run']} ({r['status']}{': ' + r['error'] if r['error'] else ''})"
                                                        for r in failed), ""]
    run_cfg = next(iter(recipe_cfgs.values())).to_dict()
    shared = {k: run_cfg[k] for k in ("model", "optim", "train")}
    shared["train"] = {**shared["train"], "seed": "1..N (one per seed)"}
    lines += [plot_note, "", "## Config", "", f"Base config `{ident['config']}` with the study's settings and the "
              f"overrides given ({_overrides_text(user)}); the same for every run:", "", "```yaml",
              yaml.safe_dump(shared, sort_keys=False).strip(), "```", "",
              "Each training recipe's moe section (every run of a recipe is identical but for train.seed):", "", "```"]
    for recipe, cfg in recipe_cfgs.items():
        readers = ", ".join(a for a in arms if recipe_of(a) == recipe)
        moe = cfg.to_dict()["moe"]
        text = "experts: 0 (dense)" if not moe["experts"] else ", ".join(f"{k}: {v}" for k, v in moe.items())
        lines.append(f"{recipe} -> arms {readers}: {text}")
    lines += ["```", "", "Runs: " + ", ".join(sorted(state["runs"])) + " (under runs/; every figure per run in "
              "runs.csv).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def mean_curve(per_seed: dict) -> list[tuple[float, float, float]]:
    """(tokens, mean elapsed_s, mean loss) at the steps every seed logged."""
    if not per_seed:
        return []
    common = set.intersection(*(set(p["step"] for p in c) for c in per_seed.values()))
    out = []
    for step in sorted(common):
        pts = [next(p for p in c if p["step"] == step) for c in per_seed.values()]
        out.append((pts[0]["tokens"], statistics.fmean(p["elapsed_s"] for p in pts),
                    statistics.fmean(p["loss"] for p in pts)))
    return out


def plot_curves(out: Path, arms: list[str], curves: dict, tstar: float | None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plots: matplotlib is not installed (pip install 'choicelm[plot]'), so no curves_*.png were drawn."
    for name, x_index, xlabel in (("curves_tokens.png", 0, "training tokens"),
                                  ("curves_time.png", 1, "training seconds (mean over seeds)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm in arms:
            pts = mean_curve(curves.get(arm, {}))
            if pts:
                leaky = not ARMS[arm].causal_eval
                ax.plot([p[x_index] for p in pts], [p[2] for p in pts], "--" if leaky else "-", marker=".",
                        label=arm + (" (LEAKY)" if leaky else ""))
        if x_index == 1 and tstar:
            ax.axvline(tstar, color="grey", linestyle=":", label=f"T* = {tstar:.0f} s")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    return "Plots: curves_tokens.png and curves_time.png (mean over seeds per arm; dashed = LEAKY)."


def write_outputs(out: Path, state: dict, arms: list[str], rows: list[dict], curves: dict, recipe_cfgs: dict,
                  user: dict, log=print) -> Path:
    """runs.csv, curves_tokens.png and curves_time.png (if matplotlib is installed), report.md."""
    _write_csv(out / "runs.csv", rows, RUN_COLUMNS)
    note = plot_curves(out, arms, curves, state.get("equal_time", {}).get("tstar_s"))
    if note.startswith("Plots: matplotlib is not"):
        log(note)
    return write_report(out, state, arms, rows, recipe_cfgs, user, note)
