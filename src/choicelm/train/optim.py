"""The optimizers (AdamW; Muon for the hidden matrices with AdamW for the rest) and the learning-rate schedules.

    optimizer = build_optimizer(model, cfg.optim, device.type)   # AdamW, or MuonAdamW (optim.name=muon)
    set_lr(optimizer, lr_at(step, cfg.optim, max_steps))          # every group: lr x its lr_scale
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

Muon (Keller Jordan, 2024) orthogonalises each matrix's momentum with a Newton-Schulz iteration; it is meant for
the hidden matrices only (modded-nanogpt, nanochat): embeddings, the LM head, norms and biases stay on AdamW.
Here the Muon matrices are the weights of the nn.Linear layers inside the model's stacks of blocks (every
nn.ModuleList: GPT transformer.h, BERT h, the seq2seq encoder and decoder): attention and dense MLP projections.
MoE experts are hidden matrices too, stored stacked [E, D, F]: StackedMuon moves each expert's matrix exactly as
torch.optim.Muon moves a 2-D parameter (torch.optim.Muon takes 2-D parameters only), so an MoE model and a dense
one get the same optimizer for the same kind of weight. AdamW keeps: MoE routers and causal predictors (they
score experts, not transform the hidden state), LoRA adapters (low-rank factors, tuned for AdamW), and every
parameter outside the blocks. The fused q|k|v projection is one matrix to Muon (Keller's
recipe orthogonalises q, k and v separately; torch.optim.Muon cannot split a parameter).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core.config import OptimConfig
from ..core.errors import ChoicelmError
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


def stacked_expert_names(model: nn.Module) -> list[str]:
    """Names of the trainable stacked expert weights [E, D, F] of the model's MoE layers (routed and shared)."""
    names = []
    for layer_name, layer in model.named_modules():
        if isinstance(layer, MoE):
            names += [f"{layer_name}.{n}" for n, p in layer.named_parameters()
                      if p.requires_grad and p.dim() == 3 and ("experts." in n or "shared." in n)]
    return names


class StackedMuon(torch.optim.Optimizer):
    """Muon for stacks of matrices [E, A, B] (MoE experts): every matrix of the stack takes exactly the step
    torch.optim.Muon takes for a 2-D parameter of shape [A, B] (Nesterov momentum, torch's own Newton-Schulz
    orthogonalisation, decoupled weight decay, the match_rms_adamw lr adjustment), with its own momentum slice."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float):
        from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS  # torch.optim.Muon's

        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": True,
                                  "adjust_lr_fn": "match_rms_adamw", "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                                  "ns_steps": DEFAULT_NS_STEPS, "eps": EPS})

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz  # the very functions Muon runs

        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - g["momentum"])
                update = p.grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf
                lr = _adjust_lr(g["lr"], g["adjust_lr_fn"], p.shape[1:])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                for e in range(p.shape[0]):
                    p[e].add_(_zeropower_via_newtonschulz(update[e], g["ns_coefficients"], g["ns_steps"], g["eps"]),
                              alpha=-lr)


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
    """torch.optim.Muon on the hidden matrices (StackedMuon on stacked MoE experts, if any) and torch.optim.AdamW on
    the rest, used as one optimizer by the training loop: step, zero_grad, param_groups (the Muon groups carry an
    "lr_scale" that set_lr multiplies the schedule's lr by) and state_dict / load_state_dict (every part's state,
    for an exact resume)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, muon_lr_scale: float,
                 experts: StackedMuon | None = None):
        self.muon, self.adamw, self.experts, self.muon_lr_scale = muon, adamw, experts, muon_lr_scale
        self._set_scales()

    @property
    def _parts(self) -> dict:
        parts = {"muon": self.muon, "adamw": self.adamw}
        return parts if self.experts is None else {**parts, "experts": self.experts}

    def _set_scales(self) -> None:  # from the config, never from a checkpoint: a resume may change optim.muon_lr
        for opt in (self.muon, self.experts):
            for group in opt.param_groups if opt is not None else ():
                group["lr_scale"] = self.muon_lr_scale

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self._parts.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self._parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self._parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self._parts):
            raise ChoicelmError("the saved optimizer state is not Muon + AdamW (optim.name=muon) for this model; "
                                "resume with the optim.name the checkpoint was trained with")
        for name, opt in self._parts.items():
            opt.load_state_dict(state[name])
        self._set_scales()


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW | MuonAdamW:
    """optim.name=adamw: AdamW on every trainable parameter, decaying matrices only. optim.name=muon: MuonAdamW,
    Muon (lr optim.muon_lr, scaled per matrix to AdamW's update RMS) on muon_parameter_names(model) and AdamW on
    the rest. Weight decay (optim.weight_decay) applies to every matrix, biases and norm gains excepted."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return _adamw(_decay_groups([p for _, p in named], cfg.weight_decay), cfg, device_type)
    muon_names, expert_names = set(muon_parameter_names(model)), set(stacked_expert_names(model))
    if not muon_names:
        raise ChoicelmError(f"optim.name=muon found no hidden matrices to train in this {type(model).__name__}: Muon "
                            "takes the trainable linear layers inside transformer blocks (frozen under LoRA, whose "
                            "adapters stay on AdamW); use optim.name=adamw")
    muon = torch.optim.Muon([p for n, p in named if n in muon_names], lr=cfg.muon_peak_lr,
                            weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    experts = StackedMuon([p for n, p in named if n in expert_names], lr=cfg.muon_peak_lr,
                          weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum) if expert_names else None
    rest = [p for n, p in named if n not in muon_names | expert_names]
    adamw = _adamw(_decay_groups(rest, cfg.weight_decay), cfg, device_type)
    return MuonAdamW(muon, adamw, cfg.muon_peak_lr / cfg.lr, experts)


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
