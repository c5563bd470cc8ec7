"""GPT's fast decode step (models/gpt_decode.py) against the module forward it mirrors: fp32 logits to 1e-5 over a
prefill and several decode steps of a left-padded batch, for every layout the model config allows (every MLP kind,
norm, position scheme, bias, grouped-query attention, qk_norm, tied embeddings), and the rule that sends every
other model to the module forward (a config value the step does not implement, MoE, LSTM, training mode, fp16,
hooks, unprepared linears, a classifier)."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from choicelm.core.config import ConfigError, ModelConfig, MoEConfig
from choicelm.generation import GenerationConfig, generate_ids
from choicelm.generation.step import ModuleStep, decode_step
from choicelm.models import GPT, build_model
from choicelm.models import gpt_decode
from choicelm.models.gpt_decode import FusedStep
from choicelm.models.layers import KVCache
from choicelm.models.weight_layout import prepare_for_decoding

V = 100
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")


def allowed(key: str) -> list:
    """The values ModelConfig accepts for `key` in a GPT, read from the config itself (its error names them), so a
    value added to the config joins this matrix without editing it."""
    with pytest.raises(ConfigError) as e:
        ModelConfig(kind="gpt", **{key: "?"})
    names = re.search(r"choose one of (.*)$", str(e.value)).group(1).split(", ")
    ok = []
    for name in names:
        try:
            ModelConfig(kind="gpt", **{key: name})
        except ConfigError:  # allowed for another model kind only (pos=sinusoidal is seq2seq's)
            continue
        ok.append(name)
    return ok


LAYOUTS = list(itertools.product(allowed("mlp"), allowed("norm"), allowed("pos"), (True, False), (0, 2),
                                 (False, True), (True, False)))


def layout_id(layout) -> str:
    mlp, norm, pos, bias, n_kv_head, qk_norm, tie = layout
    return (f"{mlp}-{norm}-{pos}-{'bias' if bias else 'nobias'}-{'gqa' if n_kv_head else 'mha'}"
            f"{'-qknorm' if qk_norm else ''}-{'tied' if tie else 'untied'}")


def tiny_gpt(seed: int = 0, moe: MoEConfig | None = None, **layout) -> GPT:
    """A 2-layer GPT whose biases and norm gains are random too (zero biases and unit gains would hide a
    missing or misplaced one), and whose weights are 10x GPT-2's initialisation: activations then run well into
    their nonlinear range, so a wrong activation (the erf GELU for the tanh one) moves the logits past 1e-5."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0, **layout),
                moe).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(10)
    return model


def left_padded(lengths, seed: int):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    n_pad_B = torch.tensor([L - n for n in lengths])
    ids_BL = torch.randint(1, V, (len(lengths), L), generator=g)
    ids_BL[torch.arange(L)[None, :] < n_pad_B[:, None]] = 0
    return ids_BL, n_pad_B


def compare_steps(model, step, lengths=(3, 7, 5), steps=6, atol=1e-5):
    """Prefill a left-padded batch with the module forward into two caches, then decode `steps` tokens per row with
    `step` on one and the module forward (ModuleStep) on the other: logits and the caches' keys/values agree."""
    ids_BL, n_pad_B = left_padded(lengths, seed=1)
    B, L = ids_BL.shape
    total = L + steps
    mask_BS = torch.arange(total)[None, :] >= n_pad_B[:, None]
    pos_BL = (torch.arange(L)[None, :] - n_pad_B[:, None]).clamp(min=0)
    fast_cache, ref_cache = model.new_kv_cache(B, total), model.new_kv_cache(B, total)
    reference = ModuleStep(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for cache in (fast_cache, ref_cache):
            model(ids_BL, kv_cache=cache, attention_mask_BS=mask_BS[:, :L], position_ids_BT=pos_BL, logits_to_keep=1)
        for cur in range(L, total):
            tok_B = torch.randint(1, V, (B,), generator=g)
            got_BV = step(tok_B, fast_cache, cur, mask_BS[:, :cur + 1], cur - n_pad_B)
            ref_BV = reference(tok_B, ref_cache, cur, mask_BS[:, :cur + 1], cur - n_pad_B)
            torch.testing.assert_close(got_BV, ref_BV, atol=atol, rtol=0)
    torch.testing.assert_close(fast_cache.k[:, :, :, :total], ref_cache.k[:, :, :, :total], atol=atol, rtol=0)
    torch.testing.assert_close(fast_cache.v[:, :, :, :total], ref_cache.v[:, :, :, :total], atol=atol, rtol=0)


# ----------------------------------------------------------------------------- every layout the config allows


@needs_onednn
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_fast_step_equals_the_module_forward_for_every_layout(layout):
    mlp, norm, pos, bias, n_kv_head, qk_norm, tie = layout
    model = prepare_for_decoding(tiny_gpt(mlp=mlp, norm=norm, pos=pos, bias=bias, n_kv_head=n_kv_head,
                                          qk_norm=qk_norm, tie_embeddings=tie))
    implemented = all(value in gpt_decode.IMPLEMENTED[key] for key, value
                      in dict(mlp=mlp, norm=norm, pos=pos, qk_norm=qk_norm).items())
    if not implemented:  # a config value the fast step does not compute: the module forward decodes it
        assert model.fast_decode_step() is None and isinstance(decode_step(model), ModuleStep)
        return
    step = model.fast_decode_step()
    assert isinstance(step, FusedStep) and isinstance(decode_step(model), FusedStep)
    compare_steps(model, step)


def test_the_matrix_covers_the_layouts_the_config_allows():
    assert set(allowed("mlp")) == {"gelu", "swiglu", "silu"}
    assert set(allowed("norm")) == {"layernorm", "rmsnorm"}
    assert set(allowed("pos")) == {"learned", "rope"}
    assert len(LAYOUTS) == 3 * 2 * 2 * 2 * 2 * 2 * 2


@needs_onednn
@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_fast_step_in_bf16_equals_the_module_forward_to_its_rounding(layout):
    kw = dict(mlp="gelu", norm="layernorm", pos="learned") if layout == "gpt2" else \
        dict(mlp="swiglu", norm="rmsnorm", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False)
    model = prepare_for_decoding(tiny_gpt(**kw).to(torch.bfloat16))
    step = model.fast_decode_step()
    assert isinstance(step, FusedStep)
    compare_steps(model, step, atol=5e-2)


# ----------------------------------------------------------------------------- the rule: everything else falls back


@needs_onednn
@pytest.mark.parametrize("key,value", [("mlp", "swiglu"), ("mlp", "gelu"), ("norm", "rmsnorm"), ("pos", "rope"),
                                       ("qk_norm", True)])
def test_a_config_value_the_step_does_not_implement_falls_back(monkeypatch, key, value):
    """Were the step not to implement `value` (as for a kind added to the config later), the model decodes through
    the module forward, with the tokens the fast step gave."""
    layout = dict(mlp="swiglu", norm="rmsnorm", pos="rope", qk_norm=True) if key != "mlp" or value != "gelu" else \
        dict(mlp="gelu", norm="layernorm", pos="learned")
    model = prepare_for_decoding(tiny_gpt(**layout))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked: argmax never hinges on rounding
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    assert isinstance(decode_step(model), FusedStep)
    fused = [c.ids for c in generate_ids(model, prompts, cfg)]
    monkeypatch.setitem(gpt_decode.IMPLEMENTED, key, tuple(v for v in gpt_decode.IMPLEMENTED[key] if v != value))
    assert not FusedStep.supports(model) and model.fast_decode_step() is None
    assert isinstance(decode_step(model), ModuleStep)
    assert [c.ids for c in generate_ids(model, prompts, cfg)] == fused


@needs_onednn
def test_an_activation_without_a_onednn_post_op_falls_back(monkeypatch):
    from choicelm.models import layers

    model = prepare_for_decoding(tiny_gpt(mlp="silu"))
    assert FusedStep.supports(model)
    monkeypatch.setitem(layers.ACTIVATIONS, "silu", layers.Activation(layers.ACTIVATIONS["silu"].fn, None))
    assert not FusedStep.supports(model) and isinstance(decode_step(model), ModuleStep)


@needs_onednn
@pytest.mark.parametrize("case", ["moe", "moe_every_other", "lstm", "training", "fp16", "unprepared", "hook",
                                  "classifier", "subclass"])
def test_models_the_step_does_not_compute_decode_through_the_module_forward(case):
    if case.startswith("moe"):
        model = prepare_for_decoding(tiny_gpt(moe=MoEConfig(experts=4, every=1 if case == "moe" else 2)))
    elif case == "lstm":
        torch.manual_seed(0)
        model = prepare_for_decoding(build_model(ModelConfig(kind="lstm", vocab_size=V, block_size=32, n_layer=2,
                                                             n_embd=32, dropout=0.0)).eval())
        assert not hasattr(model, "fast_decode_step") and isinstance(decode_step(model), ModuleStep)
        return
    else:
        model = prepare_for_decoding(tiny_gpt())
        assert isinstance(decode_step(model), FusedStep)
        if case == "training":
            model.train()
        elif case == "fp16":  # oneDNN post-ops here take fp32 / bf16
            model.to(torch.float16)
        elif case == "unprepared":
            model = tiny_gpt()  # plain nn.Linear
        elif case == "hook":
            model.transformer.h[1].mlp.register_forward_hook(lambda *a: None)
        elif case == "classifier":
            model.add_classifier(3)
            prepare_for_decoding(model)
        elif case == "subclass":
            class Other(GPT):
                def forward(self, *args, **kwargs):
                    return super().forward(*args, **kwargs)
            model.__class__ = Other
    assert model.fast_decode_step() is None and isinstance(decode_step(model), ModuleStep)
    if case not in ("training", "fp16", "classifier"):
        # the fallback is the module forward itself: the same logits as a forward over the whole sequence
        ids_BT = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            cache = model.new_kv_cache(2, 9)
            model(ids_BT[:, :8], kv_cache=cache)
            got = decode_step(model)(ids_BT[:, 8], cache, 8)
            torch.testing.assert_close(got, model(ids_BT).logits[:, -1], atol=1e-5, rtol=0)


def test_kv_cache_rows_share_the_cache_memory():
    """cache.rows(n) is the first n sequences as a KVCache (what the server decodes its running rows on)."""
    cache = KVCache(2, 4, 2, 8, 3)
    view = cache.rows(2)
    assert view.batch_size == 2 and view.max_len == 8 and view.dtype == cache.dtype
    k, v = view.layer(1)
    k[:, :, 3] = 1.0
    v[1] = 2.0
    assert cache.k[1, :2, :, 3].eq(1).all() and cache.k[1, 2:].eq(0).all() and cache.v[1, 1].eq(2).all()
    view.check(2, 8)
    for batch, end in ((3, 8), (2, 9)):
        with pytest.raises(Exception, match="KV cache"):
            view.check(batch, end)
