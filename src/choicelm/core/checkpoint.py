"""Checkpoints that are either complete or absent.

Layout of RUN/step-00001000/:
    model.safetensors   weights (tied tensors stored once); an n-gram run has ngram.npz + ngram.json instead
    optimizer.pt        AdamW state
    trainer.pt          step, tokens, schedule position, data position, RNG states, counters
    config.yaml         the resolved run config
    tokenizer/          a copy of the tokenizer the data was encoded with
    COMPLETE            written last (JSON: step, val_loss); without it the directory is ignored

A checkpoint is written into RUN/.tmp-step-.../, every file fsynced, the directory renamed into
place, and only then the marker written. A crash at any point leaves either the previous
checkpoints untouched or a directory without its marker, which loading refuses and pruning removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from .config import Config
from .errors import ChoicelmError, naming

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    val_loss: float | None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict, config_yaml: str, tokenizer_dir: Path | None,
                    val_loss: float | None, extra_files: dict[str, str] | None = None) -> Path:
    """Write RUN/step-XXXXXXXX atomically and return its path. `model` is an nn.Module (model.safetensors)
    or a counted model with .save(dir) (the n-gram's ngram.npz + ngram.json). extra_files: name -> text to
    write beside them (e.g. labels.json). A failure (a full disk, a second Ctrl-C) leaves no temporary folder
    behind; an OSError names the file it could not write."""
    final = run_dir / step_dir_name(step)
    if read_info(final) is not None:
        raise ChoicelmError(f"{final} already holds a complete checkpoint; choicelm never replaces one in place")
    tmp = run_dir / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        if isinstance(model, torch.nn.Module):
            _write_safetensors(model, tmp / "model.safetensors")
        else:  # a counted model (n-gram) writes its own tables
            model.save(tmp)
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(trainer_state, tmp / "trainer.pt")
        with naming(tmp / "config.yaml"):
            (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        for name, text in (extra_files or {}).items():
            with naming(tmp / name):
                (tmp / name).write_text(text)
        fsync_tree(tmp)
        if final.exists():  # an earlier, incomplete attempt at this step (it has no marker)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(run_dir)
    marker = final / MARKER
    try:
        with naming(marker), open(marker, "w") as f:
            f.write(json.dumps({"step": step, "val_loss": val_loss}))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a checkpoint without its marker is ignored and pruned; do not leave half a marker
        marker.unlink(missing_ok=True)
        raise
    return final


def _write_safetensors(model: torch.nn.Module, path: Path) -> None:
    with naming(path):  # safetensors reports a full disk as SafetensorError("... (os error 28)")
        save_model(model, str(path))


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so a full disk is an OSError naming `path` (torch.save(obj, path) raises a
    RuntimeError about a zip writer instead)."""
    with naming(path), open(path, "wb") as f:
        torch.save(obj, f)


def read_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint at `path` if it is complete, else None."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        return CheckpointInfo(path, int(meta["step"]), meta.get("val_loss"))
    except (ValueError, KeyError, TypeError):
        return None


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [read_info(p) for p in run_dir.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its newest complete checkpoint; a step directory must be complete."""
    path = Path(path)
    if not path.exists():
        raise ChoicelmError(f"checkpoint {path} does not exist; pass a run directory or one of its step-XXXXXXXX folders")
    if read_info(path) is not None:
        return path
    if (path / "config.json").is_file() and not (path / "config.yaml").exists():
        raise ChoicelmError(f"{path} is a Hugging Face model folder, not a choicelm checkpoint; convert it first "
                            f"with `choicelm convert from-hf {path} OUT` and pass OUT instead")
    if (path / "model.safetensors").exists() or STEP_DIR.match(path.name):
        raise ChoicelmError(f"checkpoint {path} is incomplete (no {MARKER} marker: the run was interrupted while "
                            f"saving it); use an earlier step-XXXXXXXX folder or the run directory")
    found = list_checkpoints(path)
    if not found:
        raise ChoicelmError(f"{path} holds no complete checkpoint (looked for step-XXXXXXXX/{MARKER}); "
                            "is it a choicelm run directory?")
    return found[-1].path


def read_raw_config(step_dir: Path, hint: str = "it is not a choicelm checkpoint",
                    error: type[ChoicelmError] = ChoicelmError) -> dict:
    """The sections of `step_dir`/config.yaml as written (a dict, {} if empty), not yet checked; `hint` ends
    the message when the file is missing, raised as `error`."""
    file = Path(step_dir) / "config.yaml"
    if not file.is_file():
        raise error(f"{step_dir} has no config.yaml; {hint}")
    return yaml.safe_load(file.read_text()) or {}


def read_config(step_dir: Path, hint: str = "it is not a choicelm checkpoint",
                error: type[ChoicelmError] = ChoicelmError) -> Config:
    """The run config a checkpoint was written with (`step_dir`/config.yaml), checked as any config is."""
    file = Path(step_dir) / "config.yaml"
    return Config.from_dict(read_raw_config(step_dir, hint, error), str(file))


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best by validation loss; drop the rest
    and any leftovers of interrupted saves."""
    complete = list_checkpoints(run_dir)
    keep = {c.path for c in complete[-keep_last:]}
    scored = [c for c in complete if c.val_loss is not None]
    if scored:
        keep.add(min(scored, key=lambda c: c.val_loss).path)
    for c in complete:
        if c.path not in keep:
            shutil.rmtree(c.path)
    for p in run_dir.iterdir():
        if p.name.startswith(".tmp-step-") or (STEP_DIR.match(p.name) and read_info(p) is None):
            shutil.rmtree(p, ignore_errors=True)


def load_weights(model: torch.nn.Module, ckpt_dir: Path) -> None:
    weights = ckpt_dir / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as e:  # safetensors raises a mix of types for a truncated or foreign file
        raise ChoicelmError(f"cannot read weights {weights}: {e}; the file is truncated or not a choicelm checkpoint") from None
    if missing or unexpected:
        raise ChoicelmError(f"weights {weights} do not fit this model (missing {sorted(missing)[:5]}, unexpected "
                            f"{sorted(unexpected)[:5]}); it was saved by a different model config")


def load_trainer_state(ckpt_dir: Path) -> dict:
    try:
        return torch.load(ckpt_dir / "trainer.pt", weights_only=False)
    except Exception as e:
        raise ChoicelmError(f"cannot read {ckpt_dir / 'trainer.pt'}: {e}; the checkpoint is damaged") from None


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    try:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=False))
    except Exception as e:
        raise ChoicelmError(f"cannot restore the optimizer from {ckpt_dir}: {e}; the checkpoint is damaged") from None
