"""Mixtral through the Hugging Face interop path: tiny random MixtralForCausalLM models built here, converted
both ways, and checked against transformers' own logits (with and without padding), tensors and greedy
generation; the settings neither side can express are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import choicelm
from choicelm.core.config import Config, ModelConfig, MoEConfig
from choicelm.core.errors import ChoicelmError
from choicelm.interop import ConversionError, from_hf, to_hf
from choicelm.models import build_model
from choicelm.models.gpt import MoEBlock
from choicelm.core import checkpoint as ckpt

from test_interop import save_llama_tokenizer

transformers = pytest.importorskip("transformers")

V, D, FW, E = 320, 64, 96, 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Mistral's tokenizer layout is Llama's: <unk> 0, <s> 1, </s> 2, no pad token."""
    return save_llama_tokenizer(tmp_path_factory.mktemp("mistral_tok"))


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Non-trivial norms, and decisive routers (HF's N(0, 0.02) router makes every expert almost equally
    likely, so a 1e-7 difference in the hidden state could flip a choice and the test would measure luck)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * scale)
            elif name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=0.5)


def mixtral_hf(tied: bool = False, seed: int = 0, **config):
    torch.manual_seed(seed)
    settings = dict(hidden_size=D, intermediate_size=FW, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_theta=5000.0, num_local_experts=E, num_experts_per_tok=2, router_aux_loss_coef=0.02,
                    router_jitter_noise=0.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**settings, **config})).eval()
    perturb(hf)
    return hf


def save_hf(hf, folder: Path, tokenizer_dir: Path) -> Path:
    hf.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def logits(model, idx, **kw):
    with torch.no_grad():
        return model(idx, **kw).logits


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ----------------------------------------------------------------------------- import: HF -> choicelm


@pytest.mark.parametrize("tied", [False, True])
def test_import_mixtral_logits_equal_hugging_face(tmp_path, tokenizer_dir, tied):
    hf = mixtral_hf(tied=tied)
    out = from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    m, moe = raw["model"], raw["moe"]
    assert (m["norm"], m["mlp"], m["pos"], m["bias"], m["n_kv_head"], m["tie_embeddings"], m["rope_theta"],
            m["block_size"], m["mlp_hidden"]) == ("rmsnorm", "swiglu", "rope", False, 2, tied, 5000.0, 64, FW)
    assert {k: moe[k] for k in ("experts", "every", "expert_width", "router", "top_k", "renormalize", "dropless",
                                "balance_loss_weight", "z_loss_weight", "shared_expert")} == \
        dict(experts=E, every=1, expert_width=FW, router="token_choice", top_k=2, renormalize=True, dropless=True,
             balance_loss_weight=0.02, z_loss_weight=0.0, shared_expert=False)
    lm = choicelm.load(out, device="cpu")
    assert all(isinstance(b, MoEBlock) for b in lm.model.transformer.h)
    idx = torch.randint(0, V, (2, 64))
    torch.testing.assert_close(logits(lm.model, idx), logits(hf, idx), atol=1e-5, rtol=0)
    assert (lm.tokenizer.eos_id, lm.tokenizer.bos_id) == (2, 1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_imported_balance_loss_equals_hugging_faces(tmp_path, tokenizer_dir, top_k):
    """One layer: choicelm's aux loss equals transformers' router_aux_loss_coef * aux_loss (output_router_logits);
    the checkpoint's balance_loss_weight is router_aux_loss_coef * top_k / n_layer, and exports back unchanged."""
    hf = mixtral_hf(seed=3, num_hidden_layers=1, num_experts_per_tok=top_k)
    out = from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck")
    lm = choicelm.load(out, device="cpu")
    assert lm.model.moe_config.balance_loss_weight == pytest.approx(0.02 * top_k)
    idx = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        want = 0.02 * hf(idx, output_router_logits=True).aux_loss
        got = lm.model(idx).aux_loss
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    back = to_hf(out, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(0.02)


def test_import_mixtral_padded_batch_logits_equal_hugging_face(tmp_path, tokenizer_dir):
    hf = mixtral_hf(seed=1)
    lm = choicelm.load(from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck"), device="cpu")
    torch.manual_seed(2)
    idx = torch.randint(0, V, (3, 20))
    mask = torch.ones_like(idx)
    mask[1, :7] = 0   # left padding, as batched generation makes
    mask[2, 15:] = 0  # right padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token, as HF's generate does
    ours = logits(lm.model, idx, attention_mask_BS=mask, position_ids_BT=pos)
    ref = logits(hf, idx, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)
    # a padded row computes what the same tokens compute alone (HF, unpadded): padding is never routed or attended
    alone = logits(hf, idx[1:2, 7:])
    torch.testing.assert_close(ours[1, 7:], alone[0], atol=1e-5, rtol=0)


def test_import_reads_the_stacked_expert_layout_of_transformers_5(tmp_path, tokenizer_dir):
    """transformers 5.x keeps experts stacked in memory (mlp.experts.gate_up_proj [E, 2F, D], down_proj
    [E, D, F], mlp.gate); a folder saved from that state dict converts as the Hub's per-expert layout does."""
    hf = mixtral_hf(seed=4)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and "model.layers.0.mlp.gate.weight" in state
    folder = save_hf(hf, tmp_path / "hf", tokenizer_dir)
    (folder / "model.safetensors").unlink()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    lm = choicelm.load(from_hf(folder, tmp_path / "ck"), device="cpu")
    idx = torch.randint(0, V, (2, 32))
    torch.testing.assert_close(logits(lm.model, idx), logits(hf, idx), atol=1e-5, rtol=0)


def test_imported_mixtral_greedy_generation_equals_hf_generate(tmp_path, tokenizer_dir):
    hf = mixtral_hf(seed=3)
    lm = choicelm.load(from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck"), device="cpu")
    prompts = ["Before we proceed", "You are all resolved rather to die"]
    expected = []
    for prompt in prompts:  # one prompt at a time: no padding on the reference side
        ids = torch.tensor([lm.tokenizer.encode(prompt)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                          do_sample=False, pad_token_id=lm.tokenizer.eos_id)[0, ids.shape[1]:]
        expected.append(lm.tokenizer.decode(ref))
    assert lm.generate(prompts[0], max_new_tokens=16, temperature=0, stop_at_eos=False) == expected[0]
    # batched: the shorter prompt is left-padded, and padding must not change its routing or attention
    assert lm.generate(prompts, max_new_tokens=16, temperature=0, stop_at_eos=False) == expected


def test_import_sliding_window_becomes_the_block_size(tmp_path, tokenizer_dir, caplog):
    hf = mixtral_hf(seed=5, sliding_window=16)
    with caplog.at_level("WARNING"):
        out = from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck")
    assert "sliding_window=16" in caplog.text
    notes = json.loads((out / "source.json").read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("block_size is sliding_window=16, not max_position_embeddings=64")
    lm = choicelm.load(out, device="cpu")
    assert lm.config.model.block_size == 16
    idx = torch.randint(0, V, (2, 16))
    torch.testing.assert_close(logits(lm.model, idx), logits(hf, idx), atol=1e-5, rtol=0)
    with pytest.raises(ChoicelmError, match="exceeds the model's block size 16"):
        lm.model(torch.randint(0, V, (1, 17)))
    # the window does mask beyond 16 positions in transformers: the cap is needed, not cosmetic
    long = torch.randint(0, V, (1, 40))
    full = mixtral_hf(seed=5)
    assert not torch.allclose(logits(hf, long)[0, -1], logits(full, long)[0, -1], atol=1e-3)


def test_import_router_jitter_is_training_only_and_noted(tmp_path, tokenizer_dir):
    hf = mixtral_hf(seed=6, router_jitter_noise=0.1)
    out = from_hf(save_hf(hf, tmp_path / "hf", tokenizer_dir), tmp_path / "ck")
    assert "router_jitter_noise=0.1 is not kept" in json.loads((out / "source.json").read_text())["notes"][0]
    lm = choicelm.load(out, device="cpu")
    idx = torch.randint(0, V, (2, 24))
    torch.testing.assert_close(logits(lm.model, idx), logits(hf, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}},
     "Mixtral rope type 'linear' is not supported"),
    ({"attention_bias": True}, "Mixtral with attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "Mixtral hidden_act='gelu' is not supported"),
    ({"num_experts_per_tok": 5}, "cannot be converted: moe.top_k=5 exceeds moe.experts=4"),
    ({"num_local_experts": 8}, r"do not match its config.json \(MixtralForCausalLM\): transformer.h.0.mlp.router.weight "
                               r"has shape \(4, 64\), the config implies \(8, 64\)"),
    ({"num_local_experts": None}, "config.json lacks num_local_experts, which a MixtralForCausalLM has"),
])
def test_import_refuses_mixtral_it_cannot_compute_exactly(tmp_path, tokenizer_dir, change, message):
    src = save_hf(mixtral_hf(), tmp_path / "hf", tokenizer_dir)
    edit_config(src, **change)
    with pytest.raises(ConversionError, match=message):
        from_hf(src, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


# ----------------------------------------------------------------------------- export: choicelm -> HF


LLAMA_LAYOUT = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, mlp_hidden=FW,
                    rope_theta=5000.0, norm_eps=1e-6)
MIXTRAL_MOE = dict(experts=E, every=1, expert_width=80, router="token_choice", top_k=2, renormalize=True,
                   dropless=True, balance_loss_weight=0.02, z_loss_weight=0.0)


def choicelm_checkpoint(root: Path, tokenizer_dir: Path, model: dict, moe: dict) -> tuple[Path, torch.nn.Module]:
    """A checkpoint written by the training code's own writer (not by interop)."""
    torch.manual_seed(1)
    cfg = Config(model=ModelConfig(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_embd=D, **model),
                 moe=MoEConfig(**moe))
    net = build_model(cfg.model, cfg.moe).eval()
    perturb(net)
    step = ckpt.save_checkpoint(root / "run", 5, net, None, {"step": 5}, yaml.safe_dump(cfg.to_dict()),
                                tokenizer_dir, None)
    return step, net


@pytest.mark.parametrize("tied,moe", [
    (False, {}),
    (True, dict(top_k=1)),
    (False, dict(dropless=False, capacity=1.0)),  # trained with capacity dropping: evaluated dropless, as Mixtral
])
def test_export_mixtral_logits_equal_choicelm(tmp_path, tokenizer_dir, tied, moe):
    moe = {**MIXTRAL_MOE, **moe}
    _, net = choicelm_checkpoint(tmp_path, tokenizer_dir, {**LLAMA_LAYOUT, "tie_embeddings": tied}, moe)
    out = to_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    c = hf.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.router_aux_loss_coef,
            c.sliding_window, c.tie_word_embeddings, c.rope_parameters["rope_theta"]) == \
        (E, moe["top_k"], 80, pytest.approx(0.02 * 2 / moe["top_k"]), None, tied, 5000.0)  # x n_layer / top_k
    idx = torch.randint(0, V, (2, 40))
    torch.testing.assert_close(logits(hf, idx), logits(net, idx), atol=1e-5, rtol=0)
    assert (transformers.GenerationConfig.from_pretrained(out).eos_token_id, c.bos_token_id) == (2, 1)


def test_round_trip_mixtral_from_hf_then_to_hf_gives_identical_tensors(tmp_path, tokenizer_dir):
    hf = mixtral_hf(seed=7)
    src = save_hf(hf, tmp_path / "hf", tokenizer_dir)
    to_hf(from_hf(src, tmp_path / "ck"), tmp_path / "back")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    same = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
            "router_aux_loss_coef", "rope_parameters", "rms_norm_eps", "max_position_embeddings", "sliding_window",
            "tie_word_embeddings", "eos_token_id", "bos_token_id"]
    assert {k: a[k] for k in same} == {k: b[k] for k in same}


def _checkpoint_config_only(root: Path, model: dict, moe: dict) -> Path:
    raw = {"model": dict(vocab_size=V, block_size=40, n_layer=2, n_head=4, n_embd=D, **model), "moe": moe}
    step = root / "ckpt"
    step.mkdir()
    (step / "config.yaml").write_text(yaml.safe_dump(raw))  # refused before any weights are read
    (step / ckpt.MARKER).write_text(json.dumps({"step": 1, "val_loss": None}))
    return step


@pytest.mark.parametrize("model,moe,message", [
    ({}, dict(router="expert_choice_causal"), r"moe.router=token_choice \(got expert_choice_causal\)"),
    ({}, dict(every=2), r"moe.every=1 \(got 2\)"),
    ({}, dict(shared_expert=True), "moe.shared_expert=false"),
    ({}, dict(renormalize=False), "moe.renormalize=true"),
    (dict(mlp="gelu"), {}, r"norm=rmsnorm, mlp=swiglu, pos=rope \(got rmsnorm, gelu, rope; SwiGLU experts\)"),
    (dict(bias=True), {}, "model.bias=false"),
])
def test_export_refuses_moe_mixtral_cannot_express(tmp_path, model, moe, message):
    step = _checkpoint_config_only(tmp_path, {**LLAMA_LAYOUT, **model}, {**MIXTRAL_MOE, **moe})
    with pytest.raises(ConversionError, match="Mixture-of-Experts model .* has no Hugging Face equivalent unless "
                                              "it is Mixtral's: MixtralForCausalLM needs .*" + message):
        to_hf(step, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_mixtral_is_recognised_by_model_type_and_named_among_the_supported():
    from choicelm.interop.hf import architecture
    from choicelm.models.gpt_hf import MIXTRAL

    assert architecture({"model_type": "mixtral"}) == MIXTRAL  # a config.json without "architectures"
    with pytest.raises(ConversionError, match="MarianMTModel, and the Mixture-of-Experts MixtralForCausalLM$"):
        architecture({"architectures": ["Qwen2MoeForCausalLM"]})
