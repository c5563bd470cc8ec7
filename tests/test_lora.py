"""LoRA through peft on choicelm's own models: the merge against a hand computation W + (alpha/r) B A, merged and
unmerged models computing the same logits (GPT, BERT classifier, Seq2Seq), what trains and what stays frozen,
checkpoint round trips, tied embeddings, MoE models, dropout and bad names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from choicelm.core.config import ModelConfig, MoEConfig
from choicelm.core.errors import ChoicelmError
from choicelm.models.lora import (LoraSettings, apply_lora, default_targets, has_lora, lora_parameter_count,
                                    merge_lora)
from choicelm.models import BERT, GPT, Seq2Seq, build_model

V = 64


def gpt_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=V, block_size=16, n_layer=2, n_head=4, n_embd=32), **kw})


def bert_config(**kw) -> ModelConfig:
    return gpt_config(kind="bert", **kw)


def seq2seq_config(**kw) -> ModelConfig:
    return gpt_config(kind="seq2seq", **kw)


def tokens(*shape, seed=0) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def logits_of(model: nn.Module, seed: int = 1) -> torch.Tensor:
    """The model's output on a fixed batch; a Seq2Seq gets a source and a target."""
    ids_BT = tokens(3, 10, seed=seed)
    if isinstance(model, Seq2Seq):
        return model(ids_BT, tokens(3, 7, seed=seed + 1)).logits
    return model(ids_BT).logits


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B (and a fresh A), so the adapters change what the model computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter_modules(model).values():
            for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def train_steps(model: nn.Module, steps: int = 3, lr: float = 1e-2, labels: bool = False) -> list[float]:
    """A few AdamW steps on random data; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids_BT = tokens(4, 10, seed=100)
        if labels:
            out = model(ids_BT, labels_B=torch.tensor([0, 1, 2, 1]))
        elif isinstance(model, Seq2Seq):
            out = model(ids_BT, ids_BT[:, :-1], ids_BT[:, 1:])
        else:
            out = model(ids_BT[:, :-1], ids_BT[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


# ----------------------------------------------------------------------------- settings and targets


def test_settings_are_validated_on_construction():
    for bad in (dict(r=0), dict(r=2.0), dict(alpha=0.0), dict(dropout=1.0), dict(dropout=-0.1), dict(targets=("",))):
        with pytest.raises(ChoicelmError):
            LoraSettings(**bad)
    s = LoraSettings(r=4, alpha=8.0, targets="c_attn, c_fc", train_modules=["classifier"])
    assert s.targets == ("c_attn", "c_fc") and s.train_modules == ("classifier",) and s.scaling == 2.0


def test_default_targets_are_attention_and_mlp_linears_only():
    torch.manual_seed(0)
    per_block = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert default_targets(GPT(gpt_config())) == [f"transformer.h.{i}.{n}" for i in range(2) for n in per_block]
    swiglu = default_targets(GPT(gpt_config(mlp="swiglu")))
    assert "transformer.h.0.mlp.gate_proj" in swiglu and "transformer.h.1.mlp.down_proj" in swiglu
    bert = BERT(bert_config()).add_classifier(3)
    assert default_targets(bert) == [f"h.{i}.{n}" for i in range(2) for n in per_block]
    s2s = default_targets(Seq2Seq(seq2seq_config()))
    assert len(s2s) == 2 * 4 + 2 * 7  # encoder blocks: 4 linears; decoder blocks: 4 + cross q_proj, c_kv, c_proj
    assert "decoder.h.1.cross.c_kv" in s2s and "decoder.h.0.cross.q_proj" in s2s
    for model in (GPT(gpt_config(n_labels=3)), bert, Seq2Seq(seq2seq_config()),
                  GPT(gpt_config(), MoEConfig(experts=4))):
        targets = default_targets(model)
        assert all(type(model.get_submodule(t)) is nn.Linear for t in targets)
        for forbidden in ("wte", "wpe", "wtt", "lm_head", "classifier", "pooler", "mlm_head", "router", "predictor"):
            assert not any(forbidden in t for t in targets), (forbidden, targets)


def test_adapted_model_is_the_same_object_and_starts_equal_to_the_base():
    torch.manual_seed(0)
    model = GPT(gpt_config()).eval()
    before = logits_of(model)
    adapted = apply_lora(model, LoraSettings(r=4))
    assert adapted is model and isinstance(adapted, GPT) and adapted.config.n_embd == 32 and has_lora(adapted)
    assert not adapted.training and not any(m.training for m in adapted.modules())  # new dropouts follow eval mode
    torch.testing.assert_close(logits_of(adapted), before, atol=0, rtol=0)  # B = 0: exactly the base model
    assert adapted.new_kv_cache(1, 8).k.shape[-2] == 8  # the model's own methods are still there


def test_apply_lora_is_deterministic_under_the_seed():
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        model = apply_lora(build_model(gpt_config()), LoraSettings(r=4))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_parameter_count_matches_a_hand_count():
    torch.manual_seed(0)
    model = GPT(gpt_config())
    base_total = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoraSettings(r=4))
    # per block, r * (in + out): c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32
    adapters = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert lora_parameter_count(model) == (adapters, base_total + adapters)


# ----------------------------------------------------------------------------- merge


def test_merged_weight_is_w_plus_scaled_b_a():
    torch.manual_seed(0)
    model = apply_lora(GPT(gpt_config()), LoraSettings(r=4, alpha=12.0))
    randomize_adapters(model)
    expected = {name: m.base_layer.weight.detach() + 3.0 * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
                for name, m in adapter_modules(model).items()}  # alpha / r = 12 / 4
    biases = {name: m.base_layer.bias.detach().clone() for name, m in adapter_modules(model).items()}
    merge_lora(model)
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert type(module) is nn.Linear
        torch.testing.assert_close(module.weight, weight, atol=1e-6, rtol=0)
        assert torch.equal(module.bias, biases[name])


@pytest.mark.parametrize("family", ["gpt", "bert_classifier", "seq2seq"])
def test_merged_model_computes_what_the_adapted_model_computes(family):
    torch.manual_seed(0)
    if family == "gpt":
        model, settings = GPT(gpt_config()), LoraSettings(r=4, alpha=8.0)
    elif family == "seq2seq":
        model, settings = Seq2Seq(seq2seq_config()), LoraSettings(r=4, alpha=8.0)
    else:
        model, settings = BERT(bert_config()).add_classifier(3), \
            LoraSettings(r=4, alpha=8.0, train_modules=("classifier", "pooler"))
    plain_keys = set(model.state_dict())
    plain_before = logits_of(model.eval()).detach()
    apply_lora(model, settings).train()
    losses = train_steps(model, steps=4, lr=2e-2, labels=family == "bert_classifier")
    assert losses[-1] < losses[0]
    assert all(m.lora_B["default"].weight.abs().max() > 0 for m in adapter_modules(model).values())
    model.eval()
    with torch.no_grad():
        adapted = logits_of(model)
        merge_lora(model)
        merged = logits_of(model)
    assert not has_lora(model) and set(model.state_dict()) == plain_keys and not hasattr(model, "peft_config")
    assert (adapted - plain_before).abs().max() > 1e-3  # the adapters really changed the model
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in model.parameters())  # a plain model again


def test_merge_is_a_no_op_on_a_plain_model():
    torch.manual_seed(0)
    model = GPT(gpt_config())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) is model and merge_lora(merge_lora(model)) is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ----------------------------------------------------------------------------- training


def test_only_adapters_and_train_modules_get_gradients_and_frozen_weights_stay_bit_identical():
    torch.manual_seed(0)
    model = BERT(bert_config()).add_classifier(3)
    apply_lora(model, LoraSettings(r=4, train_modules=("classifier", "pooler")))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # every parameter goes to the optimizer, with weight decay: frozen ones must still not move
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(tokens(4, 10), labels_B=torch.tensor([0, 1, 2, 1])).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {n for n, _ in model.named_parameters()
                if ".lora_A.default." in n or ".lora_B.default." in n or n.split(".")[0] in ("classifier", "pooler")}
    assert with_grad == expected and len(expected) == 2 * 8 + 4
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert len(frozen) == sum(1 for _ in model.parameters()) - len(expected)


def test_tied_embeddings_stay_tied_and_untouched():
    torch.manual_seed(0)
    model = GPT(gpt_config())
    wte_before = model.transformer.wte.weight.detach().clone()
    apply_lora(model, LoraSettings(r=4))
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad
    train_steps(model, steps=2)
    merge_lora(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, wte_before)


def test_dropout_trains_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = apply_lora(GPT(gpt_config()), LoraSettings(r=4, dropout=0.5)).train()
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.equal(logits_of(model), logits_of(model))  # dropout on the adapter input in training
    losses = train_steps(model, steps=4, lr=2e-2)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        first = logits_of(model)
        torch.testing.assert_close(logits_of(model), first, atol=0, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(logits_of(model), first, atol=1e-5, rtol=0)


def test_moe_gpt_adapts_its_dense_linears_only():
    torch.manual_seed(0)
    model = build_model(gpt_config(), MoEConfig(experts=4))  # block 1 is an MoE block
    targets = default_targets(model)
    assert "transformer.h.1.attn.c_attn" in targets and "transformer.h.0.mlp.c_fc" in targets
    assert not any(t.startswith("transformer.h.1.mlp") for t in targets)
    experts_before = model.transformer.h[1].mlp.experts.w_in.detach().clone()
    apply_lora(model, LoraSettings(r=4)).train()
    losses = train_steps(model, steps=3, lr=2e-2)
    assert losses[-1] < losses[0]
    assert torch.equal(model.transformer.h[1].mlp.experts.w_in, experts_before)
    model.eval()
    with torch.no_grad():
        adapted = logits_of(model)
        merge_lora(model)
        torch.testing.assert_close(logits_of(model), adapted, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_into_a_fresh_adapted_model():
    config, settings = gpt_config(), LoraSettings(r=4, alpha=8.0, targets=("c_attn", "mlp.c_proj"))
    torch.manual_seed(0)
    model = apply_lora(build_model(config), settings)
    randomize_adapters(model)
    state = model.state_dict()
    assert {"transformer.h.0.attn.c_attn.base_layer.weight", "transformer.h.0.attn.c_attn.base_layer.bias",
            "transformer.h.0.attn.c_attn.lora_A.default.weight", "transformer.h.1.mlp.c_proj.lora_B.default.weight",
            "transformer.h.0.attn.c_proj.weight", "lm_head.weight"} <= set(state)
    torch.manual_seed(1)  # a different init everywhere: everything must come from the checkpoint
    fresh = apply_lora(build_model(config), settings)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(fresh.eval()), logits_of(model.eval()), atol=0, rtol=0)
    assert lora_parameter_count(fresh) == lora_parameter_count(model)


# ----------------------------------------------------------------------------- errors


def test_bad_names_and_states_raise_clear_errors():
    torch.manual_seed(0)
    with pytest.raises(ChoicelmError, match=r"'q_proj' matches no nn.Linear.*transformer.h.0.attn.c_attn"):
        apply_lora(GPT(gpt_config()), LoraSettings(targets=("q_proj",)))
    with pytest.raises(ChoicelmError, match=r"train module 'classifer'.*transformer.h.0.mlp.c_fc"):
        apply_lora(GPT(gpt_config(n_labels=2)), LoraSettings(train_modules=("classifer",)))
    with pytest.raises(ChoicelmError, match="either adapted or trained fully"):
        apply_lora(GPT(gpt_config()), LoraSettings(train_modules=("transformer.h.0.attn",)))
    with pytest.raises(ChoicelmError, match="tied embeddings"):
        apply_lora(GPT(gpt_config()), LoraSettings(targets=("lm_head",)))
    with pytest.raises(ChoicelmError, match="no attention or MLP linear"):
        apply_lora(build_model(ModelConfig(kind="lstm", vocab_size=V, n_layer=1, n_embd=16)), LoraSettings())
    model = apply_lora(GPT(gpt_config()), LoraSettings(r=2))
    with pytest.raises(ChoicelmError, match="already has LoRA adapters"):
        apply_lora(model, LoraSettings(r=2))
    assert "transformer.h.0.attn.c_attn" in default_targets(model)  # a wrapped Linear still counts as a target
