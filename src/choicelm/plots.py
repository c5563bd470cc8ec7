"""`choicelm plot RUN`: PNGs of the loss curves and throughput, from RUN/metrics.csv."""

from __future__ import annotations

from pathlib import Path

from .errors import ChoicelmError
from .train.metrics import read_metrics


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise ChoicelmError(f"{run_dir} has no metrics.csv; pass a run directory written by `choicelm pretrain`")
    rows = read_metrics(run_dir)
    if not rows:
        raise ChoicelmError(f"{run_dir}/metrics.csv has no rows yet; train for at least train.log_every steps")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*series("train_loss"), label="train loss")
    steps, val = series("val_loss")
    if val:
        ax.plot(steps, val, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = out_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(*series("tokens_per_s"), color="tab:green")
    ax1.set_ylabel("tokens / s")
    ax1.grid(alpha=0.3)
    steps, mfu = series("mfu")
    ax2.plot(steps, [100 * m for m in mfu], color="tab:purple", label="MFU %")
    steps, wait = series("data_wait")
    ax2.plot(steps, [100 * w for w in wait], color="tab:gray", label="waiting for data %")
    ax2.set_ylabel("% ")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    ax2.legend()
    ax1.set_title(f"{run_dir.name}: throughput")
    perf_png = out_dir / "throughput.png"
    fig.tight_layout()
    fig.savefig(perf_png, dpi=120)
    plt.close(fig)
    return [loss_png, perf_png]
