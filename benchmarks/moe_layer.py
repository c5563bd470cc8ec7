"""MoE layer speed: forward + backward of one layer, against a dense SwiGLU with the same active FLOPs.

    taskset -c 1 python benchmarks/moe_layer.py --threads 1          # d=384, F=1536, 8 experts, 8 x 256 tokens
    python benchmarks/moe_layer.py --modes fp32,bf16 --rounds 7

Layers (all SwiGLU experts, no biases):
    dense         choicelm SwiGLU MLP of width 2 x F: the active FLOPs of c = 2 / top-2 routing
    ec            choicelm expert choice, top-k per sequence (the training rule), c = 2
    ec-batch      the same, top-k over the whole batch (group=batch)
    ec-threshold  choicelm causal expert choice as evaluated (threshold rule; thresholds from a warm-up)
    tc2           choicelm token choice top-2, dropless (= Mixtral), balancing + z-loss included
    tc2-cap1.25   choicelm token choice top-2 with capacity factor 1.25 (drops)
    hf-eager      transformers' MixtralSparseMoeBlock, top-2, its eager experts loop
    hf-grouped_mm the same with config._experts_implementation = "grouped_mm" (when transformers has it)

Every (layer, precision) pair is timed in one process, interleaved round by round so machine noise hits
all alike; each figure is the median over rounds of the mean over --steps steps. Printed as ms and as
time / dense of the same precision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from choicelm.core.config import ModelConfig, MoEConfig
from choicelm.models.layers import SwiGLU
from choicelm.models.moe import MoE
from choicelm.core.runtime import keep_freed_memory


def build_layers(args) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (module, rule for choicelm MoE layers)."""
    mc = ModelConfig(n_embd=args.width, n_head=1, n_layer=6, mlp="swiglu", bias=False,  # (no attention here)
                     mlp_hidden=2 * args.expert_width, vocab_size=64, block_size=args.seq)
    torch.manual_seed(0)
    layers: dict = {"dense": (SwiGLU(mc), None)}

    def moe(**kw):
        torch.manual_seed(0)
        cfg = MoEConfig(experts=args.experts, expert_width=args.expert_width, capacity=2.0, **kw)
        return MoE(mc, cfg)

    layers["ec"] = (moe(router="expert_choice_causal", z_loss_weight=0.0), "topk")
    layers["ec-batch"] = (moe(router="expert_choice_causal", group="batch", z_loss_weight=0.0), "topk")
    ec_thr = moe(router="expert_choice_causal", z_loss_weight=0.0)
    ec_thr(torch.randn(args.batch, args.seq, args.width))  # train mode: sets the thresholds to the top-k cut-offs
    layers["ec-threshold"] = (ec_thr, "threshold")
    layers["tc2"] = (moe(router="token_choice", top_k=2, dropless=True), "dropless")
    tc_cap = moe(router="token_choice", top_k=2)
    tc_cap.cfg.capacity = 1.25
    layers["tc2-cap1.25"] = (tc_cap, "capacity")

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        # (not batched_mm: it gathers a copy of the expert weights per token, ~19 GB here)
        impls += [name for name in ("grouped_mm",) if name in ALL_EXPERTS_FUNCTIONS]
    except ImportError:
        pass
    for impl in impls:
        cfg = MixtralConfig(hidden_size=args.width, intermediate_size=args.expert_width,
                            num_local_experts=args.experts, num_experts_per_tok=2, router_jitter_noise=0.0)
        cfg._experts_implementation = impl
        torch.manual_seed(0)
        hf = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(std=0.02)
        layers[f"hf-{impl}"] = (hf, None)
    return layers


def make_step(module: torch.nn.Module, rule: str | None, bf16: bool, x: torch.Tensor, grad: torch.Tensor):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if isinstance(module, MoE):
                out = module(x, rule=rule)
                y, aux = out.y_BTD, out.aux_loss
            else:
                y = module(x)
                y, aux = (y[0] if isinstance(y, tuple) else y), None
        loss = (y.float() * grad).sum()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        module.zero_grad(set_to_none=True)
        x.grad = None
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--expert-width", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--modes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", default="", help="comma list of layer names (default: all)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (one per core)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    layers = build_layers(args)
    if args.layers:
        layers = {k: v for k, v in layers.items() if k in args.layers.split(",") or k == "dense"}
    for module, _ in layers.values():
        module.train()
    modes = args.modes.split(",")
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.seq, args.width, requires_grad=True)
    grad = torch.randn(args.batch, args.seq, args.width)
    steps = {(name, mode): make_step(m, rule, mode == "bf16", x, grad) for name, (m, rule) in layers.items()
             for mode in modes}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[key].append((time.perf_counter() - t0) / args.steps)
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"MoE layer forward+backward: d={args.width}, expert width {args.expert_width}, {args.experts} experts, "
          f"{args.batch}x{args.seq} tokens, threads={torch.get_num_threads()}, median of {args.rounds} rounds")
    print(f"{'layer':<14}" + "".join(f"{m + ' ms':>12}{m + ' /dense':>14}" for m in modes))
    for name in layers:
        cells = "".join(f"{1e3 * med[(name, m)]:>12.1f}{med[(name, m)] / med[('dense', m)]:>14.2f}" for m in modes)
        print(f"{name:<14}{cells}")
    for m in modes:
        if ("hf-eager", m) in med:
            hf = med[("hf-eager", m)]
            ratios = [f"hf-eager / {name} = {hf / med[(name, m)]:.2f}x" for name in ("ec", "ec-threshold", "tc2")
                      if (name, m) in med]
            print(f"{m}: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
