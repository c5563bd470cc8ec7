"""`choicelm plot RUN`: PNGs of the loss curves and throughput, from RUN/metrics.csv; for MoE runs also the
expert load over training (moe.png) and a routing map of a sample text from the last checkpoint (routing_map.png)."""

from __future__ import annotations

from pathlib import Path

from .core.errors import ChoicelmError, naming
from .core.run_dir import read_metrics


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
    with naming(loss_png):
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
    with naming(perf_png):
        fig.savefig(perf_png, dpi=120)
    plt.close(fig)
    pngs = [loss_png, perf_png]
    if any(r.get("moe_load_max") is not None for r in rows):
        pngs.append(_plot_expert_load(plt, series, run_dir.name, out_dir / "moe.png"))
        from .core.checkpoint import list_checkpoints

        if list_checkpoints(run_dir):
            pngs.append(plot_routing_map(run_dir, out_dir / "routing_map.png"))
    return pngs


SAMPLE_TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"


def plot_routing_map(checkpoint: str | Path, path: str | Path, text: str = SAMPLE_TEXT, max_tokens: int = 48) -> Path:
    """Which tokens of `text` each expert takes, per MoE layer, with the routing rule
    generation uses (the model in eval mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .api import load

    lm = load(checkpoint, "cpu")
    model = lm.model
    ids = lm.tokenizer.encode(text)[:min(max_tokens, model.config.block_size)]
    if not ids or not model.moe_layers():
        raise ChoicelmError(f"{checkpoint}: a routing map needs an MoE model and a non-empty text")
    model.record_routing = True
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    model.record_routing = False
    layers = out.stats["moe"]
    labels = [lm.tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(7, 0.28 * len(ids)), 1.2 + 1.6 * len(layers)), squeeze=False)
    for ax, (layer, stats) in zip(axes[:, 0], layers.items()):
        ax.imshow(stats["assignment"][0].T.float().numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
        ax.set_ylabel(f"block {layer}\nexpert")
        ax.set_xticks(range(len(ids)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    axes[0, 0].set_title(f"routing map ({out.stats['routing']} rule, causal: {out.stats['causal']}): "
                         "a filled cell = the expert took the token")
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _plot_expert_load(plt, series, name: str, path: Path) -> Path:
    """MoE runs: expert load balance, experts per token and the causal rules' agreement with top-k over training."""
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax1.plot(*series("moe_load_max"), color="tab:red")
    ax1.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax1.set_ylabel("busiest expert / mean")
    ax1.set_title(f"{name}: expert load (mean over MoE layers)")
    ax2.plot(*series("moe_experts_per_token"), label="experts per token")
    steps, none = series("moe_no_expert")
    ax2.plot(steps, [100 * v for v in none], label="tokens with no expert %")
    steps, dropped = series("moe_dropped")
    if dropped:
        ax2.plot(steps, [100 * v for v in dropped], label="dropped assignments %")
    ax2.legend()
    for key, label in (("moe_recall_threshold", "threshold"), ("moe_recall_predictor", "predictor")):
        steps, vals = series(key)
        if vals:
            ax3.plot(steps, [100 * v for v in vals], label=f"{label}: recall of top-k picks %")
        steps, vals = series(key.replace("recall", "agree"))
        if vals:
            ax3.plot(steps, [100 * v for v in vals], ls="--", label=f"{label}: agreement (all pairs) %")
    if ax3.lines:
        ax3.legend()
    ax3.set_xlabel("step")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
