"""Hugging Face interop: tiny random HF models built here, converted both ways, checked against HF's own
outputs (logits, tensors, token ids); GPT-2's real BPE checked against tiktoken."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import choicelm
from choicelm.cli import main
from choicelm.core.config import Config, ModelConfig
from choicelm.core.errors import ChoicelmError
from choicelm.interop import ConversionError, from_hf, to_hf
from choicelm.interop.hf import load_hf_tokenizer
from choicelm.interop.tiktoken_bpe import (bytes_to_unicode, read_tiktoken, tiktoken_to_vocab_merges,
                                           write_vocab_merges)
from choicelm.models import build_model
from choicelm.text import Tokenizer
from choicelm.core import checkpoint as ckpt

transformers = pytest.importorskip("transformers")

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "You are all resolved rather to die than to famish? 1234 dollars... naïve café 🎉 中文  \t end  ")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Non-trivial norms and biases, so their names, shapes and transposes are tested too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 300-token byte-level BPE (choicelm's own specials: <|endoftext|> 0, <|pad|> 1, <|mask|> 2)."""
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text(TEXT * 20)
    return Tokenizer.train([corpus], 300)


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    return save_llama_tokenizer(tmp_path_factory.mktemp("llama_tok"))


def save_llama_tokenizer(folder: Path) -> Path:
    """A Llama-style tokenizer saved by transformers into folder: <unk> 0, <s> 1, </s> 2, no pad token."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder)
    return folder


def gpt2_hf(tied: bool = True, vocab_size: int = 320, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_inner=96, vocab_size=vocab_size, n_positions=48, layer_norm_epsilon=1e-4,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)).eval()
    perturb(hf)
    return hf


def llama_hf(tied: bool = False, n_kv_head: int = 2, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, vocab_size=320, max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_theta=5000.0, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
        bos_token_id=1, eos_token_id=2)).eval()
    perturb(hf)
    return hf


def save_hf(hf, folder: Path, tokenizer: Tokenizer | Path) -> Path:
    hf.save_pretrained(folder)
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(folder)
    else:
        for f in tokenizer.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


# ----------------------------------------------------------------------------- import: HF -> choicelm


@pytest.mark.parametrize("tied", [True, False])
def test_import_gpt2_logits_equal_hugging_face(tmp_path, small_tokenizer, tied):
    hf = gpt2_hf(tied=tied)
    if not tied:
        assert hf.lm_head.weight is not hf.transformer.wte.weight
    out = from_hf(save_hf(hf, tmp_path / "hf", small_tokenizer), tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "config.yaml", "model.safetensors", "source.json",
                                                     "tokenizer"]
    lm = choicelm.load(out, device="cpu")
    c = lm.config.model
    assert (c.norm, c.mlp, c.pos, c.bias, c.tie_embeddings, c.hidden_size, c.norm_eps, c.block_size) == \
        ("layernorm", "gelu", "learned", True, tied, 96, 1e-4, 48)
    idx = torch.randint(0, 320, (2, 48))
    torch.testing.assert_close(hf_logits(lm.model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied,n_kv_head,bias", [(False, 2, False), (True, 1, False), (False, 4, True)])
def test_import_llama_logits_equal_hugging_face(tmp_path, llama_tokenizer_dir, tied, n_kv_head, bias):
    hf = llama_hf(tied=tied, n_kv_head=n_kv_head, bias=bias)
    out = from_hf(save_hf(hf, tmp_path / "hf", llama_tokenizer_dir), tmp_path / "ck")
    lm = choicelm.load(out, device="cpu")
    c = lm.config.model
    assert (c.norm, c.mlp, c.pos, c.kv_heads, c.tie_embeddings, c.bias, c.rope_theta, c.norm_eps, c.block_size) == \
        ("rmsnorm", "swiglu", "rope", n_kv_head, tied, bias, 5000.0, 1e-6, 64)
    idx = torch.randint(0, 320, (2, 64))
    torch.testing.assert_close(hf_logits(lm.model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    # the tokenizer keeps its own specials
    tok = lm.tokenizer
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.pad_id_or_eos) == (2, 1, None, 2)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_imported_model_greedy_generation_equals_hf_generate(tmp_path, small_tokenizer, llama_tokenizer_dir, layout):
    hf = gpt2_hf(seed=3) if layout == "gpt2" else llama_hf(seed=3)
    src = save_hf(hf, tmp_path / "hf", small_tokenizer if layout == "gpt2" else llama_tokenizer_dir)
    lm = choicelm.load(from_hf(src, tmp_path / "ck"), device="cpu")
    prompt = "Before we proceed"
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False, pad_token_id=lm.tokenizer.eos_id)[0, ids.shape[1]:]
    assert lm.generate(prompt, max_new_tokens=24, temperature=0, stop_at_eos=False) == lm.tokenizer.decode(ref)


def test_import_reads_pytorch_bin_and_sharded_safetensors(tmp_path, small_tokenizer):
    hf = gpt2_hf()
    idx = torch.randint(0, 320, (1, 16))
    _save_bin(hf, tmp_path / "bin")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    for name in ("bin", "shards"):
        small_tokenizer.save(tmp_path / name)
        lm = choicelm.load(from_hf(tmp_path / name, tmp_path / f"ck-{name}"), device="cpu")
        torch.testing.assert_close(hf_logits(lm.model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)


def _save_bin(hf, folder: Path) -> None:
    """The layout of the Hub's original gpt2 folder: pytorch_model.bin saved from GPT2Model (no "transformer."
    prefix, no lm_head) with the causal-mask buffers h.i.attn.bias / masked_bias in it."""
    folder.mkdir()
    (folder / "config.json").write_text(hf.config.to_json_string())
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    n = hf.config.n_positions
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")


# ----------------------------------------------------------------------------- export: choicelm -> HF


def choicelm_checkpoint(root: Path, tokenizer: Tokenizer, **model) -> tuple[Path, torch.nn.Module]:
    """A checkpoint written by the training code's own writer (not by interop)."""
    torch.manual_seed(1)
    cfg = Config(model=ModelConfig(vocab_size=320, block_size=40, n_layer=2, n_head=4, n_embd=64, **model))
    net = build_model(cfg.model).eval()
    perturb(net)
    tokenizer.save(root / "tok")
    step = ckpt.save_checkpoint(root / "run", 5, net, None, {"step": 5}, yaml.safe_dump(cfg.to_dict()),
                                root / "tok", None)
    return step, net


GPT2_LAYOUT = dict(mlp_hidden=96, norm_eps=1e-4)
LLAMA_LAYOUT = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, mlp_hidden=96,
                    rope_theta=5000.0, norm_eps=1e-6)


@pytest.mark.parametrize("layout,tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_export_hf_logits_equal_choicelm(tmp_path, small_tokenizer, layout, tied):
    kw = {**(GPT2_LAYOUT if layout == "gpt2" else LLAMA_LAYOUT), "tie_embeddings": tied}
    step, net = choicelm_checkpoint(tmp_path, small_tokenizer, **kw)
    out = to_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if layout == "gpt2" else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == tied
    idx = torch.randint(0, 320, (2, 40))
    torch.testing.assert_close(hf_logits(hf, idx), hf_logits(net, idx), atol=1e-5, rtol=0)
    # special tokens: config.json, generation_config.json and the tokenizer all agree with choicelm's
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (hf.config.eos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 0, 1)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (small_tokenizer.eos_id, small_tokenizer.pad_id)
    assert hf_tok.encode(TEXT) == small_tokenizer.encode(TEXT)
    assert hf_tok.decode(small_tokenizer.encode(TEXT)) == TEXT


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_round_trip_from_hf_then_to_hf_gives_identical_tensors(tmp_path, small_tokenizer, llama_tokenizer_dir, layout):
    hf = gpt2_hf(tied=True) if layout == "gpt2" else llama_hf(tied=False, bias=True)
    src = save_hf(hf, tmp_path / "hf", small_tokenizer if layout == "gpt2" else llama_tokenizer_dir)
    to_hf(from_hf(src, tmp_path / "ck"), tmp_path / "back")
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    same = ["architectures", "model_type", "vocab_size", "tie_word_embeddings", "eos_token_id", "bos_token_id"]
    assert {k: a[k] for k in same} == {k: b[k] for k in same}


# ----------------------------------------------------------------------------- GPT-2's real tokenizer


def _gpt2_tiktoken() -> Path:
    spec = importlib.util.find_spec("whisper")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-whisper is not installed (pip install --no-deps openai-whisper)")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "gpt2.tiktoken"


@pytest.fixture(scope="module")
def gpt2_bpe(tmp_path_factory) -> Path:
    """GPT-2's vocab.json + merges.txt, converted from whisper's gpt2.tiktoken."""
    vocab, merges = tiktoken_to_vocab_merges(read_tiktoken(_gpt2_tiktoken()))
    assert len(vocab) == 50257 and len(merges) == 50000 and vocab["<|endoftext|>"] == 50256
    assert merges[:3] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e")]  # the first lines of GPT-2's merges.txt
    return write_vocab_merges(tmp_path_factory.mktemp("gpt2_bpe"), vocab, merges)


def test_bytes_to_unicode_is_gpt2s_alphabet():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], table[0], table[255]) == ("Ġ", "Ċ", "A", "Ā", "ÿ")


def test_converted_gpt2_bpe_gives_real_gpt2_ids(gpt2_bpe, shakespeare_slice):
    tok = load_hf_tokenizer(gpt2_bpe)
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (50256, None, 50257)
    text = shakespeare_slice[0].read_text()[:100_000] + TEXT + " <|endoftext|> x"
    ids = tok.encode(text)
    # Hugging Face's own GPT-2 tokenizer class reading the same files
    hf = transformers.GPT2TokenizerFast.from_pretrained(gpt2_bpe)
    assert hf.encode(text) == ids and hf.decode(ids) == text
    # and OpenAI's tiktoken reading the original ranks (an implementation that never saw our merges)
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(str(_gpt2_tiktoken())),
                            special_tokens={"<|endoftext|>": 50256})
    assert enc.encode(text, allowed_special="all") == ids


def test_import_gpt2_with_real_tokenizer(tmp_path, gpt2_bpe, shakespeare_slice):
    hf = gpt2_hf(vocab_size=50257)
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    transformers.GPT2TokenizerFast.from_pretrained(gpt2_bpe).save_pretrained(hf_dir)  # tokenizer.json + config
    out = from_hf(hf_dir, tmp_path / "ck")
    lm = choicelm.load(out, device="cpu")
    assert (lm.tokenizer.eos_id, lm.tokenizer.pad_id, lm.tokenizer.pad_id_or_eos) == (50256, None, 50256)
    text = shakespeare_slice[1].read_text()[:20_000]
    ids = lm.tokenizer.encode(text)
    for hf_tok in (transformers.AutoTokenizer.from_pretrained(hf_dir),
                   transformers.AutoTokenizer.from_pretrained(out / "tokenizer")):
        assert hf_tok.encode(text) == ids
        assert hf_tok.eos_token_id == 50256 and hf_tok.pad_token_id is None
    idx = torch.tensor([lm.tokenizer.encode("Hello world, said the tiny model.")])
    torch.testing.assert_close(hf_logits(lm.model, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    # a folder with only vocab.json + merges.txt works as the tokenizer too (--tokenizer)
    bare = tmp_path / "bare"
    hf.save_pretrained(bare)
    assert run_cli("convert", "from-hf", bare, tmp_path / "ck2", "--tokenizer", gpt2_bpe) == 0
    assert choicelm.load(tmp_path / "ck2", device="cpu").tokenizer.encode(text) == ids


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_convert_both_ways(tmp_path, small_tokenizer, capsys):
    hf = gpt2_hf()
    src = save_hf(hf, tmp_path / "hf", small_tokenizer)
    assert run_cli("convert", "from-hf", src, tmp_path / "ck") == 0
    assert run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "back") == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    idx = torch.randint(0, 320, (1, 30))
    torch.testing.assert_close(hf_logits(back, idx), hf_logits(hf, idx), atol=1e-5, rtol=0)
    # nothing is overwritten without --overwrite; with it, OUT is replaced whole
    capsys.readouterr()
    assert run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "back") == 2
    err = capsys.readouterr().err
    assert err.startswith("choicelm: error:") and "--overwrite" in err and err.count("\n") == 1
    (tmp_path / "back" / "stale.txt").write_text("old")
    assert run_cli("convert", "to-hf", tmp_path / "ck", tmp_path / "back", "--overwrite") == 0
    assert not (tmp_path / "back" / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert run_cli("convert", "to-arpa", tmp_path / "ck", tmp_path / "lm.arpa") == 2
    assert "not an n-gram checkpoint" in capsys.readouterr().err


def _hf_dir_with(tmp_path: Path, small_tokenizer, edit) -> Path:
    src = save_hf(gpt2_hf(), tmp_path / "hf", small_tokenizer)
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(architectures=["T5ForConditionalGeneration"], model_type="t5"),
     "T5ForConditionalGeneration is not supported; choicelm converts GPT2LMHeadModel, LlamaForCausalLM, BertModel"),
    (lambda c: c.update(activation_function="relu"), "activation_function='relu' is not supported"),
    (lambda c: c.update(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True is not"),
    (lambda c: c.update(n_layer=3), r"do not match its config.json \(GPT2LMHeadModel\): missing \['transformer.h.2"),
    (lambda c: c.update(n_layer=1), r"missing \[\], unexpected \['transformer.h.1"),
    (lambda c: c.update(n_embd=32), r"transformer.h.0.attn.c_attn.bias has shape \(192,\), the config implies "
                                    r"\(96,\)"),
])
def test_import_refuses_what_it_cannot_convert(tmp_path, small_tokenizer, edit, message):
    src = _hf_dir_with(tmp_path, small_tokenizer, edit)
    with pytest.raises(ConversionError, match=message):
        from_hf(src, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "holds a JSON array where a JSON object"),
    (b'"GPT2LMHeadModel"', "holds a JSON string where a JSON object"),
    (b"null", "holds a JSON null where a JSON object"),
    (b"12", "holds a JSON number where a JSON object"),
    (b'{"architectures": ["GPT2LMHeadModel"],', "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b'{"model_type": "gpt2", "n_embd": "\xff\xfe"}', r"is not UTF-8 text \(invalid start byte at byte 34\)"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
], ids=["list", "string", "null", "number", "truncated", "empty", "latin-1", "deep"])
def test_import_refuses_a_config_json_that_is_not_a_json_object_in_one_line(tmp_path, small_tokenizer, capsys,
                                                                            content, message):
    """Issue 18 item 8: a config.json that is a list, not an object, not JSON or not UTF-8 is one clear line (exit
    2), never a traceback, and nothing is written."""
    src = save_hf(gpt2_hf(), tmp_path / "hf", small_tokenizer)
    (src / "config.json").write_bytes(content)
    with pytest.raises(ConversionError, match=message):
        from_hf(src, tmp_path / "ck")
    capsys.readouterr()
    assert run_cli("convert", "from-hf", src, tmp_path / "ck") == 2
    err = capsys.readouterr().err
    assert err.startswith("choicelm: error:") and "config.json" in err and err.count("\n") == 1, err
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("names", [{"architectures": "GPT2LMHeadModel"}, {"architectures": {"0": "GPT2LMHeadModel"}},
                                   {"architectures": [["GPT2LMHeadModel"]]}, {"model_type": ["gpt2"]}])
def test_import_refuses_architectures_that_name_no_class(tmp_path, small_tokenizer, names):
    src = _hf_dir_with(tmp_path, small_tokenizer, lambda c: (c.pop("architectures"), c.update(names)))
    with pytest.raises(ConversionError, match="do not name a model class; expected e.g."):
        from_hf(src, tmp_path / "ck")


def test_import_refuses_a_sharded_index_without_a_weight_map(tmp_path, small_tokenizer):
    src = save_hf(gpt2_hf(), tmp_path / "hf", small_tokenizer)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    index = src / "model.safetensors.index.json"
    for content, message in [(b"[]", "holds a JSON array where a JSON object"),
                             (b'{"metadata": {}}', "has no weight_map object"),
                             (b'{"weight_map": {"wte.weight": 3}}', "has no weight_map object")]:
        index.write_bytes(content)
        with pytest.raises(ConversionError, match=message):
            from_hf(src, tmp_path / "ck")
    index.write_text(json.dumps({"weight_map": {"wte.weight": "model-00001-of-00001.safetensors"}}))
    from_hf(src, tmp_path / "ck")  # the same folder with a good index converts


def test_import_refuses_llama_variants_and_missing_files(tmp_path, small_tokenizer, llama_tokenizer_dir):
    src = save_hf(llama_hf(), tmp_path / "hf", llama_tokenizer_dir)
    config = json.loads((src / "config.json").read_text())
    for change, message in [({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                             "rope type 'llama3' is not supported"),
                            ({"attention_bias": True}, "mlp_bias=False is not supported"),
                            ({"head_dim": 32}, "head_dim=32")]:
        (src / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConversionError, match=message):
            from_hf(src, tmp_path / "ck")
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="holds no tokenizer .* --tokenizer"):
        from_hf(src, tmp_path / "ck")
    (src / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="holds no weights"):
        from_hf(src, tmp_path / "ck", tokenizer=llama_tokenizer_dir)
    with pytest.raises(ConversionError, match="does not exist"):
        from_hf(tmp_path / "nope", tmp_path / "ck")
    big = save_hf(gpt2_hf(vocab_size=100), tmp_path / "small-vocab", small_tokenizer)
    with pytest.raises(ConversionError, match="300 tokens but the model only 100"):
        from_hf(big, tmp_path / "ck")
    with pytest.raises(ConversionError, match="would replace the input"):
        from_hf(big, big, overwrite=True)


@pytest.mark.parametrize("model,moe,message", [
    (dict(bias=False), None, "has no Hugging Face equivalent; GPT2LMHeadModel needs .*bias=true"),
    (dict(norm="rmsnorm"), None, r"norm=rmsnorm, mlp=gelu, pos=learned.* has no Hugging Face equivalent"),
    (dict(n_kv_head=2), None, "n_kv_head=0"),
    (dict(mlp="swiglu"), None, "LlamaForCausalLM needs norm=rmsnorm, mlp=swiglu, pos=rope"),
    ({}, {"experts": 4}, "Mixture-of-Experts model .* has no Hugging Face equivalent"),
])
def test_export_refuses_layouts_hf_cannot_represent(tmp_path, small_tokenizer, model, moe, message):
    raw = {"model": dict(vocab_size=320, block_size=40, n_layer=2, n_head=4, n_embd=64, **model)}
    if moe is not None:
        if "moe" not in Config.__dataclass_fields__:
            pytest.skip("this choicelm has no moe config section yet")
        raw["moe"] = moe
    step = tmp_path / "ckpt"
    step.mkdir()
    (step / "config.yaml").write_text(yaml.safe_dump(raw))  # refused before any weights are read
    (step / ckpt.MARKER).write_text(json.dumps({"step": 1, "val_loss": None}))
    with pytest.raises(ChoicelmError, match=message):
        to_hf(step, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_importing_choicelm_interop_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, choicelm.interop, choicelm.cli; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tokenizer_special_roles_come_from_tokenizer_config(tmp_path, llama_tokenizer_dir, small_tokenizer):
    tok = Tokenizer.load(llama_tokenizer_dir)  # saved by transformers: bos <s>, eos </s>, no pad
    assert tok.special_tokens == {"eos": "</s>", "bos": "<s>"}
    assert (tok.eos_id, tok.eot_id, tok.bos_id, tok.pad_id, tok.mask_id, tok.pad_id_or_eos) == (2, 2, 1, None, None, 2)
    assert Tokenizer.load(tok.save(tmp_path / "again")).special_tokens == tok.special_tokens  # survives save/load
    assert (small_tokenizer.eos_id, small_tokenizer.pad_id, small_tokenizer.pad_id_or_eos) == (0, 1, 1)
    bad = tmp_path / "bad"
    tok.save(bad)
    config = json.loads((bad / "tokenizer_config.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "</nope>"}}))
    with pytest.raises(ChoicelmError, match="eos token '</nope>' is not in the vocabulary"):
        Tokenizer.load(bad)
