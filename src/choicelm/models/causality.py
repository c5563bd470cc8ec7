"""How much a decoder reads the future: change the tokens after a position and see what moves before it.

    measure_leak(model, ids_BT, split=16, train_mode=True) -> {"max_logprob_diff": nats, "flipped_routes": n, ...}

A causal model's outputs at positions < split depend only on those positions, so replacing the tokens at
positions >= split with random ones must leave them unchanged: every past routing decision identical, past
log-probabilities equal up to float rounding (an expert batch of another size rounds differently, ~1e-7 in
fp32). A leak is large: plain top-k expert choice moves past log-probabilities by nats and flips routes.

Training mode matters: a routing rule may be causal in evaluation and leak while training (top-k as the
teacher). Each forward starts from the same module state (running thresholds restored) and the same RNG
state (same dropout masks), so the two forwards differ only in the future tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def _forward(model: nn.Module, ids_BT: torch.Tensor, state: dict, seed: int):
    model.load_state_dict(state)  # undo what the previous training-mode forward updated (thresholds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model(ids_BT)


def _routing(out) -> torch.Tensor | None:
    """Every MoE layer's decisions, bool [layers, B, T, E], or None for a dense model."""
    layers = (getattr(out, "stats", None) or {}).get("moe", {})
    if not layers:
        return None
    return torch.stack([s["assignment"] for s in layers.values()])


@torch.no_grad()
def measure_leak(model: nn.Module, ids_BT: torch.Tensor, split: int, train_mode: bool = False, trials: int = 4,
                 seed: int = 0) -> dict:
    """Replace ids_BT[:, split:] with random tokens `trials` times and compare the outputs at positions < split.
    Returns max_logprob_diff and mean_logprob_diff (nats, over the past positions' next-token log-probabilities),
    flipped_routes (past token x expert decisions that changed, summed over layers and trials), past_decisions
    (how many there were) and routing (the rule measured; None for a dense model). The model's mode, state and
    the global RNG are left as they were."""
    T = ids_BT.shape[1]
    if not 0 < split < T:
        raise ValueError(f"split must be inside the sequence (1..{T - 1}), got {split}")
    was_training = model.training
    state = copy.deepcopy(model.state_dict())
    record_before = getattr(model, "record_routing", None)
    if record_before is not None:
        model.record_routing = True
    model.train(train_mode)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    max_diff, diff_sum, diff_count, flipped, decisions = 0.0, 0.0, 0, 0, 0
    routing = None
    try:
        out_a = _forward(model, ids_BT, state, seed)
        logp_a = out_a.logits[:, :split].float().log_softmax(-1)
        route_a = _routing(out_a)
        routing = (out_a.stats or {}).get("routing") if route_a is not None else None
        for _ in range(trials):
            ids_b = ids_BT.clone()
            ids_b[:, split:] = torch.randint(0, vocab, (ids_BT.shape[0], T - split), generator=gen).to(ids_BT.device)
            out_b = _forward(model, ids_b, state, seed)
            diff = (out_b.logits[:, :split].float().log_softmax(-1) - logp_a).abs()
            max_diff = max(max_diff, float(diff.max()))
            diff_sum += float(diff.sum())
            diff_count += diff.numel()
            if route_a is not None:
                past_a, past_b = route_a[:, :, :split], _routing(out_b)[:, :, :split]
                flipped += int((past_a != past_b).sum())
                decisions += past_a.numel()
    finally:
        model.load_state_dict(state)
        model.train(was_training)
        if record_before is not None:
            model.record_routing = record_before
    return {"max_logprob_diff": max_diff, "mean_logprob_diff": diff_sum / max(diff_count, 1),
            "flipped_routes": flipped, "past_decisions": decisions, "routing": routing, "trials": trials,
            "mode": "train" if train_mode else "eval"}
