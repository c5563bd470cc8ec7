"""The arms of a routing study: a training recipe (moe.* overrides on the dense base config) and the rule the arm
is evaluated and decoded with. Adding an arm is one line. Arms with the same training overrides share one run.
Light on purpose (no torch): the CLI lists the arms in its --help."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ChoicelmError


@dataclass(frozen=True)
class Arm:
    """train: moe.* overrides of the training recipe ("h" and "h/2" stand for the base MLP width and half of it).
    routing: the rule the arm is evaluated and decoded with (None: dense). causal_train: the training rule lets no
    later token move an earlier output. causal_eval: the arm's number comes from a causal rule."""

    train: dict
    routing: str | None
    causal_train: bool
    causal_eval: bool
    what: str


_MOE = {"experts": 8, "every": 2, "shared_expert": False, "max_experts_per_token": 0}
_TC = {**_MOE, "router": "token_choice", "renormalize": True, "balance_loss_weight": 0.01, "z_loss_weight": 0.001}
_EC = {**_MOE, "router": "expert_choice_causal", "expert_width": "h/2", "capacity": 2.0, "group": "sequence",
       "causal_mode": "threshold", "train_causal": False, "z_loss_weight": 0.0}

ARMS: dict[str, Arm] = {
    "dense": Arm({"experts": 0}, None, True, True, "dense MLP of width h"),
    "tc1": Arm({**_TC, "top_k": 1, "expert_width": "h", "capacity": 1.25, "dropless": False}, "dropless", False, True,
               "token choice top-1 (Switch): capacity 1.25 in training, dropless at evaluation"),
    "tc2": Arm({**_TC, "top_k": 2, "expert_width": "h/2", "dropless": True}, "dropless", True, True,
               "token choice top-2, dropless (Mixtral)"),
    "ec": Arm(_EC, "topk", False, False, "expert choice c=2, evaluated teacher-forced with top-k over the sequence"),
    "ec_threshold": Arm(_EC, "threshold", False, True, "the ec run (top-k teacher) evaluated with its thresholds"),
    "ec_predictor": Arm(_EC, "predictor", False, True, "the ec run (top-k teacher) evaluated with its predictor"),
    "et": Arm({**_EC, "train_causal": True}, "threshold", True, True,
              "expert threshold: routes by the running thresholds in training and inference"),
    # Fine-grained variants: twice the experts at half the width, twice the experts per token (same active FLOPs).
    "tc4_16": Arm({**_TC, "experts": 16, "top_k": 4, "expert_width": "h/4", "dropless": True}, "dropless", True, True,
                  "token choice top-4 of 16 experts of width h/4, dropless"),
    "ec_threshold_16": Arm({**_EC, "experts": 16, "expert_width": "h/4", "capacity": 4.0}, "threshold", False, True,
                           "expert choice c=4 over 16 experts of width h/4 (top-k teacher), evaluated with thresholds"),
    "et_16": Arm({**_EC, "experts": 16, "expert_width": "h/4", "capacity": 4.0, "train_causal": True}, "threshold",
                 True, True, "expert threshold over 16 experts of width h/4, c=4"),
}


def moe_overrides(arm: str, h: int) -> dict:
    """The arm's moe.* overrides with the widths "h" and "h/N" resolved against the base MLP width h."""
    out = dict(ARMS[arm].train)
    for key, value in out.items():
        if isinstance(value, str) and (value == "h" or value.startswith("h/")):
            parts = 1 if value == "h" else int(value[2:])
            if h % parts:
                raise ChoicelmError(f"the base MLP width h={h} is not divisible by {parts}, so an expert of width "
                                    f"{value} cannot match it; set --model.mlp_hidden to a multiple of {parts}")
            out[key] = h // parts
    return out


def recipe_of(arm: str) -> str:
    """The training run an arm is read from: the first arm (in ARMS order) with the same training overrides."""
    train = ARMS[arm].train
    return next(name for name, a in ARMS.items() if a.train == train)


def parse_arms(arms: str | list[str]) -> list[str]:
    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else [str(a).strip() for a in arms]
    names = [a for a in names if a]
    if not names:
        raise ChoicelmError(f"no arms given; choose from {', '.join(ARMS)}")
    for name in names:
        if name not in ARMS:
            raise ChoicelmError(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise ChoicelmError(f"arm listed twice in {','.join(names)}")
    return names
