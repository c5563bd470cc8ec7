"""The run log: RUN/metrics.csv and TensorBoard events written as a run trains, and the measured peak
FLOP/s and memory its rows report (the columns and the reader are in core/run_dir.py).

Columns of RUN/metrics.csv (empty where a row has no value, e.g. val_loss off evaluation steps):
    step, tokens, train_loss, val_loss, val_ppl, lr, grad_norm, tokens_per_s, flops_per_s, mfu,
    peak_mem_mb, data_wait, nonfinite_skipped, elapsed_s, then the moe_* columns (MOE_COLUMNS, MoE runs only)
`mfu` is achieved FLOP/s over the peak matmul FLOP/s measured on this machine in the training
precision (cached in ~/.cache/choicelm/peak_flops.json), or over train.peak_flops when given.
"""

from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from ..core.errors import naming
from ..core.run_dir import COLUMNS

class MetricsLog:
    """Appends rows to metrics.csv and TensorBoard. On resume, rows past the checkpoint are dropped so the
    file reads as if the run had never been interrupted."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
                kept = [r for r in csv.DictReader(f) if (_row_step(r) or math.inf) <= resume_step]
            self._rewrite(kept)
        elif not self.path.exists() or resume_step is None:
            self._rewrite([])
        from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step + 1) if resume_step is not None else None)

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        try:
            with naming(self.path), open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, row: dict) -> None:
        with naming(self.path), open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and value == value:
                self.tb.add_scalar(_tb_name(key), value, row["step"])

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def _row_step(row: dict) -> int | None:
    """The step of a whole metrics row; None for a row cut short (a kill in the middle of a write) or garbled."""
    if None in row or any(v is None for v in row.values()):
        return None
    try:
        return int(row["step"])
    except (KeyError, ValueError):
        return None


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.10g}"
    return value


def _tb_name(key: str) -> str:
    if key.startswith("moe_"):
        return f"moe/{key[4:]}"
    group = "loss" if "loss" in key or "ppl" in key else "perf" if key in (
        "tokens_per_s", "flops_per_s", "mfu", "peak_mem_mb", "data_wait") else "train"
    return f"{group}/{key}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or on CPU this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from a big parent through fork + exec
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in `dtype` on `device`: the ceiling MFU is measured against.
    Cached per device, dtype and thread count because it takes a second or two (delete the cache
    file to re-measure, e.g. if it was measured while the machine was busy)."""
    key = f"{device.type}:{torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()}:" \
          f"{torch.get_num_threads()}:{dtype}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "choicelm" / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: resume must be exact
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3 / min(times[1:])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = flops
        cache.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only home only costs re-measuring next time
    return flops
