"""Encoder-decoder: learns copy/reverse, cached decoding == teacher forcing, beam search against exhaustive
search and against Hugging Face MarianMTModel (logits, greedy and beam generation), source padding, pairs."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch

from choicelm.core.config import ConfigError, ModelConfig, MoEConfig, load_config
from choicelm.data.pairs import PairDataset
from choicelm.core.errors import ChoicelmError
from choicelm.generation import GenerationConfig
from choicelm.generation.seq2seq import generate_seq2seq
from choicelm.models.seq2seq_hf import state_dict_from_hf_marian
from choicelm.models import Seq2Seq, build_model

ROOT = Path(__file__).resolve().parents[1]
PAD, START, EOS = 0, 1, 2  # digits are ids 3..12


def tiny(**kw) -> ModelConfig:
    base = dict(kind="seq2seq", vocab_size=16, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def sharpened(config: ModelConfig, seed: int = 0) -> Seq2Seq:
    """A random model whose next-token distributions are far from uniform (no near-ties in rankings)."""
    torch.manual_seed(seed)
    model = Seq2Seq(config).eval()
    with torch.no_grad():
        for wte in {model.decoder.wte, model.src_embedding}:  # std 0.8 whatever the init
            wte.weight.mul_(0.8 / wte.weight.std())
        for name, p in model.named_parameters():  # non-trivial norms and biases
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def greedy(model, sources, max_new_tokens=12, **kw):
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, eos_token_id=EOS, **kw)
    return [c.ids for c in generate_seq2seq(model, sources, cfg, start_id=START, pad_id=PAD)]


# ----------------------------------------------------------------------------- learning copy / reverse


def digit_pairs(task: str, n: int, rng: random.Random, lengths=(3, 8)) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for _ in range(n):
        src = [rng.randrange(3, 13) for _ in range(rng.randint(*lengths))]
        pairs.append((src, list(src) if task == "copy" else src[::-1]))
    return pairs


STEPS = 200  # measured here: copy/sinusoidal 98-100% held-out exact match, reverse/learned 100%


@pytest.mark.parametrize("task,pos", [("copy", "sinusoidal"), ("reverse", "learned")])
def test_tiny_seq2seq_learns_to_copy_and_reverse(task, pos):
    torch.manual_seed(0)
    rng = random.Random(0)
    train = PairDataset(digit_pairs(task, 4000, rng), start_id=START, eos_id=EOS, pad_id=PAD)
    held_out = [p for p in digit_pairs(task, 300, random.Random(1)) if tuple(p[0]) not in
                {tuple(s) for s, _ in train.pairs}]
    model = Seq2Seq(tiny(n_embd=64, n_layer=2, n_decoder_layer=2, pos=pos))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps, epoch = 0, 0
    model.train()
    while steps < STEPS:
        for batch in train.batches(64, seed=0, epoch=epoch):
            lr = 3e-3 * min(1.0, (steps + 1) / 30) * (0.5 * (1 + math.cos(math.pi * steps / STEPS)) * 0.9 + 0.1)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = model(batch.src_BS, batch.tgt_in_BT, batch.targets_BT, src_mask_BS=batch.src_mask_BS).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if steps == STEPS:
                break
        epoch += 1
    model.eval()
    outputs = greedy(model, [s for s, _ in held_out])  # one batch of mixed lengths: padding exercised too
    exact = sum(out == tgt for out, (_, tgt) in zip(outputs, held_out)) / len(held_out)
    assert len(held_out) > 200
    assert exact >= 0.95, f"{task}/{pos}: greedy exact-match accuracy {exact:.3f} on held-out sequences"


# ----------------------------------------------------------------------------- cached decoding


LAYOUTS = {
    "pre-learned-shared": dict(pos="learned", norm_placement="pre"),
    "post-sinusoidal": dict(pos="sinusoidal", norm_placement="post"),
    "rope-rmsnorm-swiglu-gqa-separate-vocab": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                                    n_kv_head=2, src_vocab_size=24, tie_embeddings=False),
    "deeper-decoder": dict(n_layer=1, n_decoder_layer=3),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_incremental_decoding_equals_teacher_forced_forward(layout):
    model = sharpened(tiny(**LAYOUTS[layout]))
    torch.manual_seed(1)
    src_BS = torch.randint(3, 16, (3, 9))
    mask_BS = torch.ones(3, 9, dtype=torch.bool)
    mask_BS[1, 6:] = False  # right padding in one row
    mask_BS[2, 4:] = False
    tgt_BT = torch.randint(3, 16, (3, 7))
    with torch.no_grad():
        full_BTV = model(src_BS, tgt_BT, src_mask_BS=mask_BS).logits
        cache = model.new_cache(model.encode(src_BS, mask_BS), mask_BS, max_len=7)
        steps = [model.decode_step(tgt_BT[:, t:t + 1], cache, t) for t in range(7)]
        # a multi-token chunk over the cache, then single steps
        cache2 = model.new_cache(model.encode(src_BS, mask_BS), mask_BS, max_len=7)
        chunk = model.lm_head(model.decode(tgt_BT[:, :4], cache=cache2, start_pos=0))
        rest = [model.decode_step(tgt_BT[:, t:t + 1], cache2, t) for t in range(4, 7)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full_BTV, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([chunk, torch.stack(rest, 1)], dim=1), full_BTV, atol=1e-5, rtol=1e-5)


def test_cache_reorder_moves_self_and_cross_attention_rows():
    """Reordering a batch's caches (what beam search does) equals decoding the reordered batch from scratch."""
    model = sharpened(tiny())
    src_BS = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    tgt_BT = torch.tensor([[11, 12, 3], [4, 5, 6]])
    rows = torch.tensor([1, 0, 1])
    with torch.no_grad():
        cache = model.new_cache(model.encode(src_BS), max_len=4)
        model.decode(tgt_BT[:, :2], cache=cache)
        cache.reorder(rows)
        got_NV = model.decode_step(tgt_BT[rows, 2:3], cache, 2)
        want_NV = model(src_BS[rows], tgt_BT[rows]).logits[:, -1]
    assert cache.cross_k.shape[1] == 3
    torch.testing.assert_close(got_NV, want_NV, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- source padding


def test_source_padding_never_changes_the_output():
    model = sharpened(tiny())
    src = [3, 9, 4, 12, 5]
    with torch.no_grad():
        alone = model(torch.tensor([src]), torch.tensor([[START, 7, 8]])).logits
        for n_pad, pad_id in ((1, PAD), (6, PAD), (6, 11)):  # any pad id: it is masked, not special
            padded = torch.tensor([src + [pad_id] * n_pad])
            mask = torch.tensor([[True] * len(src) + [False] * n_pad])
            out = model(padded, torch.tensor([[START, 7, 8]]), src_mask_BS=mask).logits
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    sources = [[3, 4], [5, 6, 7, 8, 9, 10, 11], [12, 3, 4, 5]]
    batched = greedy(model, sources, max_new_tokens=8)
    assert batched == [greedy(model, [s], max_new_tokens=8)[0] for s in sources]
    beams = GenerationConfig(max_new_tokens=8, num_beams=3, eos_token_id=EOS)
    assert ([c.ids for c in generate_seq2seq(model, sources, beams, start_id=START)] ==
            [generate_seq2seq(model, [s], beams, start_id=START)[0].ids for s in sources])


# ----------------------------------------------------------------------------- beam search


def test_beam_search_with_one_beam_equals_greedy():
    model = sharpened(tiny(), seed=3)
    sources = [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 3, 4]]
    one = GenerationConfig(max_new_tokens=10, num_beams=1, temperature=0, eos_token_id=EOS)
    want = [c.ids for c in generate_seq2seq(model, sources, one, start_id=START)]
    from choicelm.generation.beam import beam_search
    from choicelm.generation.seq2seq import seq2seq_step
    for src, ids in zip(sources, want):  # beam.py itself with num_beams=1 (GenerationConfig routes 1 to greedy)
        hyp = beam_search(seq2seq_step(model, src, 1, 10, START, "cpu"), [START], num_beams=1, max_new_tokens=10,
                          eos_ids=[EOS], early_stopping=True)[0]
        assert (hyp.ids[:-1] if hyp.ids[-1:] == [EOS] else hyp.ids) == ids


def exhaustive_search(model, src: list[int], vocab: int, max_new: int, length_penalty: float, top: int):
    """Every possible output (EOS only last; or max_new tokens without EOS), scored by teacher-forced full
    forward passes: sum of log-probabilities / length ** length_penalty. Returns the `top` best (ids, score)."""
    scored = []
    with torch.no_grad():
        for n in range(1, max_new + 1):
            prefixes = list(itertools.product([t for t in range(vocab) if t != EOS], repeat=n - 1))
            lasts = [EOS] if n < max_new else list(range(vocab))
            seqs = [list(p) + [last] for p in prefixes for last in lasts]
            tgt_in = torch.tensor([[START] + s[:-1] for s in seqs])
            logp = model(torch.tensor([src] * len(seqs)), tgt_in).logits.float().log_softmax(-1)
            sums = logp.gather(2, torch.tensor(seqs)[:, :, None]).squeeze(-1).sum(1)
            scored += [(s, float(v) / n ** length_penalty) for s, v in zip(seqs, sums)]
    return sorted(scored, key=lambda x: -x[1])[:top]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_wide_beam_search_equals_exhaustive_search(length_penalty):
    """Vocabulary 6, up to 3 new tokens: 32 beams can hold every unfinished prefix (5 ** 2 = 25), so beam search
    must find the exact best outputs; the reference scores them with full forward passes (no cache, no beams)."""
    vocab, max_new = 6, 3
    model = sharpened(tiny(vocab_size=vocab), seed=5)
    from choicelm.generation.beam import beam_search
    from choicelm.generation.seq2seq import seq2seq_step
    for src in ([3, 4, 5], [5, 5, 3, 4, 3]):
        want = exhaustive_search(model, src, vocab, max_new, length_penalty, top=3)
        hyps = beam_search(seq2seq_step(model, src, 32, max_new, START, "cpu"), [START], num_beams=32,
                           max_new_tokens=max_new, eos_ids=[EOS], length_penalty=length_penalty,
                           early_stopping="never", num_return_sequences=3)
        assert [h.ids for h in hyps] == [ids for ids, _ in want]
        for h, (_, score) in zip(hyps, want):
            assert h.score == pytest.approx(score, abs=1e-4)
        # through the public API the EOS is dropped and the reason reported
        cfg = GenerationConfig(max_new_tokens=max_new, num_beams=32, eos_token_id=EOS, length_penalty=length_penalty,
                               early_stopping="never", num_return_sequences=3)
        comps = generate_seq2seq(model, [src], cfg, start_id=START)
        for c, (ids, _) in zip(comps, want):
            assert c.ids == (ids[:-1] if ids[-1] == EOS else ids)
            assert c.finish_reason == ("eos" if ids[-1] == EOS else "length")


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = sharpened(tiny(), seed=2)
    sources = [[3, 4, 5], [6, 7, 8, 9]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=7, eos_token_id=EOS, num_return_sequences=3)
    a = [c.ids for c in generate_seq2seq(model, sources, cfg, start_id=START)]
    b = [c.ids for c in generate_seq2seq(model, sources, cfg, start_id=START)]
    assert a == b and len(a) == 6
    hot = GenerationConfig(max_new_tokens=8, temperature=5.0, seed=7, eos_token_id=EOS, num_return_sequences=3)
    assert len({tuple(c.ids) for c in generate_seq2seq(model, sources[:1], hot, start_id=START)}) > 1
    top1 = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=3, eos_token_id=EOS)
    assert [c.ids for c in generate_seq2seq(model, sources, top1, start_id=START)] == greedy(model, sources, 8)


# ----------------------------------------------------------------------------- Hugging Face Marian parity


@pytest.fixture(scope="module")
def marian_pair():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V = 40
    hf = transformers.MarianMTModel(transformers.MarianConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="gelu_new",
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=None,
        scale_embedding=True)).eval()
    with torch.no_grad():  # sharper distributions and non-trivial norms/biases, so names and shapes are tested
        hf.model.shared.weight.mul_(40.0)
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    config = tiny(vocab_size=V, block_size=64, n_embd=32, n_layer=2, n_decoder_layer=2, mlp_hidden=64,
                  pos="sinusoidal", norm_placement="post", bias=True, tie_embeddings=True)
    model = Seq2Seq(config).eval()
    assert not bool(hf.final_logits_bias.abs().any())  # choicelm has no final logits bias
    missing, unexpected = model.load_state_dict(state_dict_from_hf_marian(hf.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # lm_head is the same tensor as decoder.wte
    assert model.lm_head.weight is model.decoder.wte.weight
    return hf, model


def test_sinusoidal_positions_match_marian(marian_pair):
    hf, model = marian_pair
    torch.testing.assert_close(model.pos_table, hf.model.encoder.embed_positions.weight.float(), atol=1e-6, rtol=0)


def test_logits_and_loss_match_marian(marian_pair):
    hf, model = marian_pair
    torch.manual_seed(2)
    src = torch.randint(3, 40, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    src = src.masked_fill(mask == 0, PAD)
    labels = torch.randint(3, 40, (3, 8))
    labels[2, 5:] = -100
    tgt_in = torch.cat([torch.full((3, 1), PAD), labels[:, :-1].clamp(min=0)], dim=1)  # HF's shift_tokens_right
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, labels=labels)
        out = model(src, tgt_in, labels, src_mask_BS=mask)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_matches_marian_generate(marian_pair, num_beams):
    hf, model = marian_pair
    sources = [[5, 9, 13, 21, 7], [30, 4, 4, 17], [11, 12, 13, 14, 15, 16, 17]]
    cfg = GenerationConfig(max_new_tokens=9, temperature=0 if num_beams == 1 else None, num_beams=num_beams,
                           eos_token_id=EOS, num_return_sequences=1, length_penalty=1.0, early_stopping=False)
    ours = generate_seq2seq(model, sources, cfg, start_id=PAD, pad_id=PAD)
    for src, comp in zip(sources, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([src]), attention_mask=torch.ones(1, len(src), dtype=torch.long),
                              max_new_tokens=9, num_beams=num_beams, do_sample=False, eos_token_id=EOS,
                              pad_token_id=PAD, decoder_start_token_id=PAD, length_penalty=1.0,
                              early_stopping=False, forced_eos_token_id=None, bad_words_ids=None,
                              no_repeat_ngram_size=0, repetition_penalty=1.0, min_length=0)[0].tolist()
        ref = ref[1:]  # drop the decoder start token
        ref = ref[:ref.index(EOS)] if EOS in ref else ref  # and the EOS with its padding
        assert comp.ids == ref


# ----------------------------------------------------------------------------- pairs


def test_pair_batches_are_padded_teacher_forcing_rows():
    ds = PairDataset([([5, 6, 7], [8, 9]), ([4], [3, 3, 3])], start_id=START, eos_id=EOS, pad_id=PAD)
    batch = ds.collate([0, 1])
    assert batch.src_BS.tolist() == [[5, 6, 7], [4, 0, 0]]
    assert batch.src_mask_BS.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tgt_in_BT.tolist() == [[1, 8, 9, 0], [1, 3, 3, 3]]
    assert batch.targets_BT.tolist() == [[8, 9, 2, -100], [3, 3, 3, 2]]
    assert batch.n_target_tokens == 7


def test_pair_batching_is_deterministic_by_seed():
    ds = PairDataset([([i + 3], [i + 3]) for i in range(10)], start_id=START, eos_id=EOS)
    first = [b.src_BS[:, 0].tolist() for b in ds.batches(4, seed=1, epoch=0)]
    assert first == [b.src_BS[:, 0].tolist() for b in ds.batches(4, seed=1, epoch=0)]
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(3, 13))  # every pair once per epoch
    assert first != [b.src_BS[:, 0].tolist() for b in ds.batches(4, seed=2, epoch=0)]
    assert first != [b.src_BS[:, 0].tolist() for b in ds.batches(4, seed=1, epoch=1)]
    assert [b.src_BS[:, 0].tolist() for b in ds.batches(4, seed=1, epoch=0, start=1)] == first[1:]
    assert [len(b.src_BS) for b in ds.batches(4, seed=1, drop_last=True)] == [4, 4]


def test_pairs_reject_bad_input():
    with pytest.raises(ChoicelmError, match="empty source"):
        PairDataset([([], [3])], start_id=START, eos_id=EOS)
    with pytest.raises(ChoicelmError, match="vocabulary size"):
        PairDataset([([3], [99])], start_id=START, eos_id=EOS, vocab_size=16)
    with pytest.raises(ChoicelmError, match="not a .source ids, target ids. pair"):
        PairDataset([[3, 4, 5]], start_id=START, eos_id=EOS)
    with pytest.raises(ChoicelmError, match="no pairs"):
        PairDataset([], start_id=START, eos_id=EOS)


# ----------------------------------------------------------------------------- config and bad input


def test_config_file_builds_a_seq2seq_model():
    cfg = load_config(ROOT / "configs" / "seq2seq-tiny.yaml", ["--model.vocab_size=64"])
    model = build_model(cfg.model)
    assert isinstance(model, Seq2Seq) and model.lm_head.weight is model.decoder.wte.weight
    assert len(model.encoder.h) == cfg.model.n_layer and len(model.decoder.h) == cfg.model.n_decoder_layer


def test_bad_input_is_one_clear_error():
    with pytest.raises(ConfigError, match="sinusoidal is only implemented for model.kind=seq2seq"):
        ModelConfig(kind="gpt", pos="sinusoidal")
    with pytest.raises(ConfigError, match="norm_placement"):
        tiny(norm_placement="middle")
    with pytest.raises(ChoicelmError, match="no Mixture-of-Experts"):
        build_model(tiny(), MoEConfig(experts=4))
    model = sharpened(tiny(src_vocab_size=8))
    with pytest.raises(ChoicelmError, match=r"token ids must be in 0\.\.7"):
        model.encode(torch.tensor([[3, 9]]))
    with pytest.raises(ChoicelmError, match="all padding"):
        model.encode(torch.tensor([[3, 4]]), torch.tensor([[False, False]]))
    with pytest.raises(ChoicelmError, match="block size"):
        model.encode(torch.randint(3, 8, (1, 40)))
    with pytest.raises(ChoicelmError, match="source 1 is empty"):
        greedy(model, [[3], []])
    with pytest.raises(ChoicelmError, match="max_new_tokens=40 exceeds"):
        greedy(model, [[3]], max_new_tokens=40)
    with pytest.raises(ChoicelmError, match="stop strings need a tokenizer"):
        generate_seq2seq(model, [[3]], GenerationConfig(max_new_tokens=3, stop=["x"]), start_id=START)
    with pytest.raises(ChoicelmError, match="needs the encoder output"):
        model.decode(torch.tensor([[START]]))
