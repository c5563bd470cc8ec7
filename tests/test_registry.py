"""The model registry (models/registry.py): every kind the config accepts has an entry, and every capability an
entry claims is what the family really does (and what it does not claim, it really cannot do)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from choicelm.api import CountedLanguageModel, LanguageModel
from choicelm.core.config import Config, ConfigError, ModelConfig, MoEConfig
from choicelm.core.errors import ChoicelmError
from choicelm.models import build_model, padding_mask, registry, spec_of
from choicelm.models.registry import SPECS
from choicelm.text import Tokenizer

KINDS = list(SPECS)
BUILT = [k for k in KINDS if SPECS[k].build is not None]
TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def tiny(kind: str, **fields) -> ModelConfig:
    return ModelConfig(**{"kind": kind, "vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32,
                          **fields})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    file = tmp_path_factory.mktemp("text") / "fox.txt"
    file.write_text(TEXT)
    return Tokenizer.train([file], None, kind="char")


def language_model(kind: str, tokenizer: Tokenizer, **fields) -> LanguageModel:
    """A loaded-model object as choicelm.load returns it, for a tiny random model of `kind`."""
    cfg = Config(model=tiny(kind, vocab_size=-(-tokenizer.vocab_size // 64) * 64, **fields))
    if SPECS[kind].counted:
        from choicelm.models.ngram import NGramLM

        lm = NGramLM.fit([tokenizer.encode(TEXT)], order=3, tokenizer=tokenizer, discount_fallback=True)
        return CountedLanguageModel(lm, tokenizer, cfg, Path("."))
    torch.manual_seed(0)
    labels = [f"c{i}" for i in range(fields.get("n_labels", 0))] or None
    return LanguageModel(build_model(cfg.model).eval(), tokenizer, cfg, Path("."), labels)


# ----------------------------------------------------------------------------- the table itself


def test_the_registry_names_exactly_the_kinds_the_config_accepts():
    with pytest.raises(ConfigError) as refused:
        ModelConfig(kind="transformer")
    accepted = str(refused.value).split("choose one of ")[1].split(", ")
    assert sorted(accepted) == sorted(KINDS)
    for kind in KINDS:
        assert registry.get(kind).kind == kind
        assert set(registry.get(kind).sections) <= {f.name for f in dataclasses.fields(Config)}


def test_an_unknown_kind_is_one_error_naming_every_known_one():
    with pytest.raises(ConfigError) as refused:
        registry.get("transformer")
    message = str(refused.value)
    assert message.startswith("model.kind='transformer' is not a known model family; choose one of ")
    assert all(kind in message for kind in KINDS) and "\n" not in message
    with pytest.raises(ChoicelmError, match="Linear is not a choicelm model; the families are GPT, BERT"):
        spec_of(nn.Linear(2, 2))
    assert registry.find(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_its_own_class_and_is_found_again_through_wrappers(kind, tokenizer):
    spec = SPECS[kind]
    if spec.build is None:  # counted: nothing to build, and build_model says so in one line
        assert spec.counted
        with pytest.raises(ConfigError, match=f"model.kind={kind} is counted, not built"):
            build_model(tiny(kind))
        assert spec_of(language_model(kind, tokenizer).model) is spec
        return
    model = build_model(tiny(kind))
    assert type(model) is spec.model_class and not spec.counted
    assert spec_of(model) is spec
    assert spec_of(torch.compile(model)) is spec  # torch.compile's _orig_mod (nothing is compiled until called)
    wrapped = nn.Module()
    wrapped.module = model  # DDP's .module
    assert spec_of(wrapped) is spec


# ----------------------------------------------------------------------------- capabilities, tried for real


@pytest.mark.parametrize("kind", KINDS)
def test_generates_is_what_generates(kind, tokenizer):
    lm = language_model(kind, tokenizer)
    if SPECS[kind].generates:
        text = lm.generate("the quick", max_new_tokens=4, temperature=0, stop_at_eos=False)
        assert isinstance(text, str) and text
    else:
        with pytest.raises(ChoicelmError, match=f"a {kind} model does not generate text"):
            lm.generate("the quick", max_new_tokens=4)


@pytest.mark.parametrize("kind", KINDS)
def test_classifies_is_what_takes_a_classification_head(kind, tokenizer):
    spec = SPECS[kind]
    if not spec.classifies:
        with pytest.raises(ConfigError, match="model.n_labels=3"):
            tiny(kind, n_labels=3)
        return
    lm = language_model(kind, tokenizer, n_labels=3)

    def heads(model):
        return {name for name, child in model.named_children() if any(True for _ in child.parameters())}

    # the modules a classifier has and the language model does not: what LoRA trains in full beside the adapters
    assert heads(lm.model) - heads(build_model(tiny(kind))) == set(spec.classifier_modules)
    label, probs = lm.classify("a lazy dog", return_probs=True)
    assert label in ("c0", "c1", "c2") and sum(probs.values()) == pytest.approx(1.0)
    from choicelm.models.lora import lora_settings

    cfg = Config(model=tiny(kind, n_labels=3))
    cfg.finetune.lora_r = 4
    assert lora_settings(cfg).train_modules == spec.classifier_modules


@pytest.mark.parametrize("kind", [k for k in BUILT if not SPECS[k].encoder_decoder])
def test_encodes_is_what_reads_the_future_and_recurrent_what_carries_a_state(kind):
    """An encoder's first position sees the last token; a decoder's does not. A recurrent model returns its state."""
    spec = SPECS[kind]
    model = build_model(tiny(kind)).eval()
    idx = torch.randint(0, 64, (1, 8))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 64
    with torch.no_grad():
        out, out_changed = model(idx), model(changed)
    first_moved = not torch.allclose(out.logits[0, 0], out_changed.logits[0, 0], atol=1e-6)
    assert first_moved == spec.encodes
    assert (getattr(out, "state", None) is not None) == spec.recurrent
    mask = torch.ones(1, 8, dtype=torch.long)
    assert padding_mask(model, mask) == {("attention_mask_BT" if spec.encodes else "attention_mask_BS"): mask}


@pytest.mark.parametrize("kind", BUILT)
def test_encoder_decoder_is_what_reads_a_source(kind):
    spec = SPECS[kind]
    model = build_model(tiny(kind)).eval()
    src, tgt = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 5))
    if spec.encoder_decoder:
        with torch.no_grad():
            logits = model(src, tgt).logits
            other = src.clone()
            other[0, 0] = (src[0, 0] + 1) % 64
            moved = model(other, tgt).logits
        assert logits.shape == (1, 5, 64) and not torch.allclose(logits, moved)  # the target reads the source
    else:
        assert not hasattr(model, "decode_step") and model(src).logits.shape[:2] == (1, 6)


@pytest.mark.parametrize("kind", BUILT)
def test_moe_is_what_takes_expert_layers(kind):
    spec = SPECS[kind]
    moe = MoEConfig(experts=4, every=1)
    if spec.moe:
        assert len(build_model(tiny(kind), moe).moe_layers()) == 2
    else:
        with pytest.raises(ConfigError, match=f"model.kind={kind} .*; set --moe.experts=0"):
            build_model(tiny(kind), moe)


@pytest.mark.parametrize("kind", KINDS)
def test_servable_is_what_the_server_takes(kind, tokenizer):
    from choicelm.serve import Scheduler

    lm = language_model(kind, tokenizer)
    if SPECS[kind].servable:
        Scheduler(lm, max_batch=2)
    else:
        with pytest.raises(ChoicelmError):
            Scheduler(lm, max_batch=2)


@pytest.mark.parametrize("kind", KINDS)
def test_exportable_is_what_to_hf_writes(kind):
    from choicelm.interop.hf import hf_architecture_for, hf_config_from_model

    spec = SPECS[kind]
    if spec.exportable:
        arch = hf_architecture_for(tiny(kind))  # the default layout is GPT-2's
        assert arch in spec.hf.exports and hf_config_from_model(tiny(kind))["architectures"] == [arch]
    else:
        with pytest.raises(ChoicelmError, match=f"model.kind={kind} has no Hugging Face equivalent"):
            hf_architecture_for(tiny(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_fine_tuning_tasks_fit_what_the_family_does(kind):
    from choicelm.finetune.run import TASKS, check_fit

    spec = SPECS[kind]
    needs = {"classify": spec.classifies, "seq2seq": spec.encoder_decoder,
             "sft": spec.generates and not spec.encoder_decoder and not spec.counted and not spec.recurrent}
    assert set(TASKS) == set(needs)
    for task in TASKS:
        assert (task in spec.tasks) == needs[task], task
        if task in spec.tasks:
            check_fit(task, kind)
        else:
            with pytest.raises(ChoicelmError, match=f"--task {task} does not fit a {kind} model; it needs"):
                check_fit(task, kind)


@pytest.mark.parametrize("kind", BUILT)
def test_embedding_is_the_token_embedding_of_the_input(kind):
    model = build_model(tiny(kind))
    embedding = SPECS[kind].embedding(model)
    assert isinstance(embedding, nn.Embedding) and embedding.num_embeddings == 64
    assert any(p is embedding.weight for p in model.parameters())


# ----------------------------------------------------------------------------- Hugging Face adapters


def test_every_hugging_face_architecture_has_one_family():
    from choicelm.interop import EXPORTABLE, SUPPORTED

    owners = {}
    for spec in SPECS.values():
        if spec.hf is None:
            continue
        assert set(spec.hf.model_types.values()) <= set(spec.hf.architectures)
        assert set(spec.hf.exports) <= set(spec.hf.architectures)
        assert set(spec.hf.moe_architectures) <= set(spec.hf.architectures) and (not spec.hf.moe_architectures
                                                                                 or spec.moe)
        assert (spec.hf.export_architecture is not None) == bool(spec.hf.exports) == spec.exportable
        for arch in spec.hf.architectures:
            assert arch not in owners, f"{arch} is mapped by {owners[arch]} and {spec.kind}"
            owners[arch] = spec.kind
            assert registry.hf_adapter_for(arch) is spec.hf
    assert set(owners) == set(SUPPORTED) and set(EXPORTABLE) <= set(SUPPORTED)


def test_every_adapter_reads_its_architectures_into_its_own_family():
    """A default transformers config of each architecture, made small, becomes a ModelConfig of the family whose
    adapter read it."""
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 n_embd=32, n_layer=2, n_head=2, d_model=32, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                 num_local_experts=4, num_experts_per_tok=2, scale_embedding=True, num_key_value_heads=2,
                 activation_function="gelu_new")  # Marian's default (exact GELU) is refused
    classes = {"GPT2LMHeadModel": "GPT2Config", "LlamaForCausalLM": "LlamaConfig",
               "MixtralForCausalLM": "MixtralConfig", "MarianMTModel": "MarianConfig"}
    classes.update({a: "BertConfig" for a in SPECS["bert"].hf.architectures})
    for spec in SPECS.values():
        for arch in spec.hf.architectures if spec.hf else ():
            hf_config = getattr(transformers, classes[arch])(**small).to_dict()
            hf_config["architectures"] = [arch]
            config = spec.hf.read_config(hf_config, arch)
            assert config.kind == spec.kind, arch
            assert (spec.hf.read_moe(hf_config, arch) is not None) == (arch in spec.hf.moe_architectures), arch
