"""`from_hf` for encoders and encoder-decoders: tiny random Hugging Face BERT (BertModel, BertForMaskedLM,
BertForPreTraining, BertForSequenceClassification) and MarianMTModel folders built here with transformers,
converted, loaded with `choicelm.load`, and checked against transformers' own outputs (hidden states, MLM and
class logits, translation logits, greedy generation) and its own BERT tokenizer (ids, special tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import choicelm
from choicelm.cli import main
from choicelm.core.errors import ChoicelmError
from choicelm.data.tasks import decoder_start_id
from choicelm.generation import GenerationConfig
from choicelm.generation.seq2seq import generate_seq2seq
from choicelm.interop import ConversionError, from_hf, to_hf
from choicelm.interop.hf import load_hf_tokenizer

from test_bert import randomize

transformers = pytest.importorskip("transformers")

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are "
        "all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius "
        "Marcius is chief enemy to the people. ")
TEXTS = ["hear me speak", "you are all resolved", "first, you know the people!"]
BERT_VOCAB, MARIAN_VOCAB = 128, 96
PAD, EOS = 0, 1  # the Marian test tokenizer's <pad> and </s>; Marian starts decoding with the pad token


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def copy_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ----------------------------------------------------------------------------- BERT


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory) -> Path:
    """A WordPiece tokenizer as BERT's, saved by transformers: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4."""
    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hf.train_from_iterator([TEXT] * 20, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials,
                                                                  show_progress=False))
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, hf.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    assert hf.get_vocab_size() <= BERT_VOCAB
    folder = tmp_path_factory.mktemp("bert_tok")
    transformers.BertTokenizerFast(tokenizer_object=hf).save_pretrained(folder)
    return folder


def bert_dir(root: Path, arch: str, tokenizer_dir: Path, seed: int = 0, **config) -> tuple[torch.nn.Module, Path]:
    base = dict(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=24, type_vocab_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    hf = randomize(getattr(transformers, arch)(transformers.BertConfig(**{**base, **config})), seed)
    folder = root / f"hf-{arch}"
    hf.save_pretrained(folder)
    copy_files(tokenizer_dir, folder)
    return hf, folder


def padded_batch(seed: int = 0):
    """ids, attention mask (rows with 0, 4 and 8 padded positions) and token types (two segments per row)."""
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(5, BERT_VOCAB, (3, 12), generator=g)
    mask_BT = torch.ones(3, 12, dtype=torch.long)
    mask_BT[1, 8:] = 0
    mask_BT[2, 4:] = 0
    ids_BT = ids_BT.masked_fill(mask_BT == 0, 0)
    tt_BT = torch.zeros(3, 12, dtype=torch.long)
    tt_BT[:, 5:] = 1
    return ids_BT, mask_BT, tt_BT


@pytest.mark.parametrize("arch,tied", [("BertForMaskedLM", True), ("BertForMaskedLM", False),
                                       ("BertForPreTraining", True), ("BertModel", True)])
def test_bert_import_matches_hugging_face(tmp_path, bert_tokenizer_dir, arch, tied):
    hf, src = bert_dir(tmp_path, arch, bert_tokenizer_dir, seed=1, tie_word_embeddings=tied)
    out = from_hf(src, tmp_path / "ck")
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "config.yaml", "model.safetensors", "source.json",
                                                     "tokenizer"]
    lm = choicelm.load(out, device="cpu")
    c = lm.config.model
    assert (c.kind, c.n_labels, c.tie_embeddings, c.n_layer, c.n_embd, c.block_size, c.norm_eps) == \
        ("bert", 0, tied, 2, 32, 24, 1e-12)
    ids_BT, mask_BT, tt_BT = padded_batch(seed=2)
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT, output_hidden_states=True)
        h_BTD = lm.model.encode(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT)
        logits = lm.model(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT).logits
    torch.testing.assert_close(h_BTD, ref.hidden_states[-1], atol=1e-5, rtol=0)
    source = json.loads((out / "source.json").read_text())
    assert source["architecture"] == arch
    if arch == "BertModel":  # no MLM head to compare: it is initialised, and recorded as such
        assert source["initialised"] == ["lm_head.bias", "mlm_head.dense.bias", "mlm_head.dense.weight",
                                         "mlm_head.ln.bias", "mlm_head.ln.weight"]
        assert source["dropped"] == ["pooler.dense.bias", "pooler.dense.weight"]
        return
    reference = ref.logits if arch == "BertForMaskedLM" else ref.prediction_logits
    assert reference.abs().max() > 1.0  # not a trivial comparison
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    if arch == "BertForPreTraining":  # with its pooler and next-sentence head
        assert lm.config.model.nsp and "dropped" not in source
        with torch.no_grad():
            nsp = lm.model(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT).nsp_logits
        torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-5, rtol=0)
    else:
        assert "dropped" not in source and "initialised" not in source


def test_bert_classifier_import_keeps_head_and_label_names(tmp_path, bert_tokenizer_dir):
    names = ["negative", "neutral", "positive"]
    hf, src = bert_dir(tmp_path, "BertForSequenceClassification", bert_tokenizer_dir, seed=3,
                       id2label=dict(enumerate(names)))
    out = from_hf(src, tmp_path / "ck")
    assert json.loads((out / "labels.json").read_text()) == {"labels": names}
    lm = choicelm.load(out, device="cpu")
    assert lm.config.model.n_labels == 3 and lm.labels == names and lm.is_classifier
    ids_BT, mask_BT, tt_BT = padded_batch(seed=4)
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT).logits
        logits = lm.model(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT).logits
    assert logits.shape == (3, 3) and ref.abs().max() > 0.5
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    # end to end from text: choicelm's tokenizer and [CLS] text [SEP] framing against transformers' own tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        probs = hf(**hf_tok(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1)
    for (label, ours), want in zip(lm.classify(TEXTS, return_probs=True), probs.tolist()):
        assert label == names[max(range(3), key=want.__getitem__)]
        assert [ours[n] for n in names] == pytest.approx(want, abs=1e-5)


def test_bert_tokenizer_roles_and_ids_match_transformers(tmp_path, bert_tokenizer_dir):
    hf_tok = transformers.AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    tok = load_hf_tokenizer(bert_tokenizer_dir)
    assert tok.special_tokens == {"eos": "[SEP]", "bos": "[CLS]", "pad": "[PAD]", "mask": "[MASK]"}
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.mask_id) == \
        (hf_tok.sep_token_id, hf_tok.cls_token_id, hf_tok.pad_token_id, hf_tok.mask_token_id)
    for text in TEXTS + ["Caius Marcius, café 🎉 zebra"]:  # unseen characters become [UNK] on both sides
        assert tok.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert [tok.bos_id, *tok.encode(text), tok.eos_id] == hf_tok(text)["input_ids"]
    assert hf_tok.unk_token_id in tok.encode("🎉")
    # the roles survive the conversion's save and choicelm.load; fixed-length padding and truncation in the
    # tokenizer.json (as all-MiniLM-L6-v2's, 128) are switched off, as transformers does
    _, src = bert_dir(tmp_path, "BertForMaskedLM", bert_tokenizer_dir)
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["padding"] = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "[PAD]"}
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    lm = choicelm.load(from_hf(src, tmp_path / "ck"), device="cpu")
    assert lm.tokenizer.special_tokens == tok.special_tokens
    assert [lm.tokenizer.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert max(len(tok.encode(t)) for t in TEXTS) > 3 and min(len(tok.encode(t)) for t in TEXTS) < 8


@pytest.mark.parametrize("arch,change,message", [
    ("BertForMaskedLM", {"position_embedding_type": "relative_key"},
     "position_embedding_type='relative_key' is not supported"),
    ("BertForMaskedLM", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("BertForMaskedLM", {"is_decoder": True}, "is_decoder=true is not supported"),
    ("BertForMaskedLM", {"num_hidden_layers": 3}, "do not match config.json's BertForMaskedLM: .*lacks encoder "
                                                  "tensors: h.2"),
    ("BertForMaskedLM", {"hidden_size": 48}, r"do not match config.json's BertForMaskedLM: embeddings.* has shape "
                                             r"\((128, )?32,?\), the config implies \((128, )?48,?\)"),
    ("BertForSequenceClassification", {"problem_type": "multi_label_classification"},
     "problem_type='multi_label_classification' is not supported"),
    ("BertForSequenceClassification", {"id2label": {"0": "score"}}, r"num_labels=1 \(regression\) is not supported"),
    ("BertForSequenceClassification", {"id2label": {"0": "a", "2": "c"}}, "id2label names no class 1"),
    ("BertForMaskedLM", {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"},
     "T5ForConditionalGeneration is not supported; choicelm converts GPT2LMHeadModel, LlamaForCausalLM, BertModel, "
     "BertForMaskedLM, BertForPreTraining, BertForSequenceClassification and MarianMTModel"),
])
def test_bert_import_refuses_what_it_cannot_represent(tmp_path, bert_tokenizer_dir, arch, change, message):
    _, src = bert_dir(tmp_path, arch, bert_tokenizer_dir)
    edit_config(src, **change)
    with pytest.raises(ConversionError, match=message):
        from_hf(src, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_converted_encoder_does_not_export_back(tmp_path, bert_tokenizer_dir):
    _, src = bert_dir(tmp_path, "BertForMaskedLM", bert_tokenizer_dir)
    with pytest.raises(ChoicelmError, match="model.kind=bert has no Hugging Face equivalent"):
        to_hf(from_hf(src, tmp_path / "ck"), tmp_path / "back")


# ----------------------------------------------------------------------------- Marian


@pytest.fixture(scope="module")
def marian_tokenizer_dir(tmp_path_factory) -> Path:
    """A small BPE saved by transformers as Marian's ids need: <pad> 0, </s> 1, <unk> 2; no bos."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            show_progress=False))
    assert hf.get_vocab_size() <= MARIAN_VOCAB
    folder = tmp_path_factory.mktemp("marian_tok")
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(folder)
    return folder


def marian_dir(root: Path, seed: int = 0, shared: bool = True, tied: bool = True,
               act: str = "gelu_new") -> tuple[torch.nn.Module, Path]:
    """A random MarianMTModel with choicelm's layout (tanh GELU or swish, scaled embeddings), saved without a
    tokenizer, as a Marian folder is as far as choicelm can tell (its SentencePiece files are unreadable here)."""
    torch.manual_seed(seed)
    hf = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=MARIAN_VOCAB if shared else MARIAN_VOCAB + 8, decoder_vocab_size=MARIAN_VOCAB, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function=act, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=PAD, forced_eos_token_id=None, scale_embedding=True,
        share_encoder_decoder_embeddings=shared, tie_word_embeddings=tied)).eval()
    if shared and not tied:  # transformers 5 unties every embedding then; share the input ones as Marian means
        hf.model.encoder.embed_tokens = hf.model.decoder.embed_tokens = hf.model.shared
    with torch.no_grad():  # sharper distributions (no near-ties in greedy), non-trivial norms and biases
        for emb in {hf.model.encoder.embed_tokens, hf.model.decoder.embed_tokens, hf.lm_head}:
            emb.weight.mul_(20.0)
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder = root / "hf-marian"
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.parametrize("shared,tied,act", [(True, True, "swish"), (False, True, "gelu_new"),
                                             (True, False, "gelu_new")])
def test_marian_import_logits_and_greedy_generation_match_hugging_face(tmp_path, marian_tokenizer_dir, shared, tied,
                                                                       act):
    """swish is what the released opus-mt models use."""
    hf, src = marian_dir(tmp_path, seed=1, shared=shared, tied=tied, act=act)
    lm = choicelm.load(from_hf(src, tmp_path / "ck", tokenizer=marian_tokenizer_dir), device="cpu")
    c = lm.config.model
    assert (c.kind, c.pos, c.norm_placement, c.src_vocab_size, c.tie_embeddings, c.mlp) == \
        ("seq2seq", "sinusoidal", "post", 0 if shared else MARIAN_VOCAB + 8, tied, "silu" if act == "swish" else "gelu")
    tok = lm.tokenizer
    assert (tok.eos_id, tok.pad_id, tok.bos_id, decoder_start_id(tok)) == (EOS, PAD, None, PAD)

    g = torch.Generator().manual_seed(2)
    src_BS = torch.randint(3, MARIAN_VOCAB, (3, 10), generator=g)
    mask_BS = torch.ones(3, 10, dtype=torch.long)
    mask_BS[1, 7:] = 0
    mask_BS[2, 3:] = 0
    src_BS = src_BS.masked_fill(mask_BS == 0, PAD)
    tgt_in_BT = torch.cat([torch.full((3, 1), PAD), torch.randint(3, MARIAN_VOCAB, (3, 7), generator=g)], dim=1)
    with torch.no_grad():
        ref = hf(input_ids=src_BS, attention_mask=mask_BS, decoder_input_ids=tgt_in_BT).logits
        logits = lm.model(src_BS, tgt_in_BT, src_mask_BS=mask_BS).logits
    assert ref.abs().max() > 5.0
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)

    sources = [tok.encode(t) for t in TEXTS]
    cfg = GenerationConfig(max_new_tokens=9, temperature=0, eos_token_id=EOS)
    ours = generate_seq2seq(lm.model, sources, cfg, start_id=decoder_start_id(tok), pad_id=tok.pad_id_or_eos)
    def hf_greedy(source):
        with torch.no_grad():
            want = hf.generate(torch.tensor([source]), attention_mask=torch.ones(1, len(source), dtype=torch.long),
                               max_new_tokens=9, num_beams=1, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                               decoder_start_token_id=PAD, forced_eos_token_id=None, bad_words_ids=None,
                               min_length=0)[0].tolist()[1:]  # without the decoder start token
        return want[:want.index(EOS)] if EOS in want else want

    for text, source, comp in zip(TEXTS, sources, ours):
        want = hf_greedy(source)
        assert len(want) > 2 and comp.ids == want
        # choicelm.load's API ends the source with EOS, as Marian's tokenizer does
        assert lm.generate(text, max_new_tokens=9, temperature=0) == tok.decode(hf_greedy(source + [EOS]))


def test_marian_needs_a_tokenizer_json(tmp_path, marian_tokenizer_dir, capsys):
    _, src = marian_dir(tmp_path)
    with pytest.raises(ConversionError, match="a Marian tokenizer is SentencePiece .* pass --tokenizer DIR"):
        from_hf(src, tmp_path / "ck")
    (src / "source.spm").write_bytes(b"\0")  # what a real Marian folder holds: unreadable here
    with pytest.raises(ConversionError, match="has no tokenizer.json: a Marian tokenizer is SentencePiece"):
        from_hf(src, tmp_path / "ck", tokenizer=src)
    assert not (tmp_path / "ck").exists()
    capsys.readouterr()
    assert run_cli("convert", "from-hf", src, tmp_path / "ck") == 2
    err = capsys.readouterr().err
    assert "--tokenizer DIR" in err and err.count("\n") == 1
    assert run_cli("convert", "from-hf", src, tmp_path / "ck", "--tokenizer", marian_tokenizer_dir) == 0
    assert choicelm.load(tmp_path / "ck", device="cpu").config.model.kind == "seq2seq"


@pytest.mark.parametrize("change,message", [
    ({"activation_function": "relu"}, "Marian activation_function='relu' is not supported"),
    ({"scale_embedding": False}, "Marian scale_embedding=false is not supported"),
    ({"decoder_attention_heads": 2}, "encoder_attention_heads=4 but decoder_attention_heads=2 is not supported"),
    ({"decoder_vocab_size": 50}, "share_encoder_decoder_embeddings=true with decoder_vocab_size=50 != vocab_size=96"),
    ({"eos_token_id": 2}, "the tokenizer's end-of-text token '</s>' is id 1 but config.json's eos_token_id is 2"),
    ({"decoder_start_token_id": 2}, r"\(here id 0\), but config.json's decoder_start_token_id is 2"),
])
def test_marian_import_refuses_what_it_cannot_represent(tmp_path, marian_tokenizer_dir, change, message):
    _, src = marian_dir(tmp_path)
    edit_config(src, **change)
    with pytest.raises(ConversionError, match=message):
        from_hf(src, tmp_path / "ck", tokenizer=marian_tokenizer_dir)
    assert not (tmp_path / "ck").exists()


def test_marian_import_refuses_a_foreign_tokenizer_and_unshared_embeddings(tmp_path, marian_tokenizer_dir,
                                                                           bert_tokenizer_dir):
    _, src = marian_dir(tmp_path)
    with pytest.raises(ConversionError, match=f"the tokenizer has 1.. tokens but the model only {MARIAN_VOCAB} "
                                              f"embeddings; pass the model's own tokenizer"):
        from_hf(src, tmp_path / "ck", tokenizer=bert_tokenizer_dir)
    # transformers 5 unties every embedding when tie_word_embeddings=false, even "shared" ones: three tables
    weights = load_file(str(src / "model.safetensors"))
    weights["model.encoder.embed_tokens.weight"] = weights["model.shared.weight"] + 1.0
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="share_encoder_decoder_embeddings=true but "
                                              "model.encoder.embed_tokens.weight differs from model.shared.weight"):
        from_hf(src, tmp_path / "ck", tokenizer=marian_tokenizer_dir)
    assert not (tmp_path / "ck").exists()


def test_marian_import_refuses_a_final_logits_bias(tmp_path, marian_tokenizer_dir):
    _, src = marian_dir(tmp_path)
    weights = load_file(str(src / "model.safetensors"))
    weights["final_logits_bias"][0, 5] = 1.0
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="final_logits_bias is not zero"):
        from_hf(src, tmp_path / "ck", tokenizer=marian_tokenizer_dir)


def test_fine_tuning_starts_from_an_imported_bert(tmp_path, bert_tokenizer_dir):
    """An imported BERT reads a classification text as transformers' tokenizer prepares it ([CLS] text [SEP])
    and fine-tunes from the converted folder."""
    from choicelm.core.config import load_config
    from choicelm.data.tasks import classification_ids
    from choicelm.finetune.run import finetune

    _, folder = bert_dir(tmp_path, "BertModel", bert_tokenizer_dir)
    ckpt = from_hf(folder, tmp_path / "ck")
    hf_tok = transformers.AutoTokenizer.from_pretrained(bert_tokenizer_dir)
    tok = choicelm.load(ckpt).tokenizer
    for text in TEXTS:
        assert classification_ids(tok, text, "bert", 24) == hf_tok(text)["input_ids"]
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"\"{t}\",{'a' if i % 2 else 'b'}\n" for i, t in enumerate(TEXTS * 4)))
    out = finetune(load_config(None, ["--finetune.task=classify", f"--finetune.init={ckpt}",
                                      f"--finetune.train_file={train}", "--train.max_steps=2",
                                      "--train.micro_batch_size=4", "--train.progress=false",
                                      "--train.precision=fp32"]), tmp_path / "cls")
    lm = choicelm.load(out)
    assert lm.labels == ["a", "b"] and lm.classify(TEXTS[0]) in ("a", "b")


def test_tokenizer_load_reads_a_raw_bert_folder(tmp_path, bert_tokenizer_dir):
    """Without conversion: [SEP] is the end of text, [CLS] the start, and a tokenizer.json that pads to a fixed
    length (as all-MiniLM's does) encodes just the text, as transformers does."""
    from tokenizers import Tokenizer as HFTokenizer

    from choicelm.text import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    copy_files(bert_tokenizer_dir, folder)
    padded = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    padded.enable_padding(length=32)
    padded.save(str(folder / "tokenizer.json"))
    tok = Tokenizer.load(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.eos_id, tok.bos_id) == (hf_tok.sep_token_id, hf_tok.cls_token_id)
    assert tok.encode(TEXTS[1]) == hf_tok(TEXTS[1], add_special_tokens=False)["input_ids"]
