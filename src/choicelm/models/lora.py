"""LoRA (Hu et al., 2021) for choicelm's own models, through peft, with a merge back into plain weights.

LoRA freezes a pretrained weight W [out, in] and learns a low-rank update next to it:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A [r, in] (random), B [out, r] (zeros)

Because B starts at zero, a freshly adapted model computes exactly what the base model computes; only A and B
(and any modules you choose to train fully, such as a fresh classification head) get gradients. After training,
`merge_lora` folds every update into its weight, W <- W + (alpha / r) B A, and leaves a plain model again.

    settings = LoraSettings(r=8, alpha=16.0, train_modules=("classifier", "pooler"))
    model = apply_lora(build_model(config.model), settings)   # in place; still a GPT / BERT / Seq2Seq
    ...train with the one training loop (the optimizer takes only parameters that require grad)...
    merge_lora(model)                                         # in place; state_dict keys of a plain model

Which layers are adapted by default (`default_targets`): every attention projection (self-attention c_attn and
c_proj; the seq2seq decoder's cross-attention q_proj, c_kv and c_proj) and every dense MLP linear (c_fc and
c_proj, or gate_proj, up_proj and down_proj). Never the embeddings, the LM head (often the embedding itself,
tied), BERT's MLM head, the pooler or classifier (train them fully with `train_modules`), nor an MoE layer:
its router and predictor are left alone on purpose, and its experts are stacked Parameters [E, D, F], not
nn.Linear modules, so **MoE experts are not adapted**; a GPT with MoE layers gets LoRA on its attention and on
the dense MLPs of its non-MoE blocks. `targets` may name other nn.Linear modules, by full name
("transformer.h.0.attn.c_attn") or by a name suffix matching every such module ("c_attn", "attn.c_proj"); a
Linear whose weight is shared with another module (a tied LM head) cannot be a target, since merging would
change the embedding too.

Checkpoints: the adapted model is the same object, with each target nn.Linear replaced in place by peft's
lora.Linear wrapper, so its state_dict has these keys for a target (here a GPT's first c_attn):

    transformer.h.0.attn.c_attn.base_layer.weight        [out, in]  the frozen pretrained weight
    transformer.h.0.attn.c_attn.base_layer.bias          [out]      (when the layer has a bias)
    transformer.h.0.attn.c_attn.lora_A.default.weight    [r, in]
    transformer.h.0.attn.c_attn.lora_B.default.weight    [out, r]

and every other key unchanged. A LoRA run resumes by rebuilding the same structure, then loading strictly:
`build_model(config)` -> `apply_lora(model, same settings)` -> `model.load_state_dict(state, strict=True)`.
To export or serve a plain model (Hugging Face export, generation without peft), call `merge_lora` first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from ..core.config import Config
from ..core.errors import ChoicelmError
from . import registry
from .layers import MLP, SelfAttention, SwiGLU
from .seq2seq import CrossAttention

ADAPTER = "default"  # peft's adapter name; it appears in the state-dict keys (lora_A.default.weight)

# The nn.Linear children of these modules are adapted by default: attention projections and dense MLP linears.
# MoE layers (router, predictor, stacked experts) and every head are absent on purpose.
ADAPTED_PARENTS = (SelfAttention, CrossAttention, MLP, SwiGLU)


@dataclass
class LoraSettings:
    """LoRA hyperparameters and the modules it touches.

    r:             rank of the update B A (>= 1).
    alpha:         the update is scaled by alpha / r (> 0).
    dropout:       dropout on the adapter's input in training (0 <= dropout < 1); none in eval mode.
    targets:       nn.Linear modules to adapt, by full name or name suffix; empty = default_targets(model).
    train_modules: modules trained fully alongside the adapters (e.g. a fresh "classifier" and "pooler").
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    train_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ChoicelmError(f"lora r={self.r!r}: the rank must be an integer >= 1 (8 or 16 are common)")
        if not self.alpha > 0:
            raise ChoicelmError(f"lora alpha={self.alpha!r}: must be > 0 (the update is scaled by alpha / r; "
                                "2 * r is common)")
        if not 0 <= self.dropout < 1:
            raise ChoicelmError(f"lora dropout={self.dropout!r}: must be in [0, 1)")
        self.targets = _name_tuple("targets", self.targets)
        self.train_modules = _name_tuple("train_modules", self.train_modules)

    @property
    def scaling(self) -> float:
        """The factor alpha / r applied to B A."""
        return self.alpha / self.r


def _name_tuple(field_name: str, names) -> tuple[str, ...]:
    """A tuple of module names from a tuple/list, or from one comma-separated string (as a CLI gives it)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise ChoicelmError(f"lora {field_name}={names!r}: give module names as non-empty strings, "
                            "e.g. ('c_attn', 'c_proj')")
    return names


# ----------------------------------------------------------------------------- which modules


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear in the model (a LoRA-wrapped Linear counts under its own name)."""
    names = []
    for name, module in model.named_modules():
        if _inside_adapter(model, name):
            continue
        if isinstance(module, BaseTunerLayer):
            if isinstance(module.get_base_layer(), nn.Linear):
                names.append(name)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def _inside_adapter(model: nn.Module, name: str) -> bool:
    """True for the modules peft adds or wraps (base_layer, lora_A, ...), which are not the model's own."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), BaseTunerLayer) for i in range(1, len(parts)))


def default_targets(model: nn.Module) -> list[str]:
    """The nn.Linear modules LoRA adapts by default: attention projections (self- and cross-attention) and dense
    MLP linears. Never embeddings, LM/MLM heads, pooler, classifier, MoE routers/predictors; MoE experts are
    stacked Parameters, not Linears, so they are not adapted either."""
    linears = set(linear_module_names(model))
    targets = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, ADAPTED_PARENTS):
            continue
        for child_name, _ in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in linears:
                targets.append(name)
    return targets


def _matching(name: str, candidates: list[str]) -> list[str]:
    """Candidates equal to name or ending in "." + name ("c_attn" matches every layer's c_attn)."""
    return [c for c in candidates if c == name or c.endswith("." + name)]


def _resolve_targets(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    linears = linear_module_names(model)
    if not names:
        targets = default_targets(model)
        if not targets:
            raise ChoicelmError(f"{type(model).__name__} has no attention or MLP linear layers to adapt by default; "
                                f"name LoRA targets among its nn.Linear modules: {', '.join(linears) or '(none)'}")
        return targets
    targets: list[str] = []
    for name in names:
        found = _matching(name, linears)
        if not found:
            raise ChoicelmError(f"LoRA target {name!r} matches no nn.Linear module of this {type(model).__name__}; "
                                f"valid names (full or a suffix such as 'c_attn'): {', '.join(linears)}")
        targets += [t for t in found if t not in targets]
    _check_not_shared(model, targets)
    return targets


def _check_not_shared(model: nn.Module, targets: list[str]) -> None:
    """Refuse a target whose weight another module also uses (a tied LM head): merging would change both."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for target in targets:
        names = owners[id(model.get_submodule(target).weight)]
        if len(names) > 1:
            others = ", ".join(n for n in names if not n.startswith(target + "."))
            raise ChoicelmError(f"LoRA target {target!r} shares its weight with {others} (tied embeddings); "
                                "merging would change both, so drop it from the targets")


def _resolve_train_modules(model: nn.Module, names: tuple[str, ...], targets: list[str]) -> list[str]:
    modules = [n for n, _ in model.named_modules() if n]
    resolved: list[str] = []
    for name in names:
        found = _matching(name, modules)
        if not found:
            raise ChoicelmError(f"train module {name!r} is not a module of this {type(model).__name__}; name one of "
                                f"its modules, e.g. its nn.Linear modules: {', '.join(linear_module_names(model))}")
        resolved += [m for m in found if m not in resolved]
    for module in resolved:
        overlap = [t for t in targets if t == module or t.startswith(module + ".")]
        if overlap:
            raise ChoicelmError(f"train module {module!r} contains LoRA targets ({', '.join(overlap)}): a module is "
                                "either adapted or trained fully; remove it from targets or from train_modules")
    return resolved


# ----------------------------------------------------------------------------- inject, merge, inspect


def apply_lora(model: nn.Module, settings: LoraSettings | None = None) -> nn.Module:
    """Inject LoRA adapters into model in place (peft) and freeze everything except the adapters and
    settings.train_modules. Returns the same model object, so model.config and its methods stay as they were.
    Adapter A matrices come from torch's global RNG (deterministic under torch.manual_seed); B starts at zero."""
    settings = settings or LoraSettings()
    if has_lora(model):
        raise ChoicelmError("this model already has LoRA adapters; merge_lora(model) first, or build a fresh model")
    targets = _resolve_targets(model, settings.targets)
    train_modules = _resolve_train_modules(model, settings.train_modules, targets)
    # A full-match regex of the exact names: peft's list form also matches by suffix, which could reach further.
    pattern = "|".join(re.escape(t) for t in targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=f"^(?:{pattern})$", bias="none", init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    _freeze_all_but(model, train_modules)
    model.train(model.training)  # the new dropout modules follow the model's train/eval mode
    return model


def _freeze_all_but(model: nn.Module, train_modules: list[str]) -> None:
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    for name in train_modules:
        model.get_submodule(name).requires_grad_(True)


def _adapter_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + alpha/r * B A, peft's merge) and put the original nn.Linear back,
    in place: the module tree and state_dict keys are a plain model's again, and every parameter requires grad
    as in a freshly built model. A model without adapters is returned unchanged."""
    layers = _adapter_layers(model)
    if not layers:
        return model
    for name, layer in layers:
        try:
            layer.merge(safe_merge=True)  # checks the merged weight for NaN/inf before writing it
        except ValueError as error:
            raise ChoicelmError(f"merging the LoRA adapter of {name} failed ({error}); the adapter weights are "
                                "not finite, so resume from an earlier checkpoint") from error
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.get_base_layer())
    vars(model).pop("peft_config", None)  # peft's bookkeeping attribute, meaningless without adapters
    model.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    """True if the model holds LoRA adapters (not merged yet)."""
    return bool(_adapter_layers(model))


def lora_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied tensors count once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_settings(cfg: Config):
    """The run's LoRA settings: the config's, plus a classifier's head, which trains in full."""
    from ..models.lora import LoraSettings

    f = cfg.finetune
    heads = registry.get(cfg.model.kind).classifier_modules if cfg.model.n_labels else ()
    targets = tuple(t.strip() for t in f.lora_targets.split(",") if t.strip())
    return LoraSettings(r=f.lora_r, alpha=f.lora_alpha, dropout=f.lora_dropout, targets=targets, train_modules=heads)
