"""A run directory as every layer reads it: RUN/config.yaml (the resolved config), RUN/metrics.csv (its
columns and reader; train/run_log.py writes it), RUN/step-XXXXXXXX/ (core/checkpoint.py), and the rules
for reusing a directory as --out (fresh start, resume, replacement or refusal) and the lock a writer holds
(RUN/.lock)."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .errors import ChoicelmError, naming

# MoE runs only (empty otherwise); see models/moe.py summarize_stats. moe_val_loss_topk: validation loss with
# teacher-forced top-k expert choice (non-causal), next to val_loss, which uses the causal rule generation uses.
MOE_COLUMNS = ["moe_aux_loss", "moe_load_max", "moe_experts_per_token", "moe_no_expert", "moe_dropped",
               "moe_router_entropy", "moe_agree_threshold", "moe_recall_threshold", "moe_agree_predictor",
               "moe_recall_predictor", "moe_val_loss_topk"]
COLUMNS = ["step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s",
           "flops_per_s", "mfu", "peak_mem_mb", "data_wait", "nonfinite_skipped", "elapsed_s", *MOE_COLUMNS]


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of RUN/metrics.csv as {column: float or None}. A last line without its line end (a run killed while
    appending it) is left out; a file that is otherwise not such a table (garbled, cut rows, not UTF-8, no step
    column) is a ChoicelmError naming the line."""
    path = Path(run_dir) / "metrics.csv"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChoicelmError(f"{path} is damaged (not UTF-8 at byte offset {e.start}); it is not the table choicelm "
                            "writes (step,tokens,train_loss,...)") from None
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        if "step" not in (reader.fieldnames or []):
            raise ChoicelmError(f"{path} has no step column; it is not a choicelm metrics file")
        for row in reader:
            if None in row or any(v is None for v in row.values()) or not row["step"]:
                raise ValueError(f"{len(reader.fieldnames)} columns and a step expected")
            rows.append({k: (float(v) if v != "" else None) for k, v in row.items()})
    except (ValueError, csv.Error) as e:
        raise ChoicelmError(f"{path} is damaged at line {reader.line_num} ({' '.join(str(e).split())[:120]}); it is "
                            "not the table choicelm writes (step,tokens,train_loss,...)") from None
    return rows


LOCK_FILE = ".lock"  # RUN/.lock: flocked by the process writing the run, for the run's lifetime


class RunLock:
    """An exclusive fcntl.flock on RUN/.lock, held while a process writes the run (a second writer is refused).
    The file stays behind when the run ends; the lock goes with the process, however it ends (even SIGKILL)."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.path, self.fd = out_dir, out_dir / LOCK_FILE, None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def probe(self) -> None:
        """Take the lock if the lock file exists (a live writer: refused). Creates nothing."""
        if not self.held and self.path.is_file():
            self._take(os.O_RDWR)

    def acquire(self) -> None:
        """Create the run folder and the lock file if needed, take the lock and write our pid into it."""
        if not self.held:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._take(os.O_RDWR | os.O_CREAT)
        with naming(self.path):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _take(self, flags: int) -> None:
        fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ChoicelmError(f"--out {self.out_dir} is in use by another choicelm process"
                                f"{f' (pid {pid})' if pid else ''}; wait for it to finish or stop it first, "
                                "or choose another --out") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


@dataclass
class RunPlan:
    """What starting a run will do to --out: resume from `resume_from` (None: a fresh start), after deleting the
    run there first if `replace`. Nothing on disk changes until commit()."""

    out_dir: Path
    resume: str | None
    overwrite: bool
    resume_from: Path | None
    replace: bool
    lock: RunLock

    def commit(self, is_main: bool = True) -> Path | None:
        """Take the run's lock (rank 0), check that nothing changed since the plan, replace the old run if planned.
        Returns the checkpoint to resume from, or None for a fresh start."""
        if not is_main:
            return self.resume_from
        self.lock.acquire()
        again = _decide(self.out_dir, self.resume, self.overwrite)
        if (again.resume_from, again.replace) != (self.resume_from, self.replace):
            self.lock.release()
            raise ChoicelmError(f"--out {self.out_dir} changed while the run was starting (another process wrote "
                                "to it); check it and start again")
        if self.replace:
            for p in self.out_dir.iterdir():
                if p.name == LOCK_FILE:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return self.resume_from

    def release(self) -> None:
        self.lock.release()


@dataclass
class _Decision:
    resume_from: Path | None
    replace: bool


def plan_run_dir(out_dir: Path, resume: str | None, overwrite: bool, is_main: bool = True) -> RunPlan:
    """Decide between a fresh run, a resume and a replacement of --out, refusing anything that would lose or mix
    data; changes nothing on disk (a live writer's lock is probed, not created). Rank 0 commits the plan."""
    lock = RunLock(out_dir)
    if is_main:
        lock.probe()
    try:
        d = _decide(out_dir, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return RunPlan(out_dir, resume, overwrite, d.resume_from, d.replace, lock)


def _decide(out_dir: Path, resume: str | None, overwrite: bool) -> _Decision:
    if out_dir.exists() and not out_dir.is_dir():
        raise ChoicelmError(f"--out {out_dir} is a file; choose a directory for the run")
    is_run = (out_dir / "config.yaml").exists() or (out_dir / "metrics.csv").exists()
    nonempty = out_dir.is_dir() and any(p.name != LOCK_FILE for p in out_dir.iterdir())
    if nonempty and not is_run:
        raise ChoicelmError(f"--out {out_dir} is not empty and is not a choicelm run; choose a new directory")
    if resume not in (None, "auto"):
        source = ckpt.resolve_checkpoint(resume)
        if out_dir.resolve() in source.resolve().parents:  # a checkpoint of this run
            if overwrite:
                raise ChoicelmError(f"--overwrite would delete {source}, the checkpoint --resume names; drop "
                                    "--overwrite to continue the run from it")
            step = ckpt.read_info(source).step
            newer = [c for c in ckpt.list_checkpoints(out_dir) if c.step > step]
            if newer:  # rewinding would replace them (and the metrics after `step`), and pruning would count them
                raise ChoicelmError(f"--resume {source} is older than this run's newer checkpoint(s) "
                                    f"{', '.join(c.path.name for c in newer)}: continuing from step {step} in "
                                    f"{out_dir} would replace them and the metrics after step {step}, so nothing was "
                                    f"changed; continue the run with --resume auto, or start a new --out from "
                                    f"{source} (--resume {source} --out NEW_DIR)")
            return _Decision(source, False)
        if is_run and not overwrite:
            raise ChoicelmError(f"--resume {resume} is a checkpoint of another run, and --out {out_dir} already holds "
                                f"a run: starting from it would mix the two runs; choose a new --out to continue "
                                f"from {source}, or pass --overwrite to replace {out_dir}")
        return _Decision(source, is_run)
    found = ckpt.list_checkpoints(out_dir)
    if resume == "auto" and is_run:
        if found:
            return _Decision(found[-1].path, False)
        lost = _unusable(out_dir)
        if lost and not overwrite:
            raise ChoicelmError(f"--out {out_dir} holds a run but no complete checkpoint to resume from ({lost}); "
                                "pass --overwrite to delete it and start over, or choose another --out")
    if is_run and resume != "auto" and not overwrite:
        where = f" (checkpoint at step {found[-1].step})" if found else ""
        raise ChoicelmError(f"--out {out_dir} already holds a run{where}; pass --resume auto to continue it, "
                            "--overwrite to replace it, or choose another --out")
    # --overwrite, or --resume auto on a run that never trained a step
    return _Decision(None, is_run)


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


def prepare_run_dir(out_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> RunPlan:
    """plan_run_dir + commit in one go (a run with no checks of its own between them). Release the returned
    plan's lock when the run ends."""
    plan = plan_run_dir(out_dir, resume, overwrite, is_main)
    try:
        plan.commit(is_main)
    except BaseException:
        plan.release()
        raise
    return plan
