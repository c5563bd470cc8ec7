"""The optimizers (AdamW; Muon for the hidden matrices with AdamW for the rest) and the learning-rate schedules.

    optimizer = build_optimizer(model, cfg.optim, device.type)   # AdamW, or MuonAdamW (optim.name=muon)
    set_lr(optimizer, lr_at(step, cfg.optim, max_steps))          # every group: lr x its lr_scale
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

Muon (Keller Jordan, 2024) orthogonalises each matrix's momentum with a Newton-Schulz iteration; it is meant for
the hidden matrices only (modded-nanogpt, nanochat): embeddings, the LM head, norms and biases stay on AdamW.
Here the Muon matrices are the weights of the nn.Linear layers inside the model's stacks of blocks (every
nn.ModuleList: GPT transformer.h, BERT h, the seq2seq encoder and decoder): attention and dense MLP projections.
AdamW keeps: MoE routers and causal predictors (they score experts, not transform the hidden state), the stacked
3-D expert weights (torch.optim.Muon takes 2-D parameters only), LoRA adapters (low-rank factors, tuned for
AdamW), and every parameter outside the blocks. The fused q|k|v projection is one matrix to Muon (Keller's
recipe orthogonalises q, k and v separately; torch.optim.Muon cannot split a parameter).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import OptimConfig
from ..errors import ChoicelmError
from ..models.moe import MoE


def _decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay every parameter with 2+ dims (matmul weights, embeddings); never biases or norm gains."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _adamw(groups: list[dict], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    # The fused kernel is one pass over all parameters instead of a dozen elementwise ops each;
    # it exists on CPU and CUDA since torch 2.4 and gives the same update to fp32 rounding.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device_type in ("cpu", "cuda"))


def muon_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters Muon trains (see the module docstring): the weights of the nn.Linear layers inside
    the model's nn.ModuleList block stacks, except MoE routers/predictors and LoRA adapters; trainable ones only."""
    skip = {id(m) for moe in model.modules() if isinstance(moe, MoE) for m in moe.modules()}
    names = []
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        for name, module in stack.named_modules(prefix=stack_name):
            if (isinstance(module, nn.Linear) and id(module) not in skip and "lora_" not in name
                    and module.weight.requires_grad):
                names.append(f"{name}.weight")
    return list(dict.fromkeys(names))  # a nested ModuleList visits its layers twice


class MuonAdamW:
    """torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest, used as one optimizer by the
    training loop: step, zero_grad, param_groups (Muon's first, each with an "lr_scale" that set_lr multiplies
    the schedule's lr by) and state_dict / load_state_dict (both states, for an exact resume)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, muon_lr_scale: float):
        self.muon, self.adamw, self.muon_lr_scale = muon, adamw, muon_lr_scale
        self._set_scales()

    def _set_scales(self) -> None:  # from the config, never from a checkpoint: a resume may change optim.muon_lr
        for group in self.muon.param_groups:
            group["lr_scale"] = self.muon_lr_scale

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ChoicelmError("the saved optimizer state is not Muon + AdamW (optim.name=muon); resume with the "
                                "optim.name the checkpoint was trained with")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        self._set_scales()


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW | MuonAdamW:
    """optim.name=adamw: AdamW on every trainable parameter, decaying matrices only. optim.name=muon: MuonAdamW,
    Muon (lr optim.muon_lr, scaled per matrix to AdamW's update RMS) on muon_parameter_names(model) and AdamW on
    the rest. Weight decay (optim.weight_decay) applies to every matrix, biases and norm gains excepted."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return _adamw(_decay_groups([p for _, p in named], cfg.weight_decay), cfg, device_type)
    muon_names = set(muon_parameter_names(model))
    if not muon_names:
        raise ChoicelmError(f"optim.name=muon found no hidden matrices to train in this {type(model).__name__}: Muon "
                            "takes the trainable linear layers inside transformer blocks (frozen under LoRA, whose "
                            "adapters stay on AdamW); use optim.name=adamw")
    muon = torch.optim.Muon([p for n, p in named if n in muon_names], lr=cfg.muon_peak_lr,
                            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = _adamw(_decay_groups([p for n, p in named if n not in muon_names], cfg.weight_decay), cfg, device_type)
    return MuonAdamW(muon, adamw, cfg.muon_peak_lr / cfg.lr)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, wsd or constant."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * max_steps)))
        decay_start = max_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak - (peak - floor) * progress
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer | MuonAdamW, lr: float) -> None:
    """Set every group's learning rate to `lr` (the schedule's, for AdamW) times the group's lr_scale (Muon's
    groups: optim.muon_lr / optim.lr), so the schedule scales both optimizers alike."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
