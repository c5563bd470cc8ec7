"""Configs: YAML + overrides, validation with messages that name the key, help text for every field."""

from dataclasses import fields
from pathlib import Path

import pytest

from choicelm.core.config import SECTIONS, Config, ConfigError, config_help, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_defaults_are_gpt2_small():
    m = Config().model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50304)
    assert (m.norm, m.mlp, m.pos, m.bias, m.tie_embeddings) == ("layernorm", "gelu", "learned", True, True)
    assert m.hidden_size == 3072


def test_overrides_win_over_yaml_and_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["--train.max_steps=7", "--model.bias", "false", "--optim.lr=1e-3"])
    assert cfg.train.max_steps == 7 and cfg.model.bias is False and cfg.optim.lr == 1e-3
    assert cfg.model.n_layer == 2  # from the YAML


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--model.n_layers=3"])
    assert "model.n_layers" in str(e.value) and "did you mean model.n_layer" in str(e.value)
    assert "model.n_embd" in str(e.value)  # lists the valid keys


def test_unknown_section_and_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'.*did you mean train"):
        load_config(bad)
    bad.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="train.max_step"):
        load_config(bad)


@pytest.mark.parametrize("override,message", [
    ("--model.n_layer=x", "must be of type int"),
    ("--model.norm=batchnorm", "choose one of layernorm, rmsnorm"),
    ("--model.n_head=5", "divisible"),
    ("--optim.beta2=1.5", r"optim.beta2=1.5 must be in \[0, 1\)"),
    ("--train.precision=fp8", "choose one of auto, bf16, fp32"),
    ("--train.micro_batch_size=0", "must be > 0"),
    ("--model.dropout=1.0", "dropout"),
])
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "llama-small.yaml", ["--train.max_steps=3"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_field_has_help():
    text = config_help()
    for name, section in SECTIONS.items():
        for f in fields(section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
            assert f"--{name}.{f.name}=" in text


@pytest.mark.parametrize("override", [
    "--optim.lr=.inf", "--optim.lr=.nan", "--optim.lr=-.inf", "--train.max_time=.nan", "--train.max_time=.inf",
    "--model.dropout=.nan", "--model.norm_eps=.nan", "--moe.capacity=.inf", "--moe.threshold_momentum=.nan",
    "--finetune.lora_alpha=.inf", "--finetune.epochs=.nan", "--ngram.k=.nan", "--optim.grad_clip=.inf",
    "--optim.weight_decay=nan", "--optim.beta1=.nan", "--train.peak_flops=1e400", "--optim.eps=.nan",
])
def test_inf_and_nan_are_refused_everywhere(override):
    """nan passes every comparison (`nan < 0` is False), so each float needs an explicit finiteness check."""
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [override])


def test_every_float_field_is_checked_for_finiteness():
    """No float key escapes: each one, set to nan through the YAML path, is refused naming that key."""
    for name, section in SECTIONS.items():
        for f in fields(section):
            if isinstance(f.default, float):
                with pytest.raises(ConfigError, match=rf"{name}\.{f.name}=nan must be a finite number"):
                    Config.from_dict({name: {f.name: float("nan")}})


@pytest.mark.parametrize("override,message", [
    ("--train.max_steps=1e400", "train.max_steps='1e400' is out of range"),
    ("--train.max_steps=.inf", "out of range"),
    ("--train.seed=-1", "train.seed=-1 must be >= 0"),
    ("--train.seed=99999999999999999999999", "out of range"),
    ("--optim.beta2=1.0", r"optim.beta2=1.0 must be in \[0, 1\)"),
    ("--optim.lr=true", "must be of type float"),
    ("--model.n_layer=[1", "must be of type int"),
    ("--train.device=[cpu]", "must be of type str"),
])
def test_out_of_range_values_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_override_without_a_value_does_not_swallow_the_next_flag():
    with pytest.raises(ConfigError, match=r"override --train.max_steps needs a value: --train.max_steps=VALUE"):
        load_config(None, ["--train.max_steps", "--data.path=data"])
    assert load_config(None, ["--train.max_steps", "7"]).train.max_steps == 7


@pytest.mark.parametrize("content,message", [
    (b"- model\n- train\n", "holds a YAML list, not a mapping of sections"),
    (b"42\n", "holds a YAML int"),
    (b"model:\n  n_layer: 2\n  kind: \xff\xfe\n", r"not UTF-8 text \(invalid byte 0xff at byte offset 28\)"),
    (b"{1: 2}\n", "unknown section '1'"),
])
def test_a_config_that_is_not_a_mapping_or_not_utf8_is_one_error(tmp_path, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    for overrides in (None, ["--train.max_steps=3"]):  # with overrides it used to fail merging a list
        with pytest.raises(ConfigError, match=message):
            load_config(bad, overrides)
