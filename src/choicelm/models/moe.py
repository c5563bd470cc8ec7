"""Mixture-of-Experts layer: routers, stacked experts, auxiliary losses and routing statistics.

    MoE(model_cfg, moe_cfg)   replaces a block's MLP
    forward(x_BTD, valid_BT=None, rule="topk", record=False) -> MoEOutput(y_BTD, aux_loss, stats)

Routing rules (`rule`). The router picks the rule for training; GPT picks the one for evaluation
and generation (GPT.routing, default: the router's causal rule):

    rule        what it does                                                          causal
    topk        expert choice (Zhou et al. 2022): every expert takes the top           no
                k = ceil(c*n/E) tokens of its group (a sequence, or the whole batch)
    threshold   token t goes to expert e iff score[t, e] >= threshold[e], a running    yes
                (EMA) estimate of e's top-k cut-off, updated after each training
                batch has been routed (so a batch never routes with its own cut-off)
    predictor   token t goes to e iff a small classifier on t's own (detached) hidden    yes
                state says t would be in e's top-k (trained with BCE on topk's choice)
    capacity    token choice: softmax, top-k experts per token, at most                  no (drops depend
                ceil(c*N*top_k/E) tokens per expert (first choices have priority)        on other tokens)
    dropless    token choice without a capacity limit (Mixtral)                           yes

    router                 training rule                  evaluation / generation default
    expert_choice          topk (needs allow_noncausal)   threshold  (its thresholds are tracked too)
    expert_choice_causal   topk as the teacher*           causal_mode: threshold | predictor
    token_choice           capacity (dropless if set)     dropless
    * or the causal rule itself with moe.train_causal=true. Taught by top-k, a model is causal at evaluation
      and generation only: in training, later tokens decide earlier tokens' routing (models/causality.py
      measures how much). With train_causal=true it is causal in training too.

The gate is the router's softmax score (fp32), applied after the expert; expert choice does not
renormalise it, token choice does when moe.renormalize (Mixtral).

Dispatch: every rule ends as (idx_EC, gate_EC): for each expert, C token slots holding a token
index and its gate (0 for an empty slot). Top-k expert choice has exactly C = k slots per group,
so it needs no host sync, and its experts run as one gather into [E, C, D], two batched matmuls and
one index_add back to [N, D]. The token-local rules fill experts unevenly (counts_E, one sync): their
slots are padded to the busiest expert, and each expert runs on its filled slots only, rounded up to one
of a few sizes (one matmul pair per busy expert; under 1/16 of padding is computed).

Shape suffixes: B batch, T positions, N = B*T tokens, D model width, E experts, F expert width,
C slots per expert, G routing groups, n tokens per group, k tokens an expert takes per group.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import ModelConfig, MoEConfig
from ..core.errors import ChoicelmError
from .layers import activation

RULES = ("topk", "threshold", "predictor", "capacity", "dropless")
CAUSAL_RULES = ("threshold", "predictor", "dropless")


@dataclass
class MoEOutput:
    y_BTD: torch.Tensor
    aux_loss: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


class Experts(nn.Module):
    """E feed-forward networks stored stacked, run as batched matmuls over [E, C, D] token slots.

    swiglu: w_in [E, D, 2F] = [gate | up], y = (silu(x @ gate) * (x @ up)) @ w_out   (Mixtral/Llama)
    gelu:   w_in [E, D, F],                y = gelu_tanh(x @ w_in) @ w_out          (GPT-2)
    silu:   w_in [E, D, F],                y = silu(x @ w_in) @ w_out
    w_out [E, F, D]. No biases.
    """

    def __init__(self, n_experts: int, d: int, width: int, act: str):
        super().__init__()
        self.act = act
        self.width = width
        self.w_in = nn.Parameter(torch.empty(n_experts, d, 2 * width if act == "swiglu" else width))
        self.w_out = nn.Parameter(torch.empty(n_experts, width, d))

    def reset_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_in, std=std)
        nn.init.normal_(self.w_out, std=residual_std)

    def forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert on its C slots: [E, C, D] -> [E, C, D], two batched matmuls."""
        return self._ffn(x_ECD, self.w_in, self.w_out)

    def forward_ragged(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e on its counts[e] rows of x_AD (rows grouped by expert, in expert order) -> [A, D]: an expert
        without tokens reads no weights, for one matmul pair per busy expert."""
        w_in, w_out = self.w_in, self.w_out
        if torch.is_autocast_enabled(x_AD.device.type):  # cast once, not per expert (~6% faster under bf16)
            dtype = torch.get_autocast_dtype(x_AD.device.type)
            w_in, w_out = w_in.to(dtype), w_out.to(dtype)
        w_in, w_out = w_in.unbind(0), w_out.unbind(0)  # unbind: one backward (a stack) for all
        return torch.cat([self._ffn(x_cD, w_in[e], w_out[e]) for e, x_cD in enumerate(x_AD.split(counts)) if len(x_cD)])

    def _ffn(self, x, w_in, w_out):  # batched ([E, C, D] @ [E, D, *]) or one expert ([c, D] @ [D, *])
        h = x @ w_in
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = activation(gate, "swiglu") * up
        else:
            h = activation(h, self.act)
        return h @ w_out


class MoE(nn.Module):
    def __init__(self, model_cfg: ModelConfig, cfg: MoEConfig):
        super().__init__()
        if cfg.experts < 2:
            raise ChoicelmError(f"an MoE layer needs moe.experts >= 2, got {cfg.experts}")
        self.cfg = cfg
        self.n_experts = E = cfg.experts
        D = model_cfg.n_embd
        F_ = cfg.expert_width or model_cfg.hidden_size
        self.router = nn.Linear(D, E, bias=False)
        self.experts = Experts(E, D, F_, model_cfg.mlp)
        self.shared = Experts(1, D, F_, model_cfg.mlp) if cfg.shared_expert else None
        self.expert_choice = cfg.router in ("expert_choice", "expert_choice_causal")
        if self.expert_choice:  # every expert-choice layer tracks its top-k cut-offs, so it can route causally
            # A defined, data-free start: before any update a token goes to every expert scoring above uniform
            # (1/E), about half of them; the first training batch routes with it, never with its own cut-off.
            self.register_buffer("threshold", torch.full((E,), 1.0 / E))
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.predictor = nn.Linear(D, E) if cfg.router == "expert_choice_causal" else None
        self.track_thresholds = True  # off inside thresholds_frozen()
        self.reset_parameters(0.02, 0.02 / math.sqrt(2 * model_cfg.n_layer))

    # ------------------------------------------------------------------------- rules

    @property
    def train_rule(self) -> str:
        if self.cfg.router == "token_choice":
            return "dropless" if self.cfg.dropless else "capacity"
        if self.cfg.train_causal:
            return "predictor" if self.cfg.router == "expert_choice_causal" and self.cfg.causal_mode == "predictor" \
                else "threshold"
        return "topk"

    @property
    def eval_rule(self) -> str:
        if self.cfg.router == "token_choice":
            return "dropless"
        return self.cfg.causal_mode if self.cfg.router == "expert_choice_causal" else "threshold"

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules this layer can route with."""
        if self.cfg.router == "token_choice":
            return ("capacity", "dropless")
        return ("topk", "threshold", "predictor") if self.predictor is not None else ("topk", "threshold")

    def reset_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, residual_std)
        if self.shared is not None:
            self.shared.reset_parameters(std, residual_std)
        if self.predictor is not None:
            nn.init.normal_(self.predictor.weight, std=std)
            nn.init.zeros_(self.predictor.bias)

    def inactive_params(self) -> int:
        """Expert parameters a token does not use on average (for the 6N FLOP estimate): the experts
        times (1 - mean experts per token / E), with c experts per token for expert choice, top_k for token choice."""
        per_token = self.cfg.top_k if self.cfg.router == "token_choice" else self.cfg.capacity
        active = min(1.0, per_token / self.n_experts)
        return int(sum(p.numel() for p in self.experts.parameters()) * (1.0 - active))

    # ------------------------------------------------------------------------- forward

    # Routing has data-dependent shapes (dropless pads to the busiest expert) and host syncs: under torch.compile
    # it graph-breaks and recompiles every few steps, so a compiled block runs its MoE layer eagerly.
    @torch.compiler.disable
    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None, rule: str | None = None,
                record: bool = False) -> MoEOutput:
        """x_BTD: the normalised hidden states. valid_BT: bool, False = padding (never routed).
        rule: one of self.rules (default: the training rule in train mode, else the evaluation rule).
        record: add the routing decisions (bool [B, T, E]) to the stats as "assignment"."""
        rule = rule or (self.train_rule if self.training else self.eval_rule)
        if rule not in self.rules:
            raise ChoicelmError(f"routing {rule!r} is not available in a moe.router={self.cfg.router} layer; "
                                f"choose one of {', '.join(self.rules)}")
        B, T, D = x_BTD.shape
        N, E = B * T, self.n_experts
        x_ND = x_BTD.reshape(N, D)
        valid_N = valid_BT.reshape(N).to(torch.bool) if valid_BT is not None else None

        with torch.autocast(x_BTD.device.type, enabled=False):  # routing in fp32
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
            probs_NE = logits_NE.softmax(dim=-1)
            aux = []
            if self.cfg.z_loss_weight:
                z_N = torch.logsumexp(logits_NE, dim=-1).square()
                aux.append(self.cfg.z_loss_weight * _masked_mean(z_N, valid_N))
            stats: dict = {}
            if self.cfg.router == "token_choice":
                idx_EC, gate_EC, counts_E, assign_NE, balance, dropped = self._token_choice(probs_NE, valid_N, rule)
                if self.cfg.balance_loss_weight:
                    aux.append(self.cfg.balance_loss_weight * balance)
                stats["dropped"] = dropped
            else:
                idx_EC, gate_EC, counts_E, assign_NE = self._expert_choice(x_ND, probs_NE, valid_N, B, T, rule, aux,
                                                                           stats)

        y_ND = self._run_experts(x_ND, idx_EC, gate_EC, counts_E)
        if self.shared is not None:
            y_ND = y_ND + self.shared(x_ND[None])[0].to(y_ND.dtype)
        y_BTD = y_ND.view(B, T, D).to(x_BTD.dtype)

        with torch.no_grad():
            stats.update(_routing_stats(probs_NE, assign_NE, valid_N))
            if record:
                stats["assignment"] = assign_NE.view(B, T, E)
        aux_loss = torch.stack(aux).sum() if aux else None
        return MoEOutput(y_BTD, aux_loss, stats)

    def _run_experts(self, x_ND: torch.Tensor, idx_EC: torch.Tensor, gate_EC: torch.Tensor,
                     counts_E: torch.Tensor | None = None) -> torch.Tensor:
        """y[t] = sum over the slots (e, c) holding token t of gate[e, c] * expert_e(x[t]).
        counts_E: how many of expert e's slots are filled (the first counts_E[e]); the rest are padding."""
        N, D = x_ND.shape
        out_dtype = torch.promote_types(x_ND.dtype, gate_EC.dtype)
        if idx_EC.shape[1] == 0:  # no token was routed anywhere (e.g. one decode step under thresholds)
            return x_ND.new_zeros(N, D, dtype=out_dtype) + 0.0 * self.experts.w_in.sum()
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev):  # gather half the bytes; bmm would cast anyway
            x_ND = x_ND.to(torch.get_autocast_dtype(dev))
        E, C = idx_EC.shape
        # Routing that fills experts unevenly (token choice, causal expert choice) runs each expert on its own
        # tokens: dropless top-2 pads ~10% of the slots at 8 experts x 512, capacity 1.25 ~25%, a decode step most.
        # Each expert's filled slots are rounded up to one of a few sizes (padded_rows: new matmul shapes are slow);
        # the extra slots are padding as in the batched path (token 0, gate 0), so they add exact zeros.
        # Gathers use index_select, not x_ND[idx]: its backward is an index_add, not a slower accumulating index_put.
        if counts_E is not None and E * C > counts_E.sum():
            rows = [padded_rows(c) for c in counts_E.tolist()]
            if max(rows) > C:
                idx_EC, gate_EC = F.pad(idx_EC, (0, max(rows) - C)), F.pad(gate_EC, (0, max(rows) - C))
            slot_EC = torch.arange(idx_EC.shape[1], device=idx_EC.device)[None]
            run_EC = slot_EC < torch.tensor(rows, device=idx_EC.device)[:, None]
            idx_A, gate_A = idx_EC[run_EC], gate_EC[run_EC]
            y_AD = self.experts.forward_ragged(x_ND.index_select(0, idx_A), rows)
        else:
            idx_A, gate_A = idx_EC.reshape(-1), gate_EC.reshape(-1)
            y_AD = self.experts(x_ND.index_select(0, idx_A).view(E, C, D)).view(E * C, D)
        # The gate is applied after the expert, in the expert's dtype: an fp32 gate on bf16 outputs made the product,
        # the index_add and their backward fp32, 10-20% of the layer's time under bf16 autocast.
        y_AD = y_AD * gate_A.to(y_AD.dtype)[:, None]
        out_ND = torch.zeros(N, D, dtype=y_AD.dtype, device=x_ND.device)
        return out_ND.index_add_(0, idx_A, y_AD)

    # ------------------------------------------------------------------------- expert choice

    def _topk(self, probs_NE: torch.Tensor, valid_N: torch.Tensor | None, B: int, T: int):
        """Every expert takes its top-k tokens per group. Returns (tok_EM, gate_EM, keep_EM, cutoff_E),
        M = G*k slots; keep is False for a padding token (picked only if the group has fewer than k real ones)."""
        E = self.n_experts
        G, n = (B, T) if self.cfg.group == "sequence" else (1, B * T)
        k = min(n, math.ceil(self.cfg.capacity * n / E))
        scores_GEn = probs_NE.view(G, n, E).transpose(1, 2)
        if valid_N is not None:  # softmax scores are > 0: a padding token at -1 only fills an empty slot
            scores_GEn = scores_GEn.masked_fill(~valid_N.view(G, 1, n), -1.0)
        top_GEk, idx_GEk = scores_GEn.topk(k, dim=-1)
        tok_GEk = idx_GEk + (torch.arange(G, device=idx_GEk.device) * n).view(G, 1, 1)
        keep_GEk = top_GEk >= 0
        cut_GE = top_GEk[..., -1].detach()
        ok_GE = cut_GE >= 0
        cutoff_E = (cut_GE * ok_GE).sum(0) / ok_GE.sum(0).clamp(min=1)
        tok_EM = tok_GEk.permute(1, 0, 2).reshape(E, G * k)
        gate_EM = top_GEk.clamp(min=0).permute(1, 0, 2).reshape(E, G * k)
        keep_EM = keep_GEk.permute(1, 0, 2).reshape(E, G * k)
        return tok_EM, gate_EM, keep_EM, cutoff_E

    def _cap(self, mask_NE: torch.Tensor, probs_NE: torch.Tensor) -> torch.Tensor:
        """Keep each token's max_experts_per_token highest-scoring experts among those in mask."""
        cap = self.cfg.max_experts_per_token
        if not cap or cap >= self.n_experts:
            return mask_NE
        masked_NE = torch.where(mask_NE, probs_NE.detach(), -1.0)
        kth_N1 = masked_NE.topk(cap, dim=-1).values[:, -1:]
        return mask_NE & (masked_NE >= kth_N1)

    def _expert_choice(self, x_ND, probs_NE, valid_N, B, T, rule, aux, stats):
        N, E = probs_NE.shape
        tok_EM, gate_EM, keep_EM, cutoff_E = self._topk(probs_NE, valid_N, B, T)
        e_EM = torch.arange(E, device=tok_EM.device)[:, None].expand_as(tok_EM)
        topk_NE = torch.zeros(N, E, dtype=torch.bool, device=probs_NE.device).index_put((tok_EM, e_EM), keep_EM)
        topk_NE = self._cap(topk_NE, probs_NE)  # the teacher: what top-k routing picks

        valid_NE = valid_N[:, None].expand(N, E) if valid_N is not None else torch.ones_like(topk_NE)
        causal = {"threshold": self._cap((probs_NE.detach() >= self.threshold) & valid_NE, probs_NE)}
        if self.predictor is not None:
            pred_NE = self.predictor(x_ND.detach().float())  # stop-gradient: the trunk is not trained by it
            causal["predictor"] = self._cap((pred_NE > 0) & valid_NE, probs_NE)
            if self.training and self.cfg.predictor_loss_weight:
                bce = F.binary_cross_entropy_with_logits(pred_NE, topk_NE.float(), reduction="none").mean(-1)
                aux.append(self.cfg.predictor_loss_weight * _masked_mean(bce, valid_N))

        with torch.no_grad():  # how well each causal rule reproduces top-k (meaningful when a group has >= E tokens)
            n = T if self.cfg.group == "sequence" else B * T
            if n >= E:
                n_valid = valid_NE.sum().clamp(min=1)
                n_top = topk_NE.sum().clamp(min=1)
                for name, mask_NE in causal.items():
                    stats[f"agree_{name}"] = ((mask_NE == topk_NE) & valid_NE).sum() / n_valid
                    stats[f"recall_{name}"] = (mask_NE & topk_NE).sum() / n_top

        if self.training and self.track_thresholds:
            # Only after routing: this batch's cut-off comes from its whole sequence (future tokens included), so it
            # may only route the next batch. Routing with it first let future tokens move past outputs in training.
            self._update_thresholds(cutoff_E)

        if rule == "topk":
            keep_EM = keep_EM & topk_NE[tok_EM, e_EM]  # the per-token cap
            return tok_EM, gate_EM * keep_EM, None, topk_NE  # every expert fills its G*k slots
        mask_NE = causal[rule]
        return *_dispatch_mask(mask_NE, probs_NE), mask_NE

    @torch.no_grad()
    def _update_thresholds(self, cutoff_E: torch.Tensor) -> None:
        """Running (EMA) estimate of each expert's top-k cut-off; the first update replaces the data-free start."""
        if int(self.threshold_updates) == 0:
            self.threshold.copy_(cutoff_E)
        else:
            self.threshold.lerp_(cutoff_E, 1.0 - self.cfg.threshold_momentum)
        self.threshold_updates += 1

    # ------------------------------------------------------------------------- token choice

    def _token_choice(self, probs_NE, valid_N, rule):
        """Softmax, then top_k experts per token. Slots are given out in priority order: every token's first
        choice before any second choice, tokens in order; with the capacity rule the rest are dropped."""
        N, E = probs_NE.shape
        K = self.cfg.top_k
        top_NK, e_NK = probs_NE.topk(K, dim=-1)
        if self.cfg.renormalize:
            top_NK = top_NK / top_NK.sum(dim=-1, keepdim=True)
        e_A, w_A = e_NK.T.reshape(-1), top_NK.T.reshape(-1)  # A = K*N assignments, first choices first
        tok_A = torch.arange(N, device=probs_NE.device).repeat(K)
        valid_A = valid_N.repeat(K) if valid_N is not None else torch.ones_like(e_A, dtype=torch.bool)
        onehot_AE = F.one_hot(e_A, E) * valid_A[:, None]
        pos_A = (onehot_AE.cumsum(0) - 1).gather(1, e_A[:, None]).squeeze(1)
        counts_E = onehot_AE.sum(0)
        if rule == "dropless":
            C = int(counts_E.max())  # host sync: pad to the busiest expert
        else:
            C = math.ceil(self.cfg.capacity * N * K / E)
        keep_A = valid_A & (pos_A < C)
        slot_A = e_A * (C + 1) + torch.where(keep_A, pos_A, C)  # column C collects what is dropped
        idx_EC = torch.zeros(E * (C + 1), dtype=torch.long, device=e_A.device).index_put((slot_A,), tok_A)
        gate_EC = probs_NE.new_zeros(E * (C + 1)).index_put((slot_A,), w_A * keep_A)
        idx_EC, gate_EC = idx_EC.view(E, C + 1)[:, :C], gate_EC.view(E, C + 1)[:, :C]
        assign_NE = torch.zeros(N, E, dtype=torch.bool, device=e_A.device).index_put((tok_A, e_A), keep_A)

        # Switch load balancing: f_i = share of the N*K assignments given to expert i, P_i = mean router prob.
        n_assign = counts_E.sum().clamp(min=1)
        f_E = counts_E.float() / n_assign
        P_E = _masked_mean(probs_NE, valid_N, dim=0)
        balance = E * (f_E * P_E).sum()
        dropped = 1.0 - keep_A.sum() / n_assign
        return idx_EC, gate_EC, counts_E.clamp(max=C), assign_NE, balance, dropped


@contextlib.contextmanager
def thresholds_frozen(model: nn.Module):
    """Training-mode forwards inside leave every MoE layer's running top-k thresholds alone: extra passes over
    the same batch (adversarial training's perturbed passes) are not more data to estimate them from."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.track_thresholds for m in layers]
    for m in layers:
        m.track_thresholds = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.track_thresholds = flag


# ----------------------------------------------------------------------------- helpers


class RoutedModel:
    """What GPT and BERT share about their MoE layers: which blocks get one, the routing rule, and how the layers'
    aux losses and statistics come back in the output. A subclass calls _init_routing(config, moe) in __init__
    and defines moe_layers() and default_rule(layer)."""

    routing: str | None = None

    def _init_routing(self, config: ModelConfig, moe: MoEConfig | None) -> list[int]:
        """Set moe_config, routing and record_routing; return the blocks whose MLP is an MoE layer: every
        moe.every-th block (blocks every-1, 2*every-1, ...)."""
        self.moe_config = moe if moe is not None and moe.enabled else None
        self.routing = None
        self.record_routing = False  # True: stats["moe"][layer]["assignment"] holds each token's experts [B, T, E]
        if self.moe_config is None:
            return []
        blocks = [i for i in range(config.n_layer) if (i + 1) % moe.every == 0]
        if not blocks:
            raise ChoicelmError(f"moe.every={moe.every} exceeds model.n_layer={config.n_layer}: no block would get an "
                                "MoE layer; lower moe.every or set moe.experts=0 for a dense model")
        return blocks

    def moe_output_fields(self, moe_outs: dict) -> dict:
        """aux_loss (the layers' sum) and stats ({"routing", "causal", "moe": {block: stats}}) for the model's
        output; {} for a dense model."""
        if not moe_outs:
            return {}
        aux = [o.aux_loss for o in moe_outs.values() if o.aux_loss is not None]
        rule = self.current_routing()
        stats = {"routing": rule, "causal": rule in CAUSAL_RULES, "moe": {i: o.stats for i, o in moe_outs.items()}}
        return {"aux_loss": torch.stack(aux).sum() if aux else None, "stats": stats}

    def moe_layers(self) -> list[MoE]:
        raise NotImplementedError

    def default_rule(self, layer: MoE) -> str:
        """The rule used when no routing is set (e.g. the training rule in train mode, the causal one in eval)."""
        raise NotImplementedError

    def set_routing(self, rule: str | None) -> None:
        """The routing rule of every MoE layer: topk | threshold | predictor for expert choice, capacity | dropless
        for token choice; None = the model's default_rule."""
        layers = self.moe_layers()
        if rule is not None:
            if not layers:
                raise ChoicelmError(f"routing={rule!r} needs an MoE model; this {type(self).__name__} is dense "
                                    "(moe.experts=0)")
            if rule not in layers[0].rules:
                raise ChoicelmError(f"routing={rule!r} is not available for moe.router={self.moe_config.router}; "
                                    f"choose one of {', '.join(layers[0].rules)} (all rules: {', '.join(RULES)})")
        self.routing = rule

    @contextlib.contextmanager
    def routing_as(self, rule: str | None):
        """with model.routing_as("topk"): ... evaluates with another rule, then restores the previous one."""
        before = self.routing
        self.set_routing(rule)
        try:
            yield self
        finally:
            self.routing = before

    def current_routing(self) -> str | None:
        """The rule the MoE layers route with in the current mode (None for a dense model)."""
        layers = self.moe_layers()
        if not layers:
            return None
        return self.routing or self.default_rule(layers[0])


def padded_rows(count: int) -> int:
    """The rows an expert with `count` tokens computes: count rounded up to a multiple of the largest power of two
    <= count/16, at most 64 (1024 -> 1024, 1000 -> 1024, 700 -> 704, under 32 -> unchanged). CPU matmuls (oneDNN)
    build a kernel for every new shape, ~1 ms each: token counts that change every training step made every
    ragged matmul a new shape. Rounded, an expert's sizes fall on at most 16 values per octave, built once;
    the extra rows cost under 1/16 (about 3% on average) of the expert's work and their outputs are dropped."""
    if count < 32:
        return count
    multiple = min(64, 1 << ((count // 16).bit_length() - 1))
    return -(-count // multiple) * multiple


def _dispatch_mask(mask_NE: torch.Tensor, probs_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots from a routing mask: expert e's tokens in token order, padded to the busiest expert; and how many
    slots each expert fills."""
    E = mask_NE.shape[1]
    counts_E = mask_NE.sum(0)
    C = int(counts_E.max())  # host sync
    tok_A, e_A = mask_NE.nonzero(as_tuple=True)
    pos_A = (mask_NE.long().cumsum(0) - 1)[tok_A, e_A]
    idx_EC = torch.zeros(E, C, dtype=torch.long, device=mask_NE.device).index_put((e_A, pos_A), tok_A)
    gate_EC = probs_NE.new_zeros(E, C).index_put((e_A, pos_A), probs_NE[tok_A, e_A])
    return idx_EC, gate_EC, counts_E


def _masked_mean(x: torch.Tensor, valid_N: torch.Tensor | None, dim=None) -> torch.Tensor:
    if valid_N is None:
        return x.mean() if dim is None else x.mean(dim)
    w = valid_N.to(x.dtype)
    if x.dim() > 1:
        w = w.view(-1, *([1] * (x.dim() - 1)))
    total = (x * w).sum() if dim is None else (x * w).sum(dim)
    return total / valid_N.sum().clamp(min=1)


def _routing_stats(probs_NE: torch.Tensor, assign_NE: torch.Tensor, valid_N: torch.Tensor | None) -> dict:
    E = probs_NE.shape[1]
    if valid_N is not None:
        probs_NE, assign_NE = probs_NE[valid_N], assign_NE[valid_N]
    per_token_N = assign_NE.sum(-1)
    entropy_N = -(probs_NE * probs_NE.clamp(min=1e-30).log()).sum(-1)
    return {
        "tokens_per_expert": assign_NE.sum(0),
        "experts_per_token": per_token_N.float().mean(),
        "experts_per_token_hist": torch.bincount(per_token_N, minlength=E + 1),
        "no_expert": (per_token_N == 0).float().mean(),
        "router_entropy": entropy_N.mean(),
    }


def summarize_stats(stats: dict) -> dict[str, float]:
    """A ModelOutput's MoE stats as a few floats for metrics.csv (moe_* columns), averaged over layers:
    load_max = busiest expert's tokens / the mean per expert (1 = perfectly even), experts_per_token,
    no_expert (share of tokens no expert took), dropped (token choice), router_entropy (nats), and per
    causal rule its agreement with top-k over all token x expert pairs and its recall of top-k picks."""
    layers = list(stats.get("moe", {}).values())
    if not layers:
        return {}
    out: dict[str, float] = {}

    def mean(key):
        vals = [float(s[key]) for s in layers if key in s]
        return sum(vals) / len(vals) if vals else None

    loads = []
    for s in layers:
        t = s["tokens_per_expert"].float()
        loads.append(float(t.max() / t.mean().clamp(min=1e-9)))
    out["moe_load_max"] = sum(loads) / len(loads)
    for key in ("experts_per_token", "no_expert", "dropped", "router_entropy", "agree_threshold",
                "recall_threshold", "agree_predictor", "recall_predictor"):
        value = mean(key)
        if value is not None:
            out[f"moe_{key}"] = value
    return out
