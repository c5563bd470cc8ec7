"""Adversarial training (FGM / PGD on the input embeddings) as an objective wrapper.

The reference for every check is computed by hand in this file: the test's own forward hook adds an explicit
tensor r (requiring grad) to the embedding output, so dL/de = dL/dr, and the perturbed loss is the model run
with r = delta; PGD is re-done step by step here. Tiny fp32 models, no dropout.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from choicelm.core.config import ModelConfig, MoEConfig
from choicelm.data.pairs import PairDataset
from choicelm.core.errors import ChoicelmError
from choicelm.finetune.adversarial import AdversarialObjective, input_embedding
from choicelm.models import BERT, GPT, LSTMLM, Seq2Seq
from choicelm.objectives import MaskedLM, TruncatedBPTT, causal_lm

from conftest import free_port

V, B, T, D = 64, 3, 8, 32


# ----------------------------------------------------------------------------- models, objectives, batches

def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=D, dropout=0.0)).train()


def lm_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def classify(model, batch):
    """Sequence classification: batch = (ids_BT, attention_mask_BT, labels_B)."""
    ids_BT, mask_BT, labels_B = batch
    out = model(ids_BT, attention_mask_BT=mask_BT, labels_B=labels_B, loss_reduction="sum")
    return out.loss, int((labels_B != -100).sum()), out


def tiny_bert_classifier(seed: int = 0) -> BERT:
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="bert", vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=D, dropout=0.0)
    return BERT(cfg).add_classifier(3).train()


def classify_batch(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(0, V, (B, T), generator=g)
    mask_BT = torch.ones(B, T, dtype=torch.long)
    mask_BT[0, 5:] = 0  # one right-padded row
    return ids_BT, mask_BT, torch.tensor([0, 2, 1])


def seq2seq(model, batch):
    """Teacher-forced seq2seq: batch = (src_BS, src_mask_BS, tgt_in_BT, targets_BT) as data/pairs.PairBatch."""
    src_BS, src_mask_BS, tgt_in_BT, targets_BT = batch
    out = model(src_BS, tgt_in_BT, targets_BT, src_mask_BS=src_mask_BS, loss_reduction="sum")
    return out.loss, int((targets_BT != -100).sum()), out


def tiny_seq2seq(seed: int = 0, **kw) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="seq2seq", vocab_size=16, block_size=32, n_layer=2, n_head=2, n_embd=D, dropout=0.0, **kw)
    return Seq2Seq(cfg).train()


def pair_batch():
    pairs = [([5, 6, 7, 8], [8, 7]), ([9, 3, 4], [4, 3, 9, 10, 11]), ([12, 5, 6, 7, 8, 9], [3])]
    b = PairDataset(pairs, start_id=1, eos_id=2, pad_id=0).collate([0, 1, 2])
    return b.src_BS, b.src_mask_BS, b.tgt_in_BT, b.targets_BT


# ----------------------------------------------------------------------------- the hand reference

@contextlib.contextmanager
def added_to_lookup(embedding: nn.Module, r: torch.Tensor):
    """The test's own perturbation: r added to the embedding's output (its only lookup in these models)."""
    handle = embedding.register_forward_hook(lambda module, inputs, output: output + r)
    try:
        yield
    finally:
        handle.remove()


def hand_loss_and_gradient(model, embedding, objective, batch, r: torch.Tensor):
    """(loss at e + r, dL/de at e + r) with an explicit r requiring grad."""
    r = r.detach().clone().requires_grad_(True)
    with added_to_lookup(embedding, r):
        loss = objective(model, batch)[0]
    (g,) = torch.autograd.grad(loss, r)
    return loss.detach(), g


def hand_parameter_gradients(model, embedding, objective, batch, r: torch.Tensor | None) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with added_to_lookup(embedding, r) if r is not None else contextlib.nullcontext():
        objective(model, batch)[0].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def row_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1).double(), dim=1)


def hand_fgm_delta(g: torch.Tensor, epsilon: float) -> torch.Tensor:
    return epsilon * g / row_norms(g).float().view(-1, 1, 1)


def embedding_shape(batch_ids: torch.Tensor) -> tuple[int, ...]:
    return (*batch_ids.shape, D)


# ----------------------------------------------------------------------------- contract

def test_eval_mode_is_exactly_the_wrapped_objective():
    model, batch = tiny_gpt().eval(), lm_batch()
    calls = []

    def counted(m, b):
        calls.append(1)
        return causal_lm(m, b)

    adversarial = AdversarialObjective(counted, "fgm", epsilon=1.0)
    loss, n_valid, _ = adversarial(model, batch)
    expected_loss, expected_n, _ = causal_lm(model, batch)
    assert torch.equal(loss, expected_loss) and n_valid == expected_n and len(calls) == 1
    assert not input_embedding(model)._forward_hooks


def test_input_embedding_finds_the_token_embedding_of_every_family_and_through_wrappers():
    gpt, bert = tiny_gpt(), tiny_bert_classifier()
    lstm = LSTMLM(ModelConfig(kind="lstm", vocab_size=V, n_layer=1, n_embd=D))
    shared, separate = tiny_seq2seq(), tiny_seq2seq(src_vocab_size=16)
    assert input_embedding(gpt) is gpt.transformer.wte
    assert input_embedding(bert) is bert.embeddings.wte
    assert input_embedding(lstm) is lstm.embed
    assert input_embedding(separate) is separate.encoder.wte  # the source side
    assert input_embedding(shared) is shared.decoder.wte  # one embedding for source and target
    assert input_embedding(torch.compile(gpt)) is gpt.transformer.wte  # torch.compile's _orig_mod (not compiled here)
    with pytest.raises(ChoicelmError, match="does not know where Linear"):
        input_embedding(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- FGM against the hand computation

def test_fgm_delta_loss_and_gradients_match_the_hand_computation():
    model, batch, epsilon = tiny_gpt(), lm_batch(), 0.5
    wte = model.transformer.wte
    clean_loss, g = hand_loss_and_gradient(model, wte, causal_lm, batch, torch.zeros(embedding_shape(batch[0])))
    delta = hand_fgm_delta(g, epsilon)
    perturbed_loss, _ = hand_loss_and_gradient(model, wte, causal_lm, batch, delta)
    expected_grads = [(a + b) / 2 for a, b in zip(hand_parameter_gradients(model, wte, causal_lm, batch, None),
                                                  hand_parameter_gradients(model, wte, causal_lm, batch, delta))]

    adversarial = AdversarialObjective(causal_lm, "fgm", epsilon=epsilon)
    loss, n_valid, out = adversarial(model, batch)
    loss.backward()

    torch.testing.assert_close(adversarial.last_delta, delta)
    torch.testing.assert_close(row_norms(adversarial.last_delta), torch.full((B,), epsilon, dtype=torch.float64))
    torch.testing.assert_close(loss.detach(), (clean_loss + perturbed_loss) / 2)
    torch.testing.assert_close(out.loss.detach(), clean_loss)  # the output is the clean pass's
    assert n_valid == B * T
    for p, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected)
    assert not wte._forward_hooks


def test_the_loop_scale_reaches_both_halves_of_the_gradient():
    """The loop backpropagates loss * scale (1 / valid tokens); both the clean and the adversarial parts scale."""
    model, batch = tiny_gpt(), lm_batch()
    adversarial = AdversarialObjective(causal_lm, "fgm", epsilon=0.5)
    loss, _, _ = adversarial(model, batch)
    loss.backward()
    unscaled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss, n_valid, _ = adversarial(model, batch)
    (loss * (1.0 / n_valid)).backward()
    for p, g in zip(model.parameters(), unscaled):
        torch.testing.assert_close(p.grad, g / n_valid)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_small_fgm_step_raises_the_loss_by_about_epsilon_times_the_gradient_norm(seed):
    model, batch, epsilon = tiny_gpt(seed), lm_batch(seed + 10), 1e-2
    wte = model.transformer.wte
    clean_loss, g = hand_loss_and_gradient(model, wte, causal_lm, batch, torch.zeros(embedding_shape(batch[0])))
    adversarial = AdversarialObjective(causal_lm, "fgm", epsilon=epsilon)
    loss, _, _ = adversarial(model, batch)
    perturbed_loss = 2 * loss.detach() - clean_loss
    first_order_gain = epsilon * float(row_norms(g).sum())  # <g, delta> summed over the rows
    assert perturbed_loss > clean_loss
    assert float(perturbed_loss - clean_loss) == pytest.approx(first_order_gain, rel=0.05)


# ----------------------------------------------------------------------------- PGD

def hand_pgd_delta(model, embedding, objective, batch, shape, epsilon, steps, step_size):
    """L2 PGD from 0: delta <- project(delta + step_size * g / ||g||) per row, g at the current delta."""
    delta = torch.zeros(shape)
    for _ in range(steps):
        _, g = hand_loss_and_gradient(model, embedding, objective, batch, delta)
        delta = delta + step_size * g / row_norms(g).float().view(-1, 1, 1)
        norms = row_norms(delta).float().view(-1, 1, 1)
        delta = torch.where(norms > epsilon, delta * epsilon / norms, delta)
    return delta


def test_pgd_matches_the_hand_iteration_and_stays_inside_the_ball():
    model, batch, epsilon = tiny_gpt(), lm_batch(), 2.0
    wte = model.transformer.wte
    adversarial = AdversarialObjective(causal_lm, "pgd", epsilon=epsilon, steps=4)
    assert adversarial.step_size == pytest.approx(1.25 * epsilon / 4)  # the documented default
    loss, _, _ = adversarial(model, batch)
    expected = hand_pgd_delta(model, wte, causal_lm, batch, embedding_shape(batch[0]), epsilon, 4, 1.25 * epsilon / 4)
    torch.testing.assert_close(adversarial.last_delta, expected)
    assert bool((row_norms(adversarial.last_delta) <= epsilon * (1 + 1e-6)).all())
    clean_loss = causal_lm(model, batch)[0].detach()
    assert 2 * loss.detach() - clean_loss > clean_loss


def test_pgd_with_big_steps_is_projected_onto_the_ball():
    model, batch, epsilon = tiny_gpt(), lm_batch(), 0.3
    adversarial = AdversarialObjective(causal_lm, "pgd", epsilon=epsilon, steps=3, step_size=10.0)
    adversarial(model, batch)
    torch.testing.assert_close(row_norms(adversarial.last_delta), torch.full((B,), epsilon, dtype=torch.float64))


def test_one_pgd_step_of_size_epsilon_is_fgm():
    model, batch = tiny_gpt(), lm_batch()
    fgm = AdversarialObjective(causal_lm, "fgm", epsilon=0.7)
    pgd = AdversarialObjective(causal_lm, "pgd", epsilon=0.7, steps=1, step_size=0.7)
    fgm_loss, _, _ = fgm(model, batch)
    pgd_loss, _, _ = pgd(model, batch)
    torch.testing.assert_close(pgd.last_delta, fgm.last_delta)
    torch.testing.assert_close(pgd_loss, fgm_loss)


# ----------------------------------------------------------------------------- hooks

def test_hooks_are_removed_even_when_the_objective_raises():
    model, batch = tiny_gpt(), lm_batch()
    wte = model.transformer.wte

    def failing(m, b):
        m(b[0])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        AdversarialObjective(failing, "fgm", epsilon=1.0)(model, batch)
    assert not wte._forward_hooks

    calls = []

    def fails_in_the_perturbed_pass(m, b):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second pass")
        return causal_lm(m, b)

    with pytest.raises(RuntimeError, match="second pass"):
        AdversarialObjective(fails_in_the_perturbed_pass, "fgm", epsilon=1.0)(model, batch)
    assert not wte._forward_hooks
    # and the model is clean afterwards: the same loss as never perturbed
    torch.testing.assert_close(causal_lm(model, batch)[0], causal_lm(tiny_gpt(), batch)[0])


def test_an_objective_that_never_embeds_tokens_is_refused():
    model = tiny_gpt()

    def no_lookup(m, b):
        loss = m.lm_head.weight.sum()
        return loss, 1, None

    with pytest.raises(ChoicelmError, match="never ran the model's input embedding"):
        AdversarialObjective(no_lookup, "fgm", epsilon=1.0)(model, lm_batch())
    assert not model.transformer.wte._forward_hooks


# ----------------------------------------------------------------------------- other families

def test_bert_classification_fgm_matches_the_hand_computation():
    model, batch, epsilon = tiny_bert_classifier(), classify_batch(), 0.5
    wte = model.embeddings.wte
    clean_loss, g = hand_loss_and_gradient(model, wte, classify, batch, torch.zeros(embedding_shape(batch[0])))
    delta = hand_fgm_delta(g, epsilon)
    perturbed_loss, _ = hand_loss_and_gradient(model, wte, classify, batch, delta)
    expected_grads = [(a + b) / 2 for a, b in zip(hand_parameter_gradients(model, wte, classify, batch, None),
                                                  hand_parameter_gradients(model, wte, classify, batch, delta))]
    adversarial = AdversarialObjective(classify, "fgm", epsilon=epsilon)
    loss, n_valid, _ = adversarial(model, batch)
    loss.backward()
    torch.testing.assert_close(adversarial.last_delta, delta)
    torch.testing.assert_close(loss.detach(), (clean_loss + perturbed_loss) / 2)
    assert n_valid == B and perturbed_loss > clean_loss
    for p, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected)


def test_seq2seq_perturbs_the_source_even_when_the_embedding_is_shared():
    """A shared embedding is looked up twice (source, then target); only the source lookup is perturbed. The
    reference: a twin with separate source and target embeddings holding the same weights, where the source
    embedding is looked up once, perturbed by hand."""
    shared, batch, epsilon = tiny_seq2seq(), pair_batch(), 0.5
    twin = tiny_seq2seq(src_vocab_size=16)
    state = dict(shared.state_dict(), **{"encoder.wte.weight": shared.decoder.wte.weight.detach().clone()})
    twin.load_state_dict(state)
    source = twin.encoder.wte
    S = batch[0].shape[1]
    clean_loss, g = hand_loss_and_gradient(twin, source, seq2seq, batch, torch.zeros(B, S, D))
    delta = hand_fgm_delta(g, epsilon)
    perturbed_loss, _ = hand_loss_and_gradient(twin, source, seq2seq, batch, delta)

    for model in (shared, twin):
        adversarial = AdversarialObjective(seq2seq, "fgm", epsilon=epsilon)
        loss, n_valid, _ = adversarial(model, batch)
        assert adversarial.last_delta.shape == (B, S, D)  # source positions, not target ones
        torch.testing.assert_close(adversarial.last_delta, delta)
        torch.testing.assert_close(loss.detach(), (clean_loss + perturbed_loss) / 2)
        assert n_valid == int((batch[3] != -100).sum())
        assert not input_embedding(model)._forward_hooks


def test_lstm_language_model_and_a_frozen_embedding():
    """LSTM causal LM; with the embedding frozen (as under LoRA) dL/de still exists and wte gets no gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind="lstm", vocab_size=V, n_layer=1, n_embd=D, dropout=0.0, tie_embeddings=False)
    model = LSTMLM(cfg).train()
    model.embed.weight.requires_grad_(False)
    batch, epsilon = lm_batch(), 0.5
    _, g = hand_loss_and_gradient(model, model.embed, causal_lm, batch, torch.zeros(embedding_shape(batch[0])))
    adversarial = AdversarialObjective(causal_lm, "fgm", epsilon=epsilon)
    loss, _, _ = adversarial(model, batch)
    loss.backward()
    torch.testing.assert_close(adversarial.last_delta, hand_fgm_delta(g, epsilon))
    assert model.embed.weight.grad is None and model.lm_head.weight.grad is not None


def test_no_valid_target_gives_no_perturbation_and_no_nan():
    model, (ids_BT, mask_BT, _) = tiny_bert_classifier(), classify_batch()
    adversarial = AdversarialObjective(classify, "fgm", epsilon=1.0)
    loss, n_valid, _ = adversarial(model, (ids_BT, mask_BT, torch.full((B,), -100)))
    assert n_valid == 0 and float(loss.detach()) == 0.0
    assert torch.equal(adversarial.last_delta, torch.zeros_like(adversarial.last_delta))


def test_bf16_autocast_keeps_the_perturbation_in_fp32_on_the_ball():
    model, batch, epsilon = tiny_gpt(), lm_batch(), 0.5
    adversarial = AdversarialObjective(causal_lm, "pgd", epsilon=epsilon, steps=2, step_size=epsilon)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = adversarial(model, batch)
    loss.backward()
    assert adversarial.last_delta.dtype == torch.float32
    torch.testing.assert_close(row_norms(adversarial.last_delta), torch.full((B,), epsilon, dtype=torch.float64))
    assert math.isfinite(float(loss.detach())) and all(bool(p.grad.isfinite().all()) for p in model.parameters())


def test_moe_aux_loss_keeps_its_graph_for_the_loop():
    """The loop backpropagates loss + out.aux_loss: the clean pass's aux loss must still be differentiable, and the
    gradients are (clean + adversarial) / 2 + d aux / d theta (clean pass), computed here by hand."""
    torch.manual_seed(0)
    moe = MoEConfig(experts=4, every=1, router="token_choice", top_k=2)
    model = GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=D, dropout=0.0), moe).train()
    batch, epsilon, wte = lm_batch(), 0.5, model.transformer.wte
    _, g = hand_loss_and_gradient(model, wte, causal_lm, batch, torch.zeros(embedding_shape(batch[0])))
    delta = hand_fgm_delta(g, epsilon)
    model.zero_grad(set_to_none=True)
    clean_loss, _, clean_out = causal_lm(model, batch)
    (clean_loss / 2 + clean_out.aux_loss).backward()
    with added_to_lookup(wte, delta):
        (causal_lm(model, batch)[0] / 2).backward()
    expected = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    adversarial = AdversarialObjective(causal_lm, "fgm", epsilon=epsilon)
    loss, _, out = adversarial(model, batch)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    (loss + out.aux_loss).backward()
    torch.testing.assert_close(adversarial.last_delta, delta)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_only_the_clean_pass_updates_expert_choice_thresholds(method):
    torch.manual_seed(0)
    moe = MoEConfig(experts=4, every=1, router="expert_choice_causal")
    model = GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=D, dropout=0.0), moe).train()
    batch = lm_batch()
    causal_lm(model, batch)  # one plain training pass: what the thresholds should see of this batch
    expected = [(m.threshold.clone(), int(m.threshold_updates)) for m in model.moe_layers()]
    for m in model.moe_layers():
        m.threshold.zero_()
        m.threshold_updates.zero_()
    steps = 3 if method == "pgd" else 1
    AdversarialObjective(causal_lm, method, epsilon=0.5, steps=steps)(model, batch)
    for m, (threshold, updates) in zip(model.moe_layers(), expected):
        assert int(m.threshold_updates) == updates == 1 and m.track_thresholds
        torch.testing.assert_close(m.threshold, threshold)


def test_a_ddp_wrapped_model_gives_the_same_gradients():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model, reference, batch = tiny_gpt(), tiny_gpt(), lm_batch()
        wrapped = DDP(model)
        assert input_embedding(wrapped) is model.transformer.wte
        adversarial = AdversarialObjective(causal_lm, "pgd", epsilon=0.5, steps=2)
        loss, _, _ = adversarial(wrapped, batch)
        loss.backward()
        expected, _, _ = adversarial(reference, batch)
        expected.backward()
        torch.testing.assert_close(loss, expected)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- settings

def test_bad_settings_get_one_clear_error():
    cases = [
        (dict(method="vat"), "method 'vat' is unknown"),
        (dict(epsilon=0.0), "epsilon=0.0 must be a finite number > 0"),
        (dict(epsilon=-1.0), "epsilon=-1.0"),
        (dict(epsilon=float("nan")), "epsilon=nan"),
        (dict(epsilon=True), "epsilon=True"),
        (dict(method="pgd", steps=0), "steps=0 must be an integer >= 1"),
        (dict(method="pgd", steps=2.0), "steps=2.0"),
        (dict(method="pgd", step_size=0.0), "step_size=0.0"),
        (dict(steps=3), "steps and step_size apply to method='pgd'"),
        (dict(step_size=0.1), "steps and step_size apply to method='pgd'"),
    ]
    for overrides, message in cases:
        with pytest.raises(ChoicelmError, match=re.escape(message)):
            AdversarialObjective(causal_lm, **{"method": "fgm", "epsilon": 1.0, **overrides})
    with pytest.raises(ChoicelmError, match="must be callable"):
        AdversarialObjective("causal_lm", "fgm", 1.0)
    with pytest.raises(ChoicelmError, match="TruncatedBPTT carries state"):
        AdversarialObjective(TruncatedBPTT(micro_steps=1), "fgm", 1.0)


def test_mlm_prepare_passes_through_and_plain_objectives_have_none():
    mlm = MaskedLM(masker=None, seed=0)
    assert AdversarialObjective(mlm, "fgm", 1.0).prepare == mlm.prepare
    assert not hasattr(AdversarialObjective(causal_lm, "fgm", 1.0), "prepare")
