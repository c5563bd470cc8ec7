"""optim.name=muon against independent references: which parameters Muon gets (by name), one step against
torch.optim.Muon applied by hand, the schedule scaling both optimizers, an exact state round trip, and the
config errors. The killed-and-resumed Muon run is in test_train.py."""

from __future__ import annotations

import copy

import pytest
import torch

from choicelm.core.config import ConfigError, ModelConfig, MoEConfig, OptimConfig, load_config
from choicelm.core.errors import ChoicelmError
from choicelm.models import GPT, build_model
from choicelm.train.optim import MuonAdamW, build_optimizer, lr_at, muon_parameter_names, set_lr

LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32), **kw})


def muon_cfg(**kw) -> OptimConfig:
    return OptimConfig(**{**dict(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1), **kw})


def backward(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    model(idx, idx).loss.backward()


def names_in(optimizer, model) -> set[str]:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_muon_takes_exactly_the_2d_block_matrices():
    """GPT-2 layout: c_attn, c_proj, c_fc, c_proj of every block; the rest (embeddings, tied head, norms, biases,
    qk norms) on AdamW. Llama + MoE: the dense blocks' gate/up/down and attention; routers, predictors and the
    stacked 3-D experts of the MoE blocks, and the untied head, on AdamW."""
    model = GPT(tiny(qk_norm=True))
    opt = build_optimizer(model, muon_cfg(), "cpu")
    expected = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert isinstance(opt, MuonAdamW)
    assert names_in(opt.muon, model) == expected == set(muon_parameter_names(model))
    assert names_in(opt.adamw, model) == {n for n, _ in model.named_parameters()} - expected
    assert all(p.dim() == 2 for g in opt.muon.param_groups for p in g["params"])

    model = GPT(tiny(**LLAMA, n_layer=4), MoEConfig(experts=4, every=2, router="expert_choice_causal"))
    opt = build_optimizer(model, muon_cfg(), "cpu")
    dense = {f"transformer.h.{i}.mlp.{m}.weight" for i in (0, 2) for m in ("gate_proj", "up_proj", "down_proj")}
    attn = {f"transformer.h.{i}.attn.{m}.weight" for i in range(4) for m in ("c_attn", "c_proj")}
    assert names_in(opt.muon, model) == dense | attn
    experts = {f"transformer.h.{i}.mlp.experts.{w}" for i in (1, 3) for w in ("w_in", "w_out")}
    assert names_in(opt.experts, model) == experts  # stacked experts: Muon per expert matrix (StackedMuon)
    adamw = names_in(opt.adamw, model)
    for name in ("transformer.h.1.mlp.router.weight", "transformer.h.1.mlp.predictor.weight", "lm_head.weight",
                 "transformer.wte.weight", "transformer.h.0.ln_1.weight"):
        assert name in adamw, name
    assert adamw | dense | attn | experts == {n for n, _ in model.named_parameters()}
    # AdamW decays its matrices (embeddings, head, routers, experts), never 1-D gains or biases
    decayed = [g for g in opt.adamw.param_groups if g["weight_decay"] > 0]
    assert all(p.dim() >= 2 for g in decayed for p in g["params"])
    assert all(p.dim() < 2 for g in opt.adamw.param_groups if g["weight_decay"] == 0 for p in g["params"])


def test_stacked_expert_muon_moves_each_expert_as_torch_muon_moves_a_matrix():
    """The reference: torch.optim.Muon with every expert's [D, F] slice as a parameter of its own."""
    model = GPT(tiny(**LLAMA, n_layer=2), MoEConfig(experts=4, every=2, router="token_choice", dropless=True))
    cfg = muon_cfg(muon_momentum=0.9)
    opt = build_optimizer(model, cfg, "cpu")
    w = model.transformer.h[1].mlp.experts.w_in
    slices = [torch.nn.Parameter(w[e].detach().clone()) for e in range(w.shape[0])]
    ref = torch.optim.Muon(slices, lr=cfg.muon_lr, weight_decay=0.1, momentum=0.9, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    torch.manual_seed(0)
    for step in range(2):
        ids = torch.randint(0, 64, (2, 16))
        model(ids, ids).loss.backward()
        for e, s in enumerate(slices):
            s.grad = w.grad[e].clone()
        set_lr(opt, cfg.lr)
        for g in ref.param_groups:
            g["lr"] = cfg.muon_lr
        opt.step()
        ref.step()
        opt.zero_grad()
        for e, s in enumerate(slices):
            assert torch.equal(w[e].detach(), s.detach()), (step, e)
    assert not torch.equal(w.detach()[0], slices[1].detach())  # (the experts did move apart)


def test_adamw_default_is_unchanged_and_frozen_parameters_are_left_out():
    model = GPT(tiny())
    opt = build_optimizer(model, OptimConfig(), "cpu")
    assert type(opt) is torch.optim.AdamW and names_in(opt, model) == {n for n, _ in model.named_parameters()}
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    opt = build_optimizer(model, muon_cfg(), "cpu")
    assert "transformer.h.0.attn.c_attn.weight" not in names_in(opt.muon, model) | names_in(opt.adamw, model)


def test_a_model_without_block_matrices_is_refused_in_one_line():
    lstm = build_model(ModelConfig(kind="lstm", vocab_size=64, n_layer=1, n_embd=16))
    with pytest.raises(ChoicelmError, match="found no hidden matrices") as e:
        build_optimizer(lstm, muon_cfg(), "cpu")
    assert "\n" not in str(e.value)


def test_two_muon_steps_equal_torch_muon_applied_by_hand():
    """Each Muon matrix moves as torch.optim.Muon (match_rms_adamw, Nesterov) with lr muon_lr x schedule moves a
    copy of it given the same gradients; each AdamW parameter as torch.optim.AdamW does."""
    torch.manual_seed(0)
    model = GPT(tiny(**LLAMA))
    cfg = muon_cfg(muon_momentum=0.9, warmup_steps=2)
    opt = build_optimizer(model, cfg, "cpu")
    name, other = "transformer.h.1.mlp.up_proj.weight", "transformer.wte.weight"
    params = dict(model.named_parameters())
    ref_w = params[name].detach().clone().requires_grad_()
    ref_e = params[other].detach().clone().requires_grad_()
    ref_muon = torch.optim.Muon([ref_w], lr=cfg.muon_lr, weight_decay=0.1, momentum=0.9, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([ref_e], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.1)
    for step in range(2):
        backward(model, seed=step)
        ref_w.grad, ref_e.grad = params[name].grad.clone(), params[other].grad.clone()
        lr = lr_at(step, cfg, 10)
        set_lr(opt, lr)
        for group in ref_muon.param_groups:
            group["lr"] = cfg.muon_lr / cfg.lr * lr
        for group in ref_adamw.param_groups:
            group["lr"] = lr
        before = params[name].detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_muon.step()
        ref_adamw.step()
        assert torch.equal(params[name], ref_w)
        torch.testing.assert_close(params[other], ref_e, atol=1e-7, rtol=0)  # fused vs for-each AdamW: rounding
    # Independent of torch's code: the update is an orthogonalised matrix (singular values ~1; Newton-Schulz
    # leaves them in about [0.5, 1.5]) times 0.2 * sqrt(max(rows, cols)) * lr, after the decoupled decay.
    lr_muon = cfg.muon_lr / cfg.lr * lr_at(1, cfg, 10)
    update = (before * (1 - lr_muon * 0.1) - params[name].detach()) / (0.2 * max(before.shape) ** 0.5 * lr_muon)
    s = torch.linalg.svdvals(update)
    assert 0.3 < s.min() and s.max() < 1.6, s


def test_the_schedule_scales_both_learning_rates():
    cfg = muon_cfg(lr=2e-3, muon_lr=0.05, warmup_steps=3, schedule="cosine")
    opt = build_optimizer(GPT(tiny()), cfg, "cpu")
    for step in (0, 2, 5, 9):
        lr = lr_at(step, cfg, 10)
        set_lr(opt, lr)
        assert {g["lr"] for g in opt.adamw.param_groups} == {lr}
        assert all(g["lr"] == pytest.approx(lr * 25) for g in opt.muon.param_groups)
    same = build_optimizer(GPT(tiny()), muon_cfg(lr=2e-3, muon_lr=0.0), "cpu")  # 0 = optim.lr
    set_lr(same, 1e-3)
    assert {g["lr"] for g in same.param_groups} == {1e-3}


def test_state_round_trip_is_exact_and_the_ratio_comes_from_the_config():
    """Two steps, state_dict -> a fresh optimizer on a copy of the model, one more step: the copy stays bit-equal.
    The Muon/AdamW learning-rate ratio comes from the config, not the checkpoint (a resume may change muon_lr)."""
    torch.manual_seed(0)
    a = GPT(tiny())
    opt_a = build_optimizer(a, muon_cfg(), "cpu")
    for step in range(2):
        backward(a, step)
        set_lr(opt_a, 1e-3)
        opt_a.step()
        opt_a.zero_grad()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    opt_b = build_optimizer(b, muon_cfg(), "cpu")
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    opt_c = build_optimizer(c, muon_cfg(muon_lr=0.04), "cpu")
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert all(g["lr_scale"] == pytest.approx(40) for g in opt_c.muon.param_groups)
    for model, opt in ((a, opt_a), (b, opt_b), (c, opt_c)):
        backward(model, 7)
        set_lr(opt, 1e-3)
        opt.step()
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert torch.equal(pa["transformer.wte.weight"], pc["transformer.wte.weight"])  # the same Adam moments
    assert not torch.equal(pa["transformer.h.0.mlp.c_fc.weight"], pc["transformer.h.0.mlp.c_fc.weight"])
    with pytest.raises(ChoicelmError, match="not Muon \\+ AdamW"):
        opt_a.load_state_dict(torch.optim.AdamW(a.parameters()).state_dict())


@pytest.mark.parametrize("override,match", [
    ("--optim.name=sgd", "optim.name='sgd' is not allowed; choose one of adamw, muon"),
    ("--optim.muon_momentum=1.0", "optim.muon_momentum=1.0 must be in \\[0, 1\\)"),
    ("--optim.muon_lr=-0.01", "optim.muon_lr=-0.01 must be >= 0"),
    ("--model.kind=bert", "model.qk_norm=true is only implemented for model.kind=gpt"),
])
def test_config_errors_are_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override, "--model.qk_norm=true"] if "kind" in override else [override])
    assert "\n" not in str(e.value)
