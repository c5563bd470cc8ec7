"""Training throughput: choicelm's GPT against Hugging Face GPT2LMHeadModel, same shape, same batch.

    python benchmarks/train_throughput.py                        # 6 x 384, T=256, B=8, vocab 50,304
    python benchmarks/train_throughput.py --modes fp32,bf16 --rounds 3

One optimizer step = forward + backward + gradient clipping + fused AdamW, the same work the
training loop does. Every (model, mode) pair is timed in the same process, interleaved round by
round so that machine noise hits both alike; figures are medians. The matmul ceilings (fp32, bf16)
are measured in the same run; MFU-style shares are achieved FLOP/s over those ceilings.
Peak memory is measured per (model, mode) in a child process (max RSS of a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from choicelm.core.config import ModelConfig
from choicelm.models import build_model
from choicelm.train.run_log import peak_memory_mb
from choicelm.core.runtime import autocast, keep_freed_memory
from choicelm.train.loop import compile_for_training


def build(kind: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "choicelm":
        cfg = ModelConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                          n_embd=args.width)
        return build_model(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def make_step(kind: str, model: torch.nn.Module, mode: str):
    device = torch.device("cpu")
    bf16 = mode.startswith("bf16")
    fwd = model
    if mode.endswith("compile"):  # each in its best compiled form: choicelm's per-block compile, HF's whole model
        fwd = compile_for_training(model) if kind == "choicelm" else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(x, y):
        with autocast(device, bf16):
            if kind == "choicelm":
                loss = fwd(x, y, return_logits=False).loss
            else:  # HF shifts labels inside; pass the unshifted ids
                loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def child_peak_memory(kind: str, mode: str, args) -> float:
    """Max RSS (MB) of a fresh process running a few steps of one (model, mode)."""
    cmd = [sys.executable, __file__, "--child", kind, "--modes", mode, "--layers", str(args.layers),
           "--width", str(args.width), "--heads", str(args.heads), "--seq", str(args.seq),
           "--batch", str(args.batch), "--vocab", str(args.vocab), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--modes", default="fp32,bf16,bf16+compile")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each times --steps steps per pair")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-pair peak-memory child processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (one per core)")
    p.add_argument("--child", choices=("choicelm", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # both models run under the same allocator setting
    modes = args.modes.split(",")
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)

    if args.child:
        step = make_step(args.child, build(args.child, args), modes[0])
        for _ in range(3):
            step(x, y)
        print(json.dumps({"peak_mb": peak_memory_mb(torch.device("cpu"))}))
        return

    kinds = ("choicelm", "hf")
    models = {k: build(k, args) for k in kinds}
    flops_per_token = models["choicelm"].flops_per_token(args.seq)
    steps = {(k, m): make_step(k, models[k], m) for k in kinds for m in modes}
    for key, step in steps.items():  # warm-up (and compilation) outside the timed rounds
        for _ in range(args.warmup):
            step(x, y)
    times: dict[tuple, list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(x, y)
                times[key].append(time.perf_counter() - t0)
    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    tokens = args.batch * args.seq

    print(f"GPT {args.layers}x{args.width}, heads {args.heads}, T={args.seq}, B={args.batch}, vocab {args.vocab}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"matmul ceiling: fp32 {ceilings['fp32'] / 1e9:.0f} GFLOP/s, bf16 {ceilings['bf16'] / 1e9:.0f} GFLOP/s; "
          f"{flops_per_token / 1e6:.1f} MFLOP per token (6N + attention)")
    header = f"{'model':9} {'mode':13} {'tokens/s':>9} {'GFLOP/s':>8} {'% ceil':>7} {'peak MB':>8}"
    print(header)
    rate = {}
    for (kind, mode), ts in times.items():
        rate[(kind, mode)] = tokens / statistics.median(ts)
        gflops = rate[(kind, mode)] * flops_per_token / 1e9
        ceil = ceilings["bf16" if mode.startswith("bf16") else "fp32"] / 1e9
        mem = float("nan") if args.no_memory else child_peak_memory(kind, mode, args)
        print(f"{kind:9} {mode:13} {rate[(kind, mode)]:9.0f} {gflops:8.1f} {100 * gflops / ceil:6.1f}% {mem:8.0f}")
    for mode in modes:
        print(f"ratio choicelm / hf, {mode}: {rate[('choicelm', mode)] / rate[('hf', mode)]:.2f}x")
    best = {k: max(modes, key=lambda m: rate[(k, m)]) for k in kinds}
    print(f"best modes: choicelm {best['choicelm']} {rate[('choicelm', best['choicelm'])]:.0f} tokens/s, "
          f"hf {best['hf']} {rate[('hf', best['hf'])]:.0f} tokens/s -> "
          f"{rate[('choicelm', best['choicelm'])] / rate[('hf', best['hf'])]:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
