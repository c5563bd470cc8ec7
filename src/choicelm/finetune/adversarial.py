"""Adversarial training on the input embeddings: FGM and PGD as a wrapper around any objective.

The idea (Miyato et al. 2017, "Adversarial training methods for semi-supervised text classification";
Madry et al. 2018 for PGD; FreeLB, Zhu et al. 2020, for PGD on word embeddings): token ids are discrete, so
the perturbation goes on the *output of the token-embedding lookup*. For each training batch

    1. clean pass: loss L(e), where e_BTD is what the embedding returned (caught by a forward hook);
    2. the worst nearby embeddings, to first order: g = dL/de, and per sequence (row b)
           FGM  delta_b = epsilon * g_b / ||g_b||                       (one step, Miyato)
           PGD  delta_b <- proj_epsilon(delta_b + step_size * g_b / ||g_b||), `steps` times from 0, g re-taken
                at e + delta each time; proj_epsilon scales a row back onto the L2 ball of radius epsilon
                (L2 PGD, Madry; with steps=1 and step_size >= epsilon it is FGM);
    3. perturbed pass: L(e + delta), delta detached (a constant, as in the papers);
    4. return (L(e) + L(e + delta)) / 2, so the loop's backward() accumulates the mean of both gradients.

The clean pass is differentiated once, by torch.autograd.grad for dL/de and the parameters together (some
losses, like the GPT's chunked linear_cross_entropy, can be differentiated only once); nothing touches .grad,
and the parameter part reaches the parameters in the loop's own backward(), scaled like the rest of the loss,
so gradient accumulation over micro-batches and DDP's gradient hooks work as usual. The clean graph is freed
before the perturbed pass, so peak activation memory stays at one pass (plus one copy of the clean parameter
gradients). The norms are computed in fp32, also under bf16 autocast. PGD's default step_size is
1.25 * epsilon / steps: from delta = 0, `steps` steps can cover 1.25 epsilon, enough to reach the ball's
surface with room to turn (Madry uses 2.5 epsilon / steps from a random start). Cost: FGM is 2 forward and
2 backward passes per batch; PGD is steps + 1 of each.

Usage (the loop's contract: objective(model, batch) -> (summed loss, valid count, output)):

    from choicelm.finetune.adversarial import AdversarialObjective
    from choicelm.train.objectives import causal_lm
    objective = AdversarialObjective(causal_lm, "fgm", epsilon=0.5)
    loss, n_valid, out = objective(model, batch)      # train mode: (clean + adversarial) / 2
    (loss / n_valid).backward()

What is perturbed (input_embedding): GPT transformer.wte, BERT embeddings.wte, LSTM embed, Seq2Seq the
*source* embedding (encoder.wte, or the shared embedding when source and target share one). Only the first
lookup of each forward pass is perturbed: with a shared Seq2Seq embedding the encoder's lookup comes first,
and the decoder's (target) lookup is left alone. Positional and token-type embeddings are not perturbed.

Notes:
- Every position is perturbed, padding included: which batch tensor is a padding mask differs per objective,
  so the wrapper cannot know. Padding is never attended to in these models, so its share of delta is wasted
  (the real tokens get a little less than epsilon) but harmless.
- epsilon is an L2 radius over one sequence's whole embedding block (T x D numbers), so it does not grow
  with length: longer sequences get smaller per-token changes (Miyato's convention). For scale: N(0, 0.02)
  embeddings have norm about 0.02 * sqrt(T * D) per sequence (9 for T=256, D=768).
- In eval mode (model.training False) or without gradients, the wrapper is exactly the wrapped objective.
- The returned output is the clean pass's, so MoE auxiliary losses and routing statistics are the clean ones;
  only the clean pass updates expert-choice routing thresholds (the perturbed passes see the same batch).
- The wrapped objective runs several times per batch, so an objective carrying state across calls (the LSTM's
  TruncatedBPTT) is refused; MLM's `prepare` (masking before the objective) is passed through.
- Wrapped models (DDP's .module, torch.compile's ._orig_mod) are unwrapped to find the embedding. Under
  torch.compile the hook runs eagerly: one graph break right after the lookup, no recompilation per call.
- The clean output's loss has no graph left (it was differentiated already); only its aux_loss, if any,
  keeps its graph for the loop.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..core.errors import ChoicelmError
from ..models import registry
from ..models.registry import unwrap
from ..models.moe import thresholds_frozen

METHODS = ("fgm", "pgd")
PGD_STEP_FACTOR = 1.25  # default step_size = PGD_STEP_FACTOR * epsilon / steps
_TINY = 1e-12  # a zero gradient gives a zero perturbation, not NaN


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token-embedding module whose output adversarial training perturbs (the source side of a Seq2Seq)."""
    inner = unwrap(model)
    spec = registry.find(inner)
    if spec is not None and spec.embedding is not None:
        return spec.embedding(inner)
    families = [s.model_class.__name__ for s in registry.SPECS.values() if s.embedding is not None]
    raise ChoicelmError(f"adversarial training does not know where {type(inner).__name__} embeds its tokens; "
                        f"use a choicelm {', '.join(families[:-1])} or {families[-1]} model")


# ----------------------------------------------------------------------------- perturbation geometry

def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norm of each row (dim 0) over all other dims, shaped to broadcast against x: [B, 1, ..., 1]."""
    return x.float().flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def ascent_step(grad: torch.Tensor, size: float) -> torch.Tensor:
    """size * grad / ||grad|| per sequence, in fp32: the first-order steepest ascent step of L2 length `size`."""
    return size * grad.float() / _row_norms(grad).clamp_min(_TINY)


def project_to_ball(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each row of delta scaled back onto the L2 ball of radius epsilon if it lies outside."""
    return delta * (epsilon / _row_norms(delta).clamp_min(epsilon))


# ----------------------------------------------------------------------------- the embedding hook

class _FirstLookup:
    """Forward hook: adds `delta` to the embedding's first output in a forward pass and keeps that output.

    Later lookups in the same pass (a Seq2Seq decoder sharing the source embedding) are left alone.
    With need_grad, a frozen embedding's output becomes a leaf that requires grad, so dL/de exists.
    """

    def __init__(self, delta: torch.Tensor | None, need_grad: bool):
        self.delta, self.need_grad = delta, need_grad
        self.output: torch.Tensor | None = None

    # Under torch.compile the hook runs eagerly (a graph break right after the lookup): traced into the graph,
    # the kept output would be a detached graph output, and dL/de would silently come back as None.
    @torch.compiler.disable
    def __call__(self, module, inputs, output):
        if self.output is not None:
            return None
        if self.need_grad and not output.requires_grad:
            output = output.detach().requires_grad_(True)
        if self.delta is not None:
            output = output + self.delta.to(output.dtype)
        self.output = output
        return output


@contextlib.contextmanager
def _hooked(embedding: nn.Embedding, delta: torch.Tensor | None, need_grad: bool):
    hook = _FirstLookup(delta, need_grad)
    handle = embedding.register_forward_hook(hook)
    try:
        yield hook
    finally:  # an objective that raises must not leave a perturbation behind
        handle.remove()


# ----------------------------------------------------------------------------- the objective

class AdversarialObjective:
    """objective(model, batch) with adversarial training on the input embeddings (see the module docstring).

    objective: the wrapped objective, (model, batch) -> (summed loss, valid count, output).
    method:    "fgm" (one normalized gradient step of length epsilon) or "pgd" (projected gradient ascent).
    epsilon:   L2 radius of each sequence's perturbation (over its T x D embedding block), > 0.
    steps:     PGD ascent steps (>= 1); FGM takes exactly one.
    step_size: PGD step length; None = 1.25 * epsilon / steps.
    """

    def __init__(self, objective, method: str, epsilon: float, steps: int = 1, step_size: float | None = None):
        if not callable(objective):
            raise ChoicelmError(f"the objective to wrap must be callable as objective(model, batch); "
                                f"got {type(objective).__name__}")
        if hasattr(objective, "state_dict"):
            raise ChoicelmError(f"{type(objective).__name__} carries state from one call to the next, but adversarial "
                                "training calls the objective several times per batch; wrap a stateless objective "
                                "(for an LSTM, causal_lm instead of TruncatedBPTT)")
        if method not in METHODS:
            raise ChoicelmError(f"adversarial method {method!r} is unknown; choose one of {', '.join(METHODS)}")
        if not _positive_number(epsilon):
            raise ChoicelmError(f"adversarial epsilon={epsilon!r} must be a finite number > 0 (the L2 radius of "
                                "each sequence's embedding perturbation)")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ChoicelmError(f"adversarial steps={steps!r} must be an integer >= 1")
        if method == "fgm" and (steps != 1 or step_size is not None):
            raise ChoicelmError("FGM takes one step of length epsilon; steps and step_size apply to method='pgd'")
        if step_size is not None and not _positive_number(step_size):
            raise ChoicelmError(f"adversarial step_size={step_size!r} must be a finite number > 0, or None for "
                                f"{PGD_STEP_FACTOR} * epsilon / steps")
        self.objective, self.method, self.epsilon, self.steps = objective, method, float(epsilon), steps
        self.step_size = float(step_size) if step_size is not None else PGD_STEP_FACTOR * self.epsilon / steps
        self.last_delta: torch.Tensor | None = None  # the perturbation of the last training batch, for inspection

    def __getattr__(self, name: str):
        # the loop masks MLM batches through objective.prepare before calling the objective: pass it through
        wrapped = self.__dict__.get("objective")
        if name == "prepare" and hasattr(wrapped, "prepare"):
            return wrapped.prepare
        raise AttributeError(name)

    def __repr__(self) -> str:
        pgd = f", steps={self.steps}, step_size={self.step_size:g}" if self.method == "pgd" else ""
        return f"AdversarialObjective({self.objective!r}, {self.method!r}, epsilon={self.epsilon:g}{pgd})"

    def __call__(self, model: nn.Module, batch):
        if not unwrap(model).training or not torch.is_grad_enabled():
            return self.objective(model, batch)
        embedding = input_embedding(model)
        params = [p for p in unwrap(model).parameters() if p.requires_grad]
        clean_loss, n_valid, clean_out, embedded = self._pass(model, batch, embedding, None, need_grad=True)
        # One backward through the clean graph yields dL/de and the parameter gradients together: some losses
        # (the GPT's chunked linear_cross_entropy) can be differentiated only once, and the graph's memory is
        # freed before the next pass (kept only while an MoE aux loss in clean_out still needs it).
        grad, *param_grads = _gradients(clean_loss, [embedded, *params], keep_graph=_aux_loss_needs_graph(clean_out))
        delta = self._perturbation(model, batch, embedding, grad)
        self.last_delta = delta
        adversarial_loss = self._pass(model, batch, embedding, delta, need_grad=False)[0]
        clean_part = _PrecomputedGradients.apply(clean_loss.detach(), param_grads, *params)
        return (clean_part + adversarial_loss) / 2, n_valid, clean_out

    def _pass(self, model, batch, embedding, delta, need_grad: bool):
        """(loss, n_valid, output, embedding output) of the wrapped objective with delta added to the lookup.
        Only the clean pass (delta None) updates MoE routing thresholds."""
        frozen = thresholds_frozen(model) if delta is not None else contextlib.nullcontext()
        with _hooked(embedding, delta, need_grad) as hook, frozen:
            loss, n_valid, out = self.objective(model, batch)
        if hook.output is None:
            raise ChoicelmError(f"the objective never ran the model's input embedding ({type(embedding).__name__} "
                                "found by input_embedding); adversarial training needs an objective that calls the "
                                "model on token ids")
        return loss, n_valid, out, hook.output

    # --- the perturbation -------------------------------------------------------------------------
    def _perturbation(self, model, batch, embedding, clean_grad: torch.Tensor) -> torch.Tensor:
        """The detached fp32 delta: one FGM step, or `steps` PGD steps (the first reuses the clean gradient)."""
        if self.method == "fgm":
            return ascent_step(clean_grad, self.epsilon).detach()
        delta = torch.zeros_like(clean_grad, dtype=torch.float32)
        grad = clean_grad
        for step in range(self.steps):
            if step:  # the gradient at the current delta; only dL/de, the graph is freed at once
                loss, _, _, embedded = self._pass(model, batch, embedding, delta, need_grad=True)
                (grad,) = _gradients(loss, [embedded], keep_graph=False)
            delta = project_to_ball(delta + ascent_step(grad, self.step_size), self.epsilon).detach()
        return delta


class _PrecomputedGradients(torch.autograd.Function):
    """y = value; backward hands each parameter grad_y * its precomputed gradient.

    Carries the clean pass's parameter gradients (already taken together with dL/de) into the loop's
    backward(), scaled by whatever the loop multiplies the loss with, and through DDP's gradient hooks.
    """

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_y):
        grads, ctx.grads = ctx.grads, None  # runs once; drop the copies as soon as they are handed on
        return (None, None, *(None if g is None else (g * grad_y).to(g.dtype) for g in grads))


def _gradients(loss: torch.Tensor, inputs: list[torch.Tensor], keep_graph: bool) -> list[torch.Tensor | None]:
    """d loss / d inputs without touching any .grad; dL/de (inputs[0]) is zeros where the loss ignores it."""
    grads = [None] * len(inputs)
    if loss.requires_grad:
        grads = list(torch.autograd.grad(loss, inputs, retain_graph=keep_graph, allow_unused=True))
    if grads[0] is None:  # e.g. no valid target in the batch: no direction to push
        grads[0] = torch.zeros_like(inputs[0])
    return grads


def _aux_loss_needs_graph(out) -> bool:
    aux = getattr(out, "aux_loss", None)
    return isinstance(aux, torch.Tensor) and aux.requires_grad


def _positive_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
