"""End-to-end MoE training speed: full optimizer steps of MoE GPTs against the dense GPT of equal active FLOPs.

    python benchmarks/moe_train.py                          # the demo recipe, arms tc1,tc2,ec,et, 7 interleaved rounds
    python benchmarks/moe_train.py --arms tc1,tc2 --rounds 5
    python benchmarks/moe_train.py --profile tc1            # where the arm's extra time goes, against dense

The model and optimizer are the demo recipe (--config, default configs/shakespeare.yaml: GPT 4 x 256, Llama
layout, QK-norm, SwiGLU of width h = 768, Muon for the block matrices); --optim adamw swaps in fused AdamW for
every parameter. The arms are the routing study's training recipes (study/arms.py, same moe.* settings and the
same equal-active-FLOPs widths): MoE in every 2nd block, 8 experts by default:

    tc1      token choice top-1 (Switch), expert width h, capacity 1.25, balance 0.01, z-loss 1e-3
    tc2      token choice top-2 dropless (Mixtral), expert width h/2
    ec       causal expert choice trained with top-k (the teacher; thresholds and predictor learn it), c=2, h/2
    et       expert threshold: trained with the causal threshold rule (moe.train_causal=true)
    tc4_16, ec_threshold_16, et_16: 16 experts of width h/4, 4 per token

One step is what the training loop does (train/loop.py Trainer.train_step): forward under bf16 autocast
(core/runtime.py) with the summed chunked loss, the MoE aux loss added and read back, backward, gradient
clipping, the learning rate set, the optimizer from train/optim.py build_optimizer, zero_grad; and like the loop,
the routing statistics summarised every --log-every steps.
Batches are windows of the prepared demo data (--data; random tokens if it is missing), the same for every arm.
Every model is timed in one process, interleaved round by round so machine noise hits all alike; each figure is
the median over rounds of the mean step time over --steps steps, printed as tokens/s and as the ratio to dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from choicelm.core.config import ModelConfig, MoEConfig, OptimConfig, load_config
from choicelm.models import build_model
from choicelm.models import moe as moe_module
from choicelm.models.moe import summarize_stats
from choicelm.train.optim import build_optimizer, lr_at, set_lr
from choicelm.core.runtime import autocast, keep_freed_memory
from choicelm.study.arms import ARMS, moe_overrides

BENCH_ARMS = ("tc1", "tc2", "ec", "et", "tc4_16", "ec_threshold_16", "et_16")

def recipe(args) -> tuple[ModelConfig, OptimConfig]:
    cfg = load_config(args.config)
    model = dataclasses.replace(cfg.model, vocab_size=args.vocab, dropout=0.0)
    optim = cfg.optim if not args.optim else dataclasses.replace(cfg.optim, name=args.optim)
    return model, optim


def build(name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    model_cfg, _ = recipe(args)
    moe = None if name == "dense" else MoEConfig(**{**moe_overrides(name, model_cfg.hidden_size),
                                                    "experts": args.experts or ARMS[name].train["experts"]})
    return build_model(model_cfg, moe).train()


def batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """--n-batches (x, y) micro-batches: random windows of the prepared training data, or random tokens."""
    g = np.random.default_rng(0)
    path = Path(args.data)
    if (path / "manifest.json").exists():
        from choicelm.data.loader import TokenDataset

        tokens = TokenDataset(path, "train").shards[0]
        starts = g.integers(0, len(tokens) - args.seq - 1, size=(args.n_batches, args.batch))
        out = []
        for row in starts:
            w = torch.from_numpy(np.stack([np.asarray(tokens[s:s + args.seq + 1], dtype=np.int64) for s in row]))
            out.append((w[:, :-1].clamp(max=args.vocab - 1), w[:, 1:].clamp(max=args.vocab - 1)))
        return out
    w = torch.from_numpy(g.integers(0, args.vocab, size=(args.n_batches, args.batch, args.seq + 1)))
    return [(b[:, :-1], b[:, 1:]) for b in w]


class Stepper:
    """One model, its optimizer, and the training loop's step on it."""

    def __init__(self, name: str, args, data):
        self.name, self.args, self.data = name, args, data
        self.model = build(name, args)
        self.ocfg = recipe(args)[1]
        self.opt = build_optimizer(self.model, self.ocfg, "cpu")
        self.step_no = 0
        self.moe = bool(self.model.moe_layers())
        self.unpadded = False  # run ragged experts on exactly their tokens (the code before padded_rows)
        self.summary: dict = {}  # summarize_stats of the last logged step

    def __call__(self) -> None:
        if not self.unpadded:
            return self._step()
        saved, moe_module.padded_rows = moe_module.padded_rows, lambda count: count
        try:
            return self._step()
        finally:
            moe_module.padded_rows = saved

    def _step(self) -> None:
        x, y = self.data[self.step_no % len(self.data)]
        self.step_no += 1
        logged = self.step_no % self.args.log_every == 0
        n_valid = int((y != -100).sum())
        with autocast(torch.device("cpu"), True):
            out = self.model(x, y, loss_reduction="sum", return_logits=False)
            loss = out.loss / n_valid
            aux_value = 0.0
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
                aux_value = float(out.aux_loss.detach())
        loss.backward()
        mean_loss = out.loss.detach().double().item() / n_valid
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        if math.isfinite(mean_loss) and math.isfinite(grad_norm):
            set_lr(self.opt, lr_at(self.step_no, self.ocfg, 600))
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if logged and self.moe:
            self.summary = summarize_stats(out.stats)
        return aux_value


def profile(stepper: Stepper, dense: Stepper, steps: int, rows: int, warmup: int) -> None:
    """Self CPU time per op name, the arm against dense, over `steps` steps each (profiled one step at a time,
    alternating between the two so machine noise hits both alike); the biggest differences first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for s in (stepper, dense):
        for _ in range(warmup):
            s()
    a: dict[str, list[float]] = {}
    d: dict[str, list[float]] = {}
    for _ in range(steps):
        for s, acc in ((stepper, a), (dense, d)):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                s()
            for e in prof.key_averages():
                total = acc.setdefault(e.key, [0.0, 0])
                total[0] += e.self_cpu_time_total / steps / 1e3
                total[1] += e.count / steps
    a = {k: (v[0], round(v[1])) for k, v in a.items()}
    d = {k: (v[0], round(v[1])) for k, v in d.items()}
    ta, td = sum(v for v, _ in a.values()), sum(v for v, _ in d.values())
    print(f"profile {stepper.name} vs dense, self CPU ms per step (profiler totals: {ta:.1f} vs {td:.1f}, "
          f"difference {ta - td:+.1f} ms)")
    print(f"{'op':<48}{stepper.name + ' ms':>12}{'calls':>7}{'dense ms':>10}{'calls':>7}{'diff ms':>9}")
    keys = sorted(set(a) | set(d), key=lambda k: -(a.get(k, (0, 0))[0] - d.get(k, (0, 0))[0]))
    for k in keys[:rows]:
        (ma, ca), (md, cd) = a.get(k, (0.0, 0)), d.get(k, (0.0, 0))
        print(f"{k[:47]:<48}{ma:>12.2f}{ca:>7}{md:>10.2f}{cd:>7}{ma - md:>+9.2f}")
    print("... smallest (negative = the arm spends less):")
    for k in keys[-5:]:
        (ma, ca), (md, cd) = a.get(k, (0.0, 0)), d.get(k, (0.0, 0))
        print(f"{k[:47]:<48}{ma:>12.2f}{ca:>7}{md:>10.2f}{cd:>7}{ma - md:>+9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="tc1,tc2,ec,et", help=f"comma list of {', '.join(BENCH_ARMS)}")
    p.add_argument("--config", default="configs/shakespeare.yaml", help="the model and optimizer recipe")
    p.add_argument("--optim", default="", choices=("", "adamw", "muon"), help="override the recipe's optimizer")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--experts", type=int, default=0, help="experts per MoE layer; 0 = the arm's own count")
    p.add_argument("--data", default="demo/data", help="a prepared data folder (random tokens if missing)")
    p.add_argument("--n-batches", type=int, default=64,
                   help="distinct micro-batches, cycled (few batches are memorised, and routing then drifts)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=8,
                   help="steps per arm per round (3-step rounds moved the ratios by +-10%% on this machine)")
    p.add_argument("--warmup", type=int, default=6,
                   help="untimed steps per model first (routing that fills experts unevenly meets new matmul shapes "
                        "in its first steps)")
    p.add_argument("--log-every", type=int, default=10,
                   help="summarise the routing statistics every N steps, as the loop")
    p.add_argument("--unpadded", action="store_true",
                   help="also time each arm as ARM/unpadded: ragged experts on exactly their tokens (no padded_rows), "
                        "as before the rounding")
    p.add_argument("--profile", default="", help="an arm: print a torch.profiler breakdown of it against dense")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (one per core)")
    args = p.parse_args()
    cfg = load_config(args.config)
    args.seq, args.batch = cfg.model.block_size, cfg.train.micro_batch_size
    unknown = [a for a in args.arms.split(",") if a and a not in BENCH_ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(BENCH_ARMS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    data = batches(args)

    if args.profile:
        profile(Stepper(args.profile, args, data), Stepper("dense", args, data), args.profile_steps,
                args.profile_rows, args.warmup)
        return

    arms = [a for a in args.arms.split(",") if a]
    ragged = ("tc1", "tc2", "et", "tc4_16", "et_16")  # training rules that fill experts unevenly
    names = ["dense"] + [n for a in arms for n in ([a, a + "/unpadded"] if args.unpadded and a in ragged else [a])]
    steppers = {n: Stepper(n.split("/")[0], args, data) for n in names}
    for n, s in steppers.items():
        s.unpadded = n.endswith("/unpadded")
    for s in steppers.values():
        for _ in range(args.warmup):
            s()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU time: robust to being descheduled
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: no arm always runs first
            s = steppers[n]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                s()
            times[n].append((time.perf_counter() - t0) / args.steps)
            cpu[n].append((time.process_time() - c0) / args.steps)
        done = ", ".join(f"{n} {1e3 * times[n][-1]:.0f} ms (cpu {1e3 * cpu[n][-1]:.0f})" for n in names)
        print(f"round {r + 1}/{args.rounds}: {done}", file=sys.stderr, flush=True)
    tokens = args.batch * args.seq
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    model_cfg, optim_cfg = recipe(args)
    print(f"GPT {model_cfg.n_layer}x{model_cfg.n_embd} ({model_cfg.mlp} {model_cfg.hidden_size}, {model_cfg.pos}, "
          f"{model_cfg.norm}{', qk-norm' if model_cfg.qk_norm else ''}), T={args.seq}, B={args.batch}, vocab "
          f"{args.vocab}; MoE every 2nd block; bf16 autocast, optimizer {optim_cfg.name}; threads "
          f"{torch.get_num_threads()}; median of {args.rounds} rounds x {args.steps} steps "
          f"({time.perf_counter() - t_start:.0f} s)")
    print("x dense = dense step time / the arm's (tokens/s ratio); cpu: the same from process CPU time")
    print("experts/token and load max: routing statistics of each arm's last logged step")
    print(f"{'arm':<22}{'ms/step':>9}{'tokens/s':>10}{'x dense':>9}{'round min..max':>17}{'cpu x dense':>13}"
          f"{'experts/token':>15}{'load max':>10}")
    for n in names:
        rel = [times["dense"][i] / times[n][i] for i in range(args.rounds)]
        summary = steppers[n].summary
        routing = (f"{summary['moe_experts_per_token']:>15.2f}{summary['moe_load_max']:>10.2f}" if summary else "")
        print(f"{n:<22}{1e3 * med[n]:>9.1f}{tokens / med[n]:>10.0f}{med['dense'] / med[n]:>9.3f}"
              f"{min(rel):>10.3f}..{max(rel):.3f}{med_cpu['dense'] / med_cpu[n]:>13.3f}{routing}")


if __name__ == "__main__":
    main()
