"""A run directory as every layer reads it: RUN/config.yaml (the resolved config), RUN/metrics.csv (its
columns and reader; train/run_log.py writes it), RUN/step-XXXXXXXX/ (core/checkpoint.py), and the rules
for reusing a directory as --out (fresh start, resume or refusal)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .errors import ChoicelmError

# MoE runs only (empty otherwise); see models/moe.py summarize_stats. moe_val_loss_topk: validation loss with
# teacher-forced top-k expert choice (non-causal), next to val_loss, which uses the causal rule generation uses.
MOE_COLUMNS = ["moe_aux_loss", "moe_load_max", "moe_experts_per_token", "moe_no_expert", "moe_dropped",
               "moe_router_entropy", "moe_agree_threshold", "moe_recall_threshold", "moe_agree_predictor",
               "moe_recall_predictor", "moe_val_loss_topk"]
COLUMNS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s",
           "flops_per_s", "mfu", "peak_mem_mb", "data_wait", "nonfinite_skipped", "elapsed_s", *MOE_COLUMNS]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def prepare_run_dir(out_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> Path | None:
    """Decide between a fresh run and a resume; refuse to clobber anything. Returns the checkpoint to
    resume from, or None for a fresh start."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ChoicelmError(f"--out {out_dir} is a file; choose a directory for the run")
    is_run = (out_dir / "config.yaml").exists() or (out_dir / "metrics.csv").exists()
    nonempty = out_dir.is_dir() and any(out_dir.iterdir())
    if resume not in (None, "auto"):
        source = ckpt.resolve_checkpoint(resume)
        if out_dir.resolve() in source.resolve().parents:  # a checkpoint of this run
            if overwrite:
                raise ChoicelmError(f"--overwrite would delete {source}, the checkpoint --resume names; drop "
                                    "--overwrite to continue the run from it")
            return source
        if nonempty and not is_run:
            raise ChoicelmError(f"--out {out_dir} is not empty and is not a choicelm run; choose a new directory")
        if is_run and not overwrite:
            raise ChoicelmError(f"--resume {resume} is a checkpoint of another run, and --out {out_dir} already holds "
                                f"a run: starting from it would mix the two runs; choose a new --out to continue "
                                f"from {source}, or pass --overwrite to replace {out_dir}")
        if is_run and is_main:
            shutil.rmtree(out_dir)
        return source
    if resume == "auto" and is_run:
        found = ckpt.list_checkpoints(out_dir)
        if found:
            return found[-1].path
        lost = _unusable(out_dir)
        if lost and not overwrite:
            raise ChoicelmError(f"--out {out_dir} holds a run but no complete checkpoint to resume from ({lost}); "
                                "pass --overwrite to delete it and start over, or choose another --out")
    if nonempty and not is_run:
        raise ChoicelmError(f"--out {out_dir} is not empty and is not a choicelm run; choose a new directory")
    if is_run and resume != "auto" and not overwrite:
        done = ckpt.list_checkpoints(out_dir)
        where = f" (checkpoint at step {done[-1].step})" if done else ""
        raise ChoicelmError(f"--out {out_dir} already holds a run{where}; pass --resume auto to continue it, "
                            "--overwrite to replace it, or choose another --out")
    if is_run and is_main:  # --overwrite, or --resume auto on a run that never trained a step
        shutil.rmtree(out_dir)
    return None


def _unusable(out_dir: Path) -> str:
    """What a run without a complete checkpoint would lose by starting over ('' if nothing)."""
    parts = []
    for p in sorted(out_dir.iterdir()):
        if ckpt.STEP_DIR.match(p.name) and p.is_dir():
            marker = p / ckpt.MARKER
            parts.append(f"{p.name}: {'unreadable' if marker.exists() else 'no'} {ckpt.MARKER} marker")
    metrics = out_dir / "metrics.csv"
    if metrics.is_file():
        try:
            with open(metrics, newline="") as f:
                steps = [r.get("step") for r in csv.DictReader(f)]
        except (OSError, UnicodeDecodeError, csv.Error):
            steps = ["?"]
        if steps:
            parts.append(f"metrics.csv has {len(steps)} rows, up to step {steps[-1]}")
    return "; ".join(parts)
