"""Generation: greedy, beam search and logits processors against Hugging Face; batching with left padding;
seeded sampling inside the allowed set; stop strings; UTF-8-safe streaming; API, CLI and errors."""

from __future__ import annotations

import io

import pytest
import torch
import yaml

import choicelm
from choicelm.cli import main
from choicelm.core.config import Config, ModelConfig
from choicelm.core.errors import ChoicelmError
from choicelm.generation import GenerationConfig, generate_ids, generate_text, stream_text
from choicelm.generation.processors import MinP, NoRepeatNGram, RepetitionPenalty, Temperature, TopK, TopP
from choicelm.generation.streaming import IncrementalDecoder, RowText
from choicelm.generation.stopping import StopStrings
from choicelm.models import GPT
from choicelm.text import Tokenizer

from test_gpt import GPT2_LAYOUT, LLAMA_LAYOUT, gpt2_to_choicelm, llama_to_choicelm

transformers = pytest.importorskip("transformers")

V = 100


# ----------------------------------------------------------------------------- tiny HF models and their twins


def hf_gpt2(seed=0):
    torch.manual_seed(seed)
    # a wide init makes the next-token distribution peaked, so argmax never hinges on float rounding
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=V, n_positions=64, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()
    model = GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                            **GPT2_LAYOUT)).eval()
    model.load_state_dict(gpt2_to_choicelm(hf.state_dict()))
    return hf, model


def hf_llama(seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.2,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    model = GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                            **LLAMA_LAYOUT)).eval()
    model.load_state_dict(llama_to_choicelm(hf.state_dict(), 2))
    return hf, model


PAIRS = {"gpt2": hf_gpt2, "llama": hf_llama}


def hf_generate(hf, prompt, **kw):
    """HF's continuation of one prompt, new tokens only (EOS off unless given)."""
    ids = torch.tensor([prompt])
    kw.setdefault("eos_token_id", None)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)
    return out[:, len(prompt):]


def prompt_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------- parity with Hugging Face


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_greedy_32_tokens_identical_to_hugging_face(layout):
    hf, model = PAIRS[layout]()
    for seed, n in ((1, 5), (2, 11)):
        prompt = prompt_ids(n, seed)
        ref = hf_generate(hf, prompt, max_new_tokens=32, do_sample=False)[0].tolist()
        ours = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=32, temperature=0))[0]
        assert ours.ids == ref and len(ref) == 32 and ours.finish_reason == "length"


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_repetition_penalty_and_no_repeat_ngram_greedy_identical_to_hugging_face(layout):
    hf, model = PAIRS[layout]()
    prompt = prompt_ids(7, 3)
    for kw in (dict(repetition_penalty=1.8), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
               dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        ref = hf_generate(hf, prompt, max_new_tokens=32, do_sample=False, **kw)[0].tolist()
        ours = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=32, temperature=0, **kw))[0].ids
        assert ours == ref, kw
    # the no-repeat rule really holds: no bigram twice in prompt + output
    seq = prompt + generate_ids(model, [prompt], GenerationConfig(max_new_tokens=32, temperature=0,
                                                                  no_repeat_ngram_size=2))[0].ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_processors_equal_hugging_face_processors():
    lp = transformers.generation.logits_process
    torch.manual_seed(4)
    scores = torch.randn(4, V) * 3
    ids = torch.randint(0, 12, (4, 20))  # many repeats, so n-grams recur
    cases = [
        (RepetitionPenalty(1.7), lp.RepetitionPenaltyLogitsProcessor(1.7)),
        (RepetitionPenalty(0.8), lp.RepetitionPenaltyLogitsProcessor(0.8)),
        (NoRepeatNGram(2), lp.NoRepeatNGramLogitsProcessor(2)),
        (NoRepeatNGram(3), lp.NoRepeatNGramLogitsProcessor(3)),
        (Temperature(0.7), lp.TemperatureLogitsWarper(0.7)),
        (TopK(5), lp.TopKLogitsWarper(5)),
        (TopK(500), lp.TopKLogitsWarper(500)),
        (TopP(0.8), lp.TopPLogitsWarper(0.8)),
        (TopP(0.01), lp.TopPLogitsWarper(0.01)),
        (MinP(0.1), lp.MinPLogitsWarper(0.1)),
        (MinP(0.9), lp.MinPLogitsWarper(0.9)),
    ]
    for ours, ref in cases:
        expected = ref(ids, scores.clone())
        got = ours(ids, scores.clone())
        assert torch.equal(torch.isinf(got), torch.isinf(expected)), ours
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)], atol=1e-6, rtol=0)


def _beam_eos(hf, prompt, rank):
    """An EOS id the beams actually produce: a likely first token (so some hypotheses end early, even at once)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    return int(logits.topk(rank + 1).indices[rank])


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, True), (-1.0, False), (2.0, "never")])
def test_beam_search_identical_to_hugging_face(layout, length_penalty, early_stopping):
    hf, model = PAIRS[layout]()
    prompt = prompt_ids(6, 5)
    ended_on_eos = 0
    for rank in (1, 3):
        eos = _beam_eos(hf, prompt, rank)
        kw = dict(num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=3,
                  max_new_tokens=12)
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 6, dtype=torch.long), do_sample=False,
                          eos_token_id=eos, pad_token_id=V - 1, output_scores=True, return_dict_in_generate=True, **kw)
        ours = generate_ids(model, [prompt], GenerationConfig(eos_token_id=eos, **kw))
        assert len(ours) == 3
        for row, score, c in zip(ref.sequences[:, 6:].tolist(), ref.sequences_scores.tolist(), ours):
            ids = c.ids + ([eos] if c.finish_reason == "eos" else [])
            assert row[:len(ids)] == ids and all(t == V - 1 for t in row[len(ids):])
            assert c.finish_reason in ("eos", "length")
            ended_on_eos += c.finish_reason == "eos"
            # HF's sequences_scores: sum log p / new_len ** length_penalty; ours, recomputed from the model
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
            total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids))
            assert score == pytest.approx(total / len(ids) ** length_penalty, abs=1e-4)
    assert ended_on_eos or length_penalty >= 1.0  # short EOS-ended hypotheses win when length is penalised


def test_beam_search_with_repetition_penalty_identical_to_hugging_face():
    hf, model = hf_gpt2(1)
    prompt = prompt_ids(5, 6)
    kw = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10, repetition_penalty=1.5, no_repeat_ngram_size=2)
    ref = hf_generate(hf, prompt, do_sample=False, **kw).tolist()
    ours = [c.ids for c in generate_ids(model, [prompt], GenerationConfig(**kw))]
    assert ours == ref


# ----------------------------------------------------------------------------- batching with left padding


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_batched_left_padded_equals_one_prompt_at_a_time(layout):
    hf, model = PAIRS[layout]()
    prompts = [prompt_ids(3, 7), prompt_ids(12, 8), prompt_ids(7, 9), prompt_ids(1, 10)]
    for kw in (dict(temperature=0), dict(temperature=0, repetition_penalty=1.4, no_repeat_ngram_size=2)):
        alone = [generate_ids(model, [p], GenerationConfig(max_new_tokens=20, **kw))[0].ids for p in prompts]
        batched = [c.ids for c in generate_ids(model, prompts, GenerationConfig(max_new_tokens=20, **kw))]
        assert batched == alone
        # and both agree with Hugging Face, one prompt at a time
        assert alone[1] == hf_generate(hf, prompts[1], max_new_tokens=20, do_sample=False,
                                       **{k: v for k, v in kw.items() if k != "temperature"})[0].tolist()
    # each row stops on its own: an EOS taken from row 2's output ends row 2 there, the others run on
    alone = [generate_ids(model, [p], GenerationConfig(max_new_tokens=20, temperature=0))[0].ids for p in prompts]
    eos = alone[2][5]
    cut = {i: ids.index(eos) if eos in ids else None for i, ids in enumerate(alone)}
    out = generate_ids(model, prompts, GenerationConfig(max_new_tokens=20, temperature=0, eos_token_id=eos))
    for i, c in enumerate(out):
        if cut[i] is None:
            assert c.ids == alone[i] and c.finish_reason == "length"
        else:
            assert c.ids == alone[i][:cut[i]] and c.finish_reason == "eos"
    assert out[2].finish_reason == "eos" and len(out[2].ids) <= 5


def test_left_padded_logits_equal_unpadded_logits():
    """The model-level contract behind batching: with the mask and per-row positions, a padded row's logits
    equal the same prompt's logits alone (both layouts, prefill and a decode step)."""
    for make in (hf_gpt2, hf_llama):
        _, model = make()
        p = prompt_ids(5, 11)
        pad = 4
        ids = torch.tensor([[0] * pad + p])
        mask = torch.tensor([[False] * pad + [True] * 6])
        pos = torch.tensor([[0] * pad + list(range(5))])
        with torch.no_grad():
            cache = model.new_kv_cache(1, 10)
            padded = model(ids, kv_cache=cache, attention_mask_BS=mask[:, :9], position_ids_BT=pos).logits[0, pad:]
            step = model(torch.tensor([[7]]), kv_cache=cache, start_pos=9, attention_mask_BS=mask,
                         position_ids_BT=torch.tensor([[5]])).logits[0]
            alone = model(torch.tensor([p + [7]])).logits[0]
        torch.testing.assert_close(padded, alone[:5], atol=1e-5, rtol=0)
        torch.testing.assert_close(step, alone[5:], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- sampling


def test_seeded_top_k_top_p_min_p_sampling_stays_in_the_allowed_set():
    _, model = hf_gpt2(2)
    prompt = prompt_ids(4, 12)
    for kw in (dict(top_k=3), dict(top_p=0.6), dict(min_p=0.2), dict(top_k=5, top_p=0.9, temperature=0.7)):
        cfg = GenerationConfig(max_new_tokens=24, num_return_sequences=8, seed=5, **kw)
        outs = generate_ids(model, [prompt], cfg)
        assert len(outs) == 8 and len({tuple(c.ids) for c in outs}) > 1  # independent draws
        draws = 0
        for c in outs:
            with torch.no_grad():  # reference: a full forward without the cache, filters computed by hand
                logits = model(torch.tensor([prompt + c.ids])).logits[0].double()
            for i, tok in enumerate(c.ids):
                p = torch.softmax(logits[len(prompt) - 1 + i] / kw.get("temperature", 1.0), -1)
                order = p.argsort(descending=True).tolist()
                rank = order.index(tok)
                if "top_k" in kw:
                    assert rank < kw["top_k"]
                if "top_p" in kw:  # inside the nucleus: the tokens ranked above it hold less than top_p
                    assert float(p[order[:rank]].sum()) < kw["top_p"] + 1e-6
                if "min_p" in kw:
                    assert float(p[tok]) >= kw["min_p"] * float(p.max()) - 1e-6
                draws += 1
        assert draws == 8 * 24
        again = generate_ids(model, [prompt], cfg)
        assert [c.ids for c in again] == [c.ids for c in outs]  # same seed, same tokens
        other = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=24, num_return_sequences=8, seed=6, **kw))
        assert [c.ids for c in other] != [c.ids for c in outs]


def test_top_k_one_sampling_equals_greedy():
    _, model = hf_llama(3)
    prompt = prompt_ids(6, 13)
    greedy = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=16, temperature=0))[0].ids
    assert generate_ids(model, [prompt], GenerationConfig(max_new_tokens=16, top_k=1, seed=0))[0].ids == greedy


# ----------------------------------------------------------------------------- text: tokenizers, stop strings, streaming


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A byte-level BPE and a char tokenizer trained on ASCII text: emoji and CJK come out as several byte tokens."""
    root = tmp_path_factory.mktemp("gentok")
    text = ("the quick brown fox jumps over the lazy dog. END of line\n" * 40
            + "".join(chr(c) for c in range(32, 127)) + "\n")
    (root / "a.txt").write_text(text)
    return {"bpe": Tokenizer.train([root / "a.txt"], 300), "char": Tokenizer.train([root / "a.txt"], None, kind="char")}


TRICKY = "naïve 世界 🎉🇫🇷 ok ∑ end"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_streaming_never_splits_a_utf8_character(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode(TRICKY)
    assert len(ids) > len(TRICKY)  # some characters really are several tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == TRICKY
    assert all("\ufffd" not in d for d in deltas)
    assert sum(d == "" for d in deltas) > 1  # it did hold back partial characters


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_stop_strings_span_token_boundaries(tokenizers, kind):
    tok = tokenizers[kind]
    text = "the quick brown fox jumps over the lazy dog. END of line"
    ids = tok.encode(text)
    for stop in ("fox ju", "azy d", "END", ". E", "🎉"):  # "🎉" never appears: the whole text comes back
        row = RowText(tok, StopStrings([stop, "zzz"]))
        deltas = [row.push(i) for i in ids] + [row.finish()]
        expected = text[:text.find(stop)] if stop in text else text
        assert row.text == expected and "".join(deltas) == expected
        assert row.stopped == (stop in text)
    # several stops: the earliest wins, whichever is listed first
    row = RowText(tok, StopStrings(["lazy", "quick"]))
    for i in ids:
        row.push(i)
    assert row.text == "the "


def _char_model(tok, seed=0, boost=(), block_size=64):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                            dropout=0.0)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)  # peaked distributions, so the text is not uniform noise
        for t in boost:
            model.transformer.wte.weight[t] += 3.0
    return model


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_stream_concatenates_to_generate_and_decode(tokenizers, kind):
    tok = tokenizers[kind]
    # favour the byte tokens of multi-byte characters, so partial characters occur mid-stream
    model = _char_model(tok, 1, boost=tok.encode("世🎉"))
    prompt = tok.encode("the ")
    for cfg in (GenerationConfig(max_new_tokens=40, seed=3), GenerationConfig(max_new_tokens=40, temperature=0)):
        full = generate_text(model, tok, [prompt], cfg)[0]
        deltas = list(stream_text(model, tok, prompt, cfg))
        assert "".join(deltas) == full.text == tok.decode(full.ids)
        for d in deltas[:-1]:
            assert "\ufffd" not in d or "\ufffd" in tok.decode(full.ids)  # only an honest U+FFFD


def test_generate_text_with_stop_string_returns_text_before_it(tokenizers):
    tok = tokenizers["char"]
    model = _char_model(tok, 2)
    prompt = tok.encode("the ")
    full = generate_text(model, tok, [prompt], GenerationConfig(max_new_tokens=40, temperature=0))[0].text
    stop = full[9:12]
    out = generate_text(model, tok, [prompt], GenerationConfig(max_new_tokens=40, temperature=0, stop=[stop]))[0]
    assert out.text == full[:full.find(stop)] and out.finish_reason == "stop"
    assert "".join(stream_text(model, tok, prompt, GenerationConfig(max_new_tokens=40, temperature=0,
                                                                   stop=[stop]))) == out.text


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("options,message", [
    (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(min_p=1.5), "min_p=1.5 must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size=-2 must be an integer >= 0"),
    (dict(num_beams=0), "num_beams=0 must be an integer >= 1"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1 must be an integer >= 0"),
    (dict(num_beams=4, top_k=5), "beam search (num_beams=4) does not sample; drop top_k"),
    (dict(num_beams=4, temperature=0.8), "does not sample; drop temperature"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 is more than num_beams=2"),
    (dict(temperature=0, top_p=0.9), "temperature=0 is greedy decoding, which ignores top_p"),
    (dict(temperature=0, num_return_sequences=2), "greedy decoding (temperature=0) gives one sequence"),
    (dict(stop=[""]), "stop string '' is not allowed"),
    (dict(early_stopping="sometimes"), "early_stopping='sometimes'"),
])
def test_bad_options_raise_one_clear_error(options, message):
    with pytest.raises(ChoicelmError) as e:
        GenerationConfig(**options)
    assert message in str(e.value)


def test_bad_inputs_raise_clear_errors():
    _, model = hf_gpt2()
    with pytest.raises(ChoicelmError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) exceeds the model's "
                                            r"block size 64; .*at most 4 new tokens"):
        generate_ids(model, [[1] * 60], GenerationConfig(max_new_tokens=10))
    with pytest.raises(ChoicelmError, match="prompt 1 is empty"):
        generate_ids(model, [[1], []], GenerationConfig())
    with pytest.raises(ChoicelmError, match="unknown generation option.*topk.*valid:.*top_k"):
        GenerationConfig.from_options(topk=3)
    with pytest.raises(ChoicelmError, match="streaming gives one sequence"):
        next(stream_text(model, None, [1], GenerationConfig(num_beams=2)))


# ----------------------------------------------------------------------------- Python API and CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizers):
    """A checkpoint written by hand: a tiny GPT with the char tokenizer."""
    from choicelm.core import checkpoint as ckpt

    root = tmp_path_factory.mktemp("genrun")
    tok = tokenizers["char"]
    tok.save(root / "tok")
    model = _char_model(tok, 4, block_size=160)
    cfg = Config.from_dict({"model": dict(vocab_size=tok.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=32)})
    ckpt.save_checkpoint(root / "run", 1, model, None, {}, yaml.safe_dump(cfg.to_dict()), root / "tok", None)
    return root / "run"


def test_api_generate_batch_stream_and_beams(run_dir):
    lm = choicelm.load(run_dir, "cpu")
    one = lm.generate("the ", max_new_tokens=20, temperature=0)
    assert isinstance(one, str)
    many = lm.generate(["the ", "over the lazy ", "a"], max_new_tokens=20, temperature=0)
    assert many[0] == one and many == [lm.generate(p, max_new_tokens=20, temperature=0)
                                       for p in ["the ", "over the lazy ", "a"]]
    assert "".join(lm.stream("the ", max_new_tokens=20, temperature=0)) == one
    beams = lm.generate(["the ", "a"], max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert len(beams) == 2 and all(len(b) == 2 for b in beams)
    samples = lm.generate("the ", max_new_tokens=8, seed=1, num_return_sequences=3, top_k=4)
    assert len(samples) == 3 and samples == lm.generate("the ", max_new_tokens=8, seed=1, num_return_sequences=3,
                                                         top_k=4)
    with pytest.raises(ChoicelmError, match="unknown generation option"):
        lm.generate("the ", temprature=0)


def test_cli_generate_options_stream_and_stop(run_dir, capsys):
    lm = choicelm.load(run_dir, "cpu")
    full = lm.generate("the ", max_new_tokens=30, temperature=0)
    stop = full[6:8]
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "the ", "--max-new-tokens", "30",
            "--temperature", "0", "--device", "cpu"]
    assert main(args) == 0
    assert capsys.readouterr().out == "the " + full + "\n"
    assert main(args + ["--stream", "--stop", stop, "--stop", "qqq"]) == 0
    assert capsys.readouterr().out == "the " + full[:full.find(stop)] + "\n"
    assert main(args[:-4] + ["--num-beams", "3", "--repetition-penalty", "1.2", "--no-repeat-ngram-size", "3",
                             "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(args[:-4] + ["--min-p", "0.1", "--seed", "3", "--device", "cpu"]) == 0
    assert main(args + ["--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "temperature=0 is greedy decoding, which ignores top_k" in err and err.count("\n") == 1


def test_cli_chat_keeps_history_and_obeys_reset_and_quit(run_dir, capsys, monkeypatch):
    from choicelm.text.chat_template import format_chat

    lm = choicelm.load(run_dir, "cpu")
    assert format_chat([("hi", "hello")], "and?", "Be brief.") == \
        "Be brief.\n\nUser: hi\nAssistant: hello\nUser: and?\nAssistant:"

    def reply(history, message):
        text = lm.generate(format_chat(history, message), max_new_tokens=12, temperature=0, stop=["\nUser:"])
        return text.strip()

    first = reply([], "a b")
    second = reply([("a b", first)], "c d")
    after_reset = reply([], "e f")
    monkeypatch.setattr("sys.stdin", io.StringIO("a b\nc d\n/reset\ne f\n/quit\nnever read\n"))
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(run_dir), "--max-new-tokens", "12", "--temperature", "0",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"model> {first}\n" in out and f"model> {second}\n" in out and f"model> {after_reset}\n" in out
    assert "(history cleared)" in out and "never read" not in out
    # a history too long for the block size loses its oldest turns first
    from choicelm.generation.chat import ChatSession
    session = ChatSession(lm, max_new_tokens=100, temperature=0)
    session.history = [(f"turn {i}", "x" * 10) for i in range(5)]
    prompt = session.prompt_for("now")
    assert prompt == format_chat(session.history[-1:], "now")  # 160 - 100 tokens leave room for one turn only
    with pytest.raises(ChoicelmError, match="message is too long"):
        session.prompt_for("y" * 70)


def test_terminal_chat_encodes_a_typed_special_token_as_text(run_dir, monkeypatch):
    """`choicelm chat` (ChatSession): `<|endoftext|>` typed in a message reaches the model as text, never as the
    special token (issue 18 item 16, as the server does); the prompt text itself still shows it."""
    from choicelm.generation.chat import ChatSession

    lm = choicelm.load(run_dir, "cpu")
    eot = lm.tokenizer.special_token_ids()["<|endoftext|>"]
    session = ChatSession(lm, max_new_tokens=4, temperature=0)
    message = "a <|endoftext|> b"
    assert eot in lm.tokenizer.encode(session.prompt_for(message))  # what encoding the text would do
    expected, seen = session.prompt_ids_for(message), []
    monkeypatch.setattr(lm, "stream", lambda prompt, **options: seen.append(prompt) or iter(["x"]))
    assert "".join(session.reply(message)) == "x"
    assert seen == [expected] and eot not in expected


@pytest.mark.parametrize("onednn", [True, False])
def test_decode_layout_keeps_values_and_outputs(tmp_path, monkeypatch, onednn):
    """fp32: prepacked oneDNN linears, or without oneDNN weights re-stored [in, out]; same values and outputs."""
    from safetensors.torch import load_file, save_model

    from choicelm.models.weight_layout import PackedLinear, prepare_for_decoding, restore_layout

    if onednn and not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)
    for make in (hf_gpt2, hf_llama):
        hf, model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        idx = torch.tensor([prompt_ids(9, 14)])
        with torch.no_grad():
            ref = model(idx).logits
            prepare_for_decoding(prepare_for_decoding(model))  # idempotent
            got = model(idx).logits
        c_attn = model.transformer.h[0].attn.c_attn
        if onednn:
            assert isinstance(c_attn, PackedLinear) and isinstance(model.lm_head, PackedLinear)
        else:
            assert c_attn.weight.stride() == (1, c_attn.weight.shape[0])  # stored [in, out]
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        save_model(restore_layout(model), str(tmp_path / "m.safetensors"))  # safetensors wants contiguous
        assert model.transformer.h[0].attn.c_attn.weight.is_contiguous()
        assert all(torch.equal(before[k], v) for k, v in load_file(str(tmp_path / "m.safetensors")).items())
        prompt = prompt_ids(5, 1)
        prepare_for_decoding(model)
        assert generate_ids(model, [prompt], GenerationConfig(max_new_tokens=32, temperature=0))[0].ids == \
            hf_generate(hf, prompt, max_new_tokens=32, do_sample=False)[0].tolist()
        model.to(torch.bfloat16)  # new weights after packing: repacked, never the stale fp32 copy
        with torch.no_grad():
            packed = model(idx).logits
        torch.testing.assert_close(packed, model(idx).logits.detach(), atol=2e-2, rtol=0)  # grad on: plain F.linear


def test_bf16_prepacked_linears_give_the_same_logits_and_tokens():
    from choicelm.models.weight_layout import PackedLinear, prepare_for_decoding, restore_layout

    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    for make in (hf_gpt2, hf_llama):
        _, model = make()
        model = model.to(torch.bfloat16)
        idx = torch.tensor([prompt_ids(9, 15)])
        prompt = prompt_ids(5, 16)
        cfg = GenerationConfig(max_new_tokens=20, temperature=0)
        with torch.no_grad():
            ref = model(idx).logits.float()
        plain = generate_ids(model, [prompt], cfg)[0].ids
        prepare_for_decoding(model)
        assert isinstance(model.lm_head, PackedLinear) and isinstance(model.transformer.h[1].attn.c_attn, PackedLinear)
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits.float(), ref, atol=2e-2, rtol=0)
        assert generate_ids(model, [prompt], cfg)[0].ids == plain
        # a weight changed after packing is repacked, not served stale
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)
            flipped = model(idx).logits.float()
        expected = model(idx).logits.float().detach()  # with grad enabled: plain F.linear on the weight
        assert not torch.allclose(flipped, ref, atol=1.0)
        torch.testing.assert_close(flipped, expected, atol=2e-2, rtol=0)
        restore_layout(model)
        assert type(model.lm_head) is torch.nn.Linear


def test_the_same_loop_drives_the_lstm():
    """Generation needs only forward(ids, kv_cache=, start_pos=, attention_mask_BS=, logits_to_keep=) and
    new_kv_cache(): the LSTM's recurrent state plays the cache, reordered by beam like the KV cache."""
    from choicelm.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="lstm", vocab_size=V, block_size=64, n_layer=2, n_embd=32, dropout=0.0)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    prompts = [prompt_ids(3, 17), prompt_ids(8, 18)]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    alone = [generate_ids(model, [p], cfg)[0].ids for p in prompts]
    assert [c.ids for c in generate_ids(model, prompts, cfg)] == alone
    with torch.no_grad():  # greedy reference without any state: full forward, argmax, append
        ids = list(prompts[0])
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert alone[0] == ids[3:]
    beams = generate_ids(model, [prompts[0]], GenerationConfig(max_new_tokens=8, num_beams=3, num_return_sequences=3))
    assert len(beams) == 3 and beams[0].ids != beams[1].ids


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_fused_decode_step_gives_hugging_face_logits(layout):
    """FusedStep (what generation uses on a prepared dense GPT) against HF's full forward of each row alone:
    fp32 logits equal to 1e-5 at every step, for a left-padded batch (per-row mask and positions)."""
    from choicelm.models.gpt_decode import FusedStep
    from choicelm.models.weight_layout import prepare_for_decoding

    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not available in this torch build")
    hf, model = PAIRS[layout]()
    prepare_for_decoding(model)
    assert FusedStep.supports(model)
    step = FusedStep(model)
    rows = [prompt_ids(4, 21), prompt_ids(9, 22)]
    L, steps = 9, 6
    n_pad_B = torch.tensor([L - len(r) for r in rows])
    ids_BL = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask_BS = torch.arange(L + steps)[None, :] >= n_pad_B[:, None]
    cache = model.new_kv_cache(2, L + steps)
    with torch.no_grad():
        model(ids_BL, kv_cache=cache, attention_mask_BS=mask_BS[:, :L],
              position_ids_BT=(torch.arange(L)[None, :] - n_pad_B[:, None]).clamp(min=0))
        for t in range(L, L + steps):
            tok_B = torch.tensor(prompt_ids(2, 100 + t))
            got_BV = step(tok_B, cache, t, mask_BS[:, :t + 1], t - n_pad_B)
            for b in range(2):
                rows[b].append(int(tok_B[b]))
                ref_V = hf(torch.tensor([rows[b]])).logits[0, -1]
                torch.testing.assert_close(got_BV[b], ref_V, atol=1e-5, rtol=0)


def test_fused_decode_step_only_takes_models_it_computes_exactly():
    """Anything FusedStep does not compute (hooks, training mode, unprepared linears, MoE) decodes
    through the module forward, with the same tokens."""
    from choicelm.core.config import MoEConfig
    from choicelm.generation.step import ModuleStep, decode_step
    from choicelm.models.gpt_decode import FusedStep
    from choicelm.models.weight_layout import prepare_for_decoding

    _, model = hf_gpt2()
    assert not FusedStep.supports(model)  # plain nn.Linear: not prepared
    prepare_for_decoding(model)
    assert isinstance(decode_step(model), FusedStep)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0)
    fused = generate_ids(model, [prompt_ids(5, 23)], cfg)[0].ids
    calls = []
    handle = model.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
    assert isinstance(decode_step(model), ModuleStep)
    assert generate_ids(model, [prompt_ids(5, 23)], cfg)[0].ids == fused
    assert len(calls) == 8  # the prefill and 7 decode steps all ran the hooked block
    handle.remove()
    assert not FusedStep.supports(model.train())
    assert not FusedStep.supports(model.eval().to(torch.float16))  # oneDNN post-ops here take fp32 / bf16
    moe = prepare_for_decoding(GPT(ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64),
                                   MoEConfig(experts=4, every=1)).eval())
    assert not FusedStep.supports(moe)


# ----------------------------------------------------------------------------- OpenAI's presence / frequency penalties


def _penalized_greedy(model, prompt, n, presence, frequency):
    """OpenAI's definition by hand: a full forward every step (no cache), logits[j] -= presence * [c_j > 0] +
    frequency * c_j over the generated tokens' counts c (the prompt does not count), then argmax."""
    ids, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
            ids.append(tok)
            out.append(tok)
            counts[tok] += 1
    return out


def test_presence_frequency_processor_equals_hand_computed_logits():
    from choicelm.generation.processors import PresenceFrequencyPenalty

    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    ids = torch.tensor([[5, 1, 2, 3, 2, 2],    # generated: the last 3 (3, 2, 2); 5, 1, 2 are the prompt
                        [0, 0, 4, 4, 4, 1]])   # 2 padding, prompt 4, generated 4, 4, 1
    got = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)(ids, scores.clone(), torch.tensor([0, 2]),
                                                                 torch.tensor([3, 3]))
    expected = torch.tensor([[0.0, 1.0, 2.0 - (0.5 + 2 * 0.25), 3.0 - (0.5 + 0.25), 4.0, 5.0],
                             [6.0, 7.0 - (0.5 + 0.25), 8.0, 9.0, 10.0 - (0.5 + 2 * 0.25), 11.0]])
    assert torch.equal(got, expected)
    # negative penalties favour repeats; unset or 0 adds no processor
    got = PresenceFrequencyPenalty(presence=-1.0)(ids[:1], scores[:1].clone(), None, torch.tensor([3]))
    assert torch.equal(got, torch.tensor([[0.0, 1.0, 3.0, 4.0, 4.0, 5.0]]))
    from choicelm.generation.processors import build_processors
    assert build_processors(presence_penalty=0, frequency_penalty=None) == []


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (2.0, 0.0), (0.5, 0.5)])
def test_presence_and_frequency_penalties_from_python(presence, frequency):
    """lm.generate's engine, batched with left padding, against the hand-computed definition; on these inputs
    the penalties change the output (it is not plain greedy)."""
    _, model = hf_gpt2(1)
    prompts = [prompt_ids(4, 31), prompt_ids(9, 32)]
    cfg = GenerationConfig(max_new_tokens=24, temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    got = [c.ids for c in generate_ids(model, prompts, cfg)]
    plain = [c.ids for c in generate_ids(model, prompts, GenerationConfig(max_new_tokens=24, temperature=0))]
    for p, ids, greedy in zip(prompts, got, plain):
        assert ids == _penalized_greedy(model, p, 24, presence, frequency)
        assert ids != greedy
    # beam search takes them too (a history rule, like repetition_penalty)
    beams = generate_ids(model, prompts[:1], GenerationConfig(max_new_tokens=8, num_beams=2, presence_penalty=presence,
                                                              frequency_penalty=frequency))
    assert len(beams) == 1


def test_presence_and_frequency_penalties_from_the_cli(run_dir, capsys):
    lm = choicelm.load(run_dir, "cpu")
    prompt = "the "
    expected = lm.tokenizer.decode(_penalized_greedy(lm.model, lm.tokenizer.encode(prompt), 40, 0.5, 1.5))
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "40", "--temperature",
            "0", "--device", "cpu"]
    assert main(args + ["--presence-penalty", "0.5", "--frequency-penalty", "1.5"]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out != prompt + expected + "\n"  # the penalties changed the text
    assert lm.generate(prompt, max_new_tokens=40, temperature=0, presence_penalty=0.5, frequency_penalty=1.5) == \
        expected


# ----------------------------------------------------------------------------- one validator, every entry point

BAD_OPTIONS = [
    (dict(temperature=float("inf")), "temperature=inf must be a finite number"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(temperature=1e-39), "temperature=1e-39 is out of range"),
    (dict(temperature=1e39), "temperature=1e+39 is out of range"),
    (dict(temperature=10**400), "must be a finite number"),
    (dict(temperature="hot"), "temperature='hot' must be a number"),
    (dict(length_penalty=float("nan")), "length_penalty=nan must be a finite number"),
    (dict(length_penalty=400.0), "length_penalty=400.0 must be in [-10, 10]"),
    (dict(top_p=float("inf")), "top_p=inf must be a finite number"),
    (dict(min_p=float("nan")), "min_p=nan must be a finite number"),
    (dict(repetition_penalty=1e-300), "repetition_penalty=1e-300 is out of range"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5 must be in [-2, 2]"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty=-inf must be a finite number"),
    (dict(seed=-1), "seed=-1 must be an integer in [0, 18446744073709551615]"),
    (dict(seed=2**64), "seed=18446744073709551616 must be an integer"),
    (dict(num_return_sequences=0), "num_return_sequences=0 must be an integer >= 1"),
    (dict(top_k=2.0), "top_k=2.0 must be an integer >= 0"),
    (dict(max_new_tokens=True), "max_new_tokens=True must be an integer >= 0"),
    (dict(num_beams=None), "num_beams=None must be an integer >= 1"),
    (dict(eos_token_id=[1, -2]), "eos_token_id=[1, -2] must be a token id"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS)
def test_the_config_rejects_non_finite_and_out_of_range_values(options, message):
    from choicelm.generation.config import OptionError

    with pytest.raises(OptionError) as e:
        GenerationConfig(**options)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.option == next(iter(options))


def test_python_api_rejects_bad_values(run_dir):
    lm = choicelm.load(run_dir, "cpu")
    for options, message in BAD_OPTIONS:
        with pytest.raises(ChoicelmError, match=message.split("=")[0]):
            lm.generate("the ", **options)
    with pytest.raises(ChoicelmError, match="temperature=1e-39 is out of range"):
        next(lm.stream("the ", temperature=1e-39))
    # the processors check their value with the same declaration
    for make, bad in ((Temperature, 1e-39), (TopP, 1.5), (TopK, -1), (RepetitionPenalty, float("nan"))):
        with pytest.raises(ChoicelmError):
            make(bad)


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "inf"], "temperature=inf must be a finite number"),
    (["--temperature", "nan"], "temperature=nan must be a finite number"),
    (["--temperature", "1e-39"], "temperature=1e-39 is out of range"),
    (["--length-penalty", "nan"], "length_penalty=nan must be a finite number"),
    (["--top-p", "inf"], "top_p=inf must be a finite number"),
    (["--presence-penalty", "5"], "presence_penalty=5.0 must be in [-2, 2]"),
    (["--frequency-penalty=-inf"], "frequency_penalty=-inf must be a finite number"),
    (["--num-samples", "0"], "num_samples=0 must be an integer >= 1"),
    (["--seed=-3"], "seed=-3 must be an integer in [0, "),
])
def test_the_cli_rejects_bad_values_in_one_line(run_dir, capsys, flags, message):
    for verb in (["generate", "--prompt", "the "], ["chat"]):
        if verb == ["chat"] and flags[0] == "--num-samples":
            continue
        capsys.readouterr()
        assert main(verb + ["--checkpoint", str(run_dir), "--device", "cpu", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("choicelm: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("body,param,code", [
    ({"temperature": 1e-39}, "temperature", "invalid_value"),
    ({"temperature": float("nan")}, "temperature", "invalid_value"),  # json.loads reads NaN and Infinity
    ({"temperature": float("inf")}, "temperature", "invalid_value"),
    ({"temperature": 10**400}, "temperature", "invalid_value"),
    ({"temperature": 2.5}, "temperature", "invalid_value"),  # OpenAI's limit: 2
    ({"temperature": "hot"}, "temperature", "invalid_type"),
    ({"top_p": 0}, "top_p", "invalid_value"),
    ({"top_k": 1.5}, "top_k", "invalid_type"),
    ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({"frequency_penalty": float("-inf")}, "frequency_penalty", "invalid_value"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "invalid_value"),
    ({"n": 0}, "n", "invalid_value"),
    ({"n": 9}, "n", "invalid_value"),  # more than --max-batch
    ({"seed": -1}, "seed", "invalid_value"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"stop": ["a", ""]}, "stop", "invalid_value"),
    ({"temperature": 0, "n": 2}, "n", "invalid_value"),
    ({"temperature": 0, "min_p": 0.2}, "min_p", "invalid_value"),
])
def test_the_server_request_fields_are_checked_by_the_config(body, param, code):
    """The request -> options conversion of serve/openai.py: the config's checks, OpenAI's field names and limits; a
    bad field is a 400 naming it."""
    from choicelm.serve.openai import APIError, Options

    with pytest.raises(APIError) as e:
        Options(body, max_batch=8)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code), e.value.message
    ok = Options({"temperature": 0, "top_p": 1, "top_k": 0, "presence_penalty": 0.5, "frequency_penalty": -1,
                  "seed": 2**64 - 1, "n": None}, max_batch=8)
    assert ok.options == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.5,
                          "frequency_penalty": -1.0, "seed": 2**64 - 1}


def test_cli_flags_and_server_fields_are_made_from_the_config(capsys):
    from choicelm.generation.config import OPTIONS, request_fields
    from choicelm.serve.openai import COMMON

    for verb in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        for opt in OPTIONS.values():
            assert (opt.flag_name in out) == opt.flag, opt.name
        assert "--presence-penalty" in out and "--frequency-penalty" in out
    assert request_fields() == {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                "frequency_penalty", "n", "seed", "stop"}
    assert request_fields() <= set(COMMON)


def test_a_tiny_temperature_samples_like_greedy():
    """1/temperature is finite but logits / temperature overflow float32: those rows are scaled from their top
    score, so the draw is the argmax, never NaN."""
    _, model = hf_gpt2(2)
    prompt = prompt_ids(5, 33)
    greedy = generate_ids(model, [prompt], GenerationConfig(max_new_tokens=16, temperature=0))[0].ids
    assert generate_ids(model, [prompt], GenerationConfig(max_new_tokens=16, temperature=1e-30, seed=1))[0].ids == greedy
    scores = torch.tensor([[30.0, -2.0, 1.0, float("-inf")], [3.0, -2.0, 1.0, float("-inf")]])
    inf = float("inf")
    scaled = Temperature(1e-38)(None, scores)
    assert torch.equal(scaled[0], torch.tensor([0.0, -inf, -inf, -inf]))  # 30 / 1e-38 overflows: from the top score
    assert torch.equal(scaled[1], scores[1] / 1e-38)  # no overflow: plain division
    torch.testing.assert_close(Temperature(0.5)(None, scores), scores / 0.5)


# ----------------------------------------------------------------------------- seeded choices, one engine


def test_choice_i_draws_with_seed_plus_i_whatever_else_is_in_the_batch():
    """A seeded row has its own generator: choice i of a prompt equals a single sequence with seed + i (as the
    server's n choices), and a prompt batched with others samples what it samples alone."""
    _, model = hf_gpt2(2)
    a, b = prompt_ids(4, 34), prompt_ids(7, 35)
    cfg = dict(max_new_tokens=12, top_k=20, temperature=1.3)
    three = [c.ids for c in generate_ids(model, [a], GenerationConfig(num_return_sequences=3, seed=5, **cfg))]
    assert three == [generate_ids(model, [a], GenerationConfig(seed=5 + i, **cfg))[0].ids for i in range(3)]
    assert len(set(map(tuple, three))) > 1
    batched = generate_ids(model, [a, b], GenerationConfig(num_return_sequences=2, seed=9, **cfg))
    assert [c.prompt_index for c in batched] == [0, 0, 1, 1]
    assert [c.ids for c in batched[2:]] == [c.ids for c in generate_ids(model, [b], GenerationConfig(
        num_return_sequences=2, seed=9, **cfg))]


def test_rows_leave_the_batch_when_they_finish():
    """Rows that end early (EOS) leave the engine: the others keep their exact greedy tokens, and the model runs
    on fewer rows."""
    from choicelm.generation.engine import Engine, sequences
    from choicelm.generation.step import CausalDecoder

    _, model = hf_gpt2()
    prompts = [prompt_ids(3, 7), prompt_ids(12, 8), prompt_ids(7, 9), prompt_ids(1, 10)]
    alone = [generate_ids(model, [p], GenerationConfig(max_new_tokens=20, temperature=0))[0].ids for p in prompts]
    eos = alone[2][3]
    cfg = GenerationConfig(max_new_tokens=20, temperature=0, eos_token_id=eos)
    engine = Engine(CausalDecoder(model), columns=12 + 19)
    groups = sequences(prompts, cfg)
    rows = [len(engine.admit(groups))]
    while engine.seqs:
        rows.append(len(engine.step()))
    assert rows[-1] < 4 and rows == sorted(rows, reverse=True)
    for group, ids in zip(groups, alone):
        seq = group[0]
        assert seq.ids == (ids[:ids.index(eos)] if eos in ids else ids)
        assert seq.finish_reason == ("eos" if eos in ids else "length")


def test_the_sampler_draws_what_torch_multinomial_draws():
    """Each row draws from its own generator without a multinomial call per row: the tokens are
    torch.multinomial's for that row and seed (so a seeded single sequence is what it always was)."""
    from choicelm.generation.sampling import Sampler

    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    sampler = Sampler([], greedy=False)
    for seed in range(40):
        gens = [torch.Generator().manual_seed(seed + b) for b in range(5)]
        got = sampler.pick(logits, generators=gens)
        want = [int(torch.multinomial(logits[b:b + 1].softmax(-1), 1, generator=torch.Generator().manual_seed(seed + b)))
                for b in range(5)]
        assert got == want
    with pytest.raises(ChoicelmError, match="no token is left"):
        sampler.pick(torch.full((2, 4), float("-inf")))
