"""The OpenAI-compatible server, end to end: a real uvicorn server on a free 127.0.0.1 port, driven by the real
`openai` client (and raw HTTP where the client hides the wire format). References are lm.generate (greedy results
must be identical whatever else is in the batch) and a hand-written full-forward decoding loop for the OpenAI
penalties."""

import contextlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package brings

import choicelm
from choicelm.core.config import Config
from choicelm.core.errors import ChoicelmError
from choicelm.text.chat_template import TURN_STOP, format_chat
from choicelm.models import build_model
from choicelm.text import Tokenizer
from choicelm.core import checkpoint as ckpt

from conftest import free_port

KEY = "test-key"
TEXT = "the quick brown fox jumps over the lazy dog. END of line\nUser: hi\nAssistant: hello there, friend.\n"


# ----------------------------------------------------------------------------- helpers (test_web_chat uses them too)


def make_checkpoint(root, model_cfg: dict, moe_cfg: dict | None = None, steps: int = 120):
    """A char tokenizer and a GPT trained in-process for a few seconds on TEXT (so it writes real words, loops
    forever and never emits EOS), saved as a checkpoint run directory. Returns the run directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(TEXT * 40 + "".join(chr(c) for c in range(32, 127)) + "\n")
    tok = Tokenizer.train([root / "a.txt"], None, kind="char")
    tok.save(root / "tok")
    cfg = Config.from_dict({"model": dict(vocab_size=tok.vocab_size, dropout=0.0, **model_cfg),
                            **({"moe": moe_cfg} if moe_cfg else {})})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    data = torch.tensor(tok.encode(TEXT * 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(data) - 65, (16,), generator=g).tolist()
        x = torch.stack([data[j:j + 64] for j in i])
        y = torch.stack([data[j + 1:j + 65] for j in i])
        out = model(x, y)
        loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt.save_checkpoint(root / "run", steps, model, None, {}, yaml.safe_dump(cfg.to_dict()), root / "tok", None)
    return root / "run"


@contextlib.contextmanager
def running_server(lm, **kwargs):
    """create_app(lm, **kwargs) under uvicorn (as `choicelm serve` configures it; header_timeout and keep_alive go to
    uvicorn) in a thread on a free port; yields the base URL, stops it after."""
    import uvicorn

    from choicelm.serve import create_app
    from choicelm.serve.listener import uvicorn_config

    settings = {k: kwargs.pop(k) for k in ("header_timeout", "keep_alive") if k in kwargs}
    app = create_app(lm, **kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, **settings))  # the settings `choicelm serve` uses
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    run = make_checkpoint(tmp_path_factory.mktemp("serve"), dict(block_size=512, n_layer=2, n_head=2, n_embd=32))
    return choicelm.load(run, "cpu")


@pytest.fixture(scope="module")
def server(lm):
    with running_server(choicelm.load(lm.checkpoint, "cpu"), api_key=KEY, max_batch=8, max_queue=64) as url:
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw_post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


PROMPTS = ["the ", "jumps", "User: hi\nAssistant:", "lazy dog. END", "x"]


# ----------------------------------------------------------------------------- basics


def test_models_health_and_model_card(server, client):
    assert [m.id for m in client.models.list().data] == ["run"]
    assert client.models.retrieve("run").id == "run"
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["running"] == 0


def test_completion_greedy_identical_to_lm_generate_while_batched(lm, client):
    """Different prompts and lengths decoded concurrently (joining a running batch at different steps) give
    exactly the single-request greedy text."""
    jobs = [(p, 20 + 13 * i) for i, p in enumerate(PROMPTS)] * 2

    def complete(job):
        prompt, n = job
        r = client.completions.create(model="run", prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(complete, jobs))
    for (prompt, n), (text, reason, usage) in zip(jobs, results):
        assert text == lm.generate(prompt, max_new_tokens=n, temperature=0)
        assert reason == "length"
        assert usage.completion_tokens == n and usage.prompt_tokens == len(lm.tokenizer.encode(prompt))


def test_prompt_list_and_token_ids_and_echo(lm, client):
    r = client.completions.create(model="run", prompt=["the ", "jumps"], max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [lm.generate(p, max_new_tokens=12, temperature=0) for p in ["the ", "jumps"]]
    ids = lm.tokenizer.encode("the ")
    r = client.completions.create(model="run", prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == "the " + lm.generate("the ", max_new_tokens=12, temperature=0)


def test_chat_uses_the_chat_template(lm, client):
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there, friend."}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="run", messages=messages, max_tokens=40, temperature=0)
    prompt = format_chat([("hi", "hello there, friend.")], "hi", system="be nice")
    expected = lm.generate(prompt, max_new_tokens=40, temperature=0, stop=[TURN_STOP]).lstrip()
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and expected
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="run", messages=messages, max_completion_tokens=40, temperature=0)
    assert r2.choices[0].message.content == expected


def test_streaming_reassembles_to_the_non_streamed_text(lm, client):
    for prompt in PROMPTS[:3]:
        full = client.completions.create(model="run", prompt=prompt, max_tokens=50, temperature=0).choices[0].text
        chunks = list(client.completions.create(model="run", prompt=prompt, max_tokens=50, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full
        assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="run", messages=messages, max_tokens=60, temperature=0)
    stream = client.chat.completions.create(model="run", messages=messages, max_tokens=60, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_sse_wire_format_ends_with_done(server):
    r = raw_post(server, "/v1/completions", {"model": "run", "prompt": "the ", "max_tokens": 5, "temperature": 0,
                                             "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "text_completion" and first["choices"][0]["index"] == 0


def test_stop_sequences_cut_the_text_and_match_lm_generate(lm, client):
    # greedy text from "the " is "lazy dog. END of line\nUser: ..."; "END" and "g. E" end it, the earliest wins
    for stop in ["END", ["zzz", "g. E"], ["\n", "dog"]]:
        stops = [stop] if isinstance(stop, str) else stop
        expected = lm.generate("the ", max_new_tokens=60, temperature=0, stop=stops)
        r = client.completions.create(model="run", prompt="the ", max_tokens=60, temperature=0, stop=stop)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model="run", prompt="the ", max_tokens=60, temperature=0, stop=stop,
                                             stream=True)
        assert "".join(c.choices[0].text for c in streamed) == expected
    assert lm.generate("the ", max_new_tokens=60, temperature=0, stop=["END"]) == "lazy dog. "


def test_n_choices_and_seed_reproducibility(lm, client):
    kw = dict(model="run", prompt="jumps", max_tokens=30, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 90
    # choice i samples with seed + i: choice 0 is exactly lm.generate with that seed
    assert a.choices[0].text == lm.generate("jumps", max_new_tokens=30, temperature=1.0, seed=7)
    assert a.choices[1].text == lm.generate("jumps", max_new_tokens=30, temperature=1.0, seed=8)
    streamed = client.completions.create(stream=True, **kw)
    texts = ["", "", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [c.text for c in a.choices]
    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                                          temperature=1.5, n=2, seed=3)
    assert len(chat.choices) == 2


def test_top_k_one_is_greedy_and_sampling_options_are_honoured(lm, client):
    greedy = lm.generate("jumps", max_new_tokens=30, temperature=0)
    r = client.completions.create(model="run", prompt="jumps", max_tokens=30, temperature=1.5, extra_body={"top_k": 1})
    assert r.choices[0].text == greedy
    for extra in ({"min_p": 0.3, "top_k": 5}, {"repetition_penalty": 1.3}):
        r = client.completions.create(model="run", prompt="jumps", max_tokens=30, temperature=0.9, top_p=0.8, seed=1,
                                      extra_body=extra)
        assert r.choices[0].text == lm.generate("jumps", max_new_tokens=30, temperature=0.9, top_p=0.8, seed=1,
                                                **extra)


def _penalized_reference(lm, prompt, n, presence, frequency):
    """OpenAI's definition, by hand: full forward every step (no cache), logits[j] -= c[j] * frequency +
    (c[j] > 0) * presence over the generated tokens' counts c, then argmax."""
    ids = lm.tokenizer.encode(prompt)
    counts = torch.zeros(lm.model.config.vocab_size)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids])).logits[0, -1].float()
            tok = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
            ids.append(tok)
            out.append(tok)
            counts[tok] += 1
    return lm.tokenizer.decode(out)


# each case changes the greedy text, and changes it differently from either penalty alone: a server that ignored
# presence_penalty, frequency_penalty or both would fail it (checked below, against the same reference)
PENALTY_CASES = [("jumps", 0.0, 1.5), ("lazy dog. END", 2.0, 0.0), ("the ", -2.0, 0.0), ("lazy dog. END", 1.0, 1.0),
                 ("x", 2.0, -1.0), ("jumps", -1.5, 1.5)]


@pytest.mark.parametrize("prompt, presence, frequency", PENALTY_CASES)
def test_presence_and_frequency_penalties_follow_openai(lm, client, prompt, presence, frequency):
    expected = _penalized_reference(lm, prompt, 40, presence, frequency)
    r = client.completions.create(model="run", prompt=prompt, max_tokens=40, temperature=0,
                                  presence_penalty=presence, frequency_penalty=frequency)
    assert r.choices[0].text == expected
    # the case can fail: ignoring the penalties, or either one of them, gives another text
    assert expected != lm.generate(prompt, max_new_tokens=40, temperature=0)
    if presence:
        assert expected != _penalized_reference(lm, prompt, 40, 0.0, frequency)
    if frequency:
        assert expected != _penalized_reference(lm, prompt, 40, presence, 0.0)


def _reference_logprobs(lm, prompt: str, generated: list[int], k: int):
    """log_softmax of a full forward over prompt + generated: each generated token's logprob and the top k."""
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids + generated])).logits[0].float(), dim=-1)
    rows = logp[len(ids) - 1:len(ids) - 1 + len(generated)]
    chosen = rows.gather(1, torch.tensor(generated)[:, None])[:, 0]
    return chosen.tolist(), torch.topk(rows, k).indices.tolist() if k else None


def test_logprobs_equal_a_full_forward_pass(lm, client):
    r = client.completions.create(model="run", prompt="jumps", max_tokens=20, temperature=0.9, seed=2, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert "".join(lp.tokens) == text and lp.text_offset[0] == 0 and len(lp.tokens) == 20
    generated = lm.tokenizer.encode(text)  # the char tokenizer: one token per character
    chosen, top = _reference_logprobs(lm, "jumps", generated, 3)
    assert lp.token_logprobs == pytest.approx(chosen, abs=1e-4)
    assert [list(t) for t in lp.top_logprobs] == [[lm.tokenizer.decode([i]) for i in row] for row in top]
    # chat: logprobs=true with top_logprobs; a stop string drops the tokens after the cut
    chat = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                          temperature=0, logprobs=True, top_logprobs=2, stop=["friend"])
    content = chat.choices[0].logprobs.content
    reply = chat.choices[0].message.content
    assert "".join(c.token for c in content).strip() == reply.strip() and chat.choices[0].finish_reason == "stop"
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)  # greedy: top 1
    assert all(bytes(c.bytes).decode() == c.token for c in content)


# ----------------------------------------------------------------------------- errors


def _error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def test_bad_requests_get_openai_shaped_400s(server):
    ok = {"model": "run", "prompt": "the ", "max_tokens": 5}
    _error(raw_post(server, "/v1/completions", "{not json"), 400, code="invalid_json")
    _error(raw_post(server, "/v1/completions", "[1, 2]"), 400, code="invalid_json")
    _error(raw_post(server, "/v1/completions", {**ok, "temperature": "hot"}), 400, "temperature", "invalid_type")
    _error(raw_post(server, "/v1/completions", {**ok, "max_tokens": 2.5}), 400, "max_tokens", "invalid_type")
    _error(raw_post(server, "/v1/completions", {**ok, "n": True}), 400, "n")
    _error(raw_post(server, "/v1/completions", {**ok, "temperature": 3}), 400, "temperature", "invalid_value")
    _error(raw_post(server, "/v1/completions", {**ok, "stop": ["a", ""]}), 400, "stop")
    _error(raw_post(server, "/v1/completions", {"model": "run", "max_tokens": 5}), 400, "prompt")
    _error(raw_post(server, "/v1/completions", {**ok, "prompt": [1, "a"]}), 400, "prompt")
    _error(raw_post(server, "/v1/chat/completions", {"model": "run", "messages": "hi"}), 400, "messages")
    _error(raw_post(server, "/v1/chat/completions", {"model": "run", "messages": [{"role": "tool", "content": "x"}]}),
           400, "messages[0].role")
    _error(raw_post(server, "/v1/completions", {"prompt": "the "}), 400, "model")


def test_unsupported_parameters_are_refused_by_name(server):
    ok = {"model": "run", "prompt": "the ", "max_tokens": 5}
    chat = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for extra, param in [({"logprobs": 2, "stream": True}, "logprobs"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
                         ({"logit_bias": {"5": 10}}, "logit_bias"), ({"frobnicate": 1}, "frobnicate")]:
        msg = _error(raw_post(server, "/v1/completions", {**ok, **extra}), 400, param, "unsupported_parameter")
        assert "not supported" in msg
    for extra, param in [({"tools": [{"type": "function"}]}, "tools"), ({"logprobs": True, "stream": True}, "logprobs"),
                         ({"response_format": {"type": "json_object"}}, "response_format")]:
        _error(raw_post(server, "/v1/chat/completions", {**chat, **extra}), 400, param, "unsupported_parameter")
    # their "off" values are fine
    assert raw_post(server, "/v1/completions", {**ok, "logprobs": None, "best_of": 1, "user": "u"}).status_code == 200
    assert raw_post(server, "/v1/chat/completions", {**chat, "logprobs": False}).status_code == 200


def test_greedy_with_sampling_options_or_n_is_refused(server):
    ok = {"model": "run", "prompt": "the ", "max_tokens": 5, "temperature": 0}
    assert "greedy" in _error(raw_post(server, "/v1/completions", {**ok, "n": 2}), 400, "n")
    assert "greedy" in _error(raw_post(server, "/v1/completions", {**ok, "top_p": 0.5}), 400, "top_p")
    assert raw_post(server, "/v1/completions", {**ok, "top_p": 1}).status_code == 200  # 1 = off


def test_prompt_beyond_the_context_is_a_400_with_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="run", prompt="the " * 100, max_tokens=200)
    assert e.value.status_code == 400 and "maximum context length is 512 tokens" in e.value.message
    assert "400 in the prompt, 200 for the completion" in e.value.message
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="run", messages=[{"role": "user", "content": "x" * 600}])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="the ", max_tokens=5)
    assert "'gpt-4' does not exist" in e.value.message and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_missing_or_wrong_api_key_is_401(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        c.completions.create(model="run", prompt="the ", max_tokens=5)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    body = {"model": "run", "prompt": "the ", "max_tokens": 5}
    assert "no API key" in _error(raw_post(server, "/v1/completions", body, key=None), 401, code="invalid_api_key")
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # health and the page need no key


def slowed(lm, seconds: float):
    """lm with every forward (prefill and each decode step) slowed by `seconds`: the model decodes through its
    forward (no fused fast step, which would bypass a slowed forward), so a long request is still running when a
    test acts. The server itself is unchanged."""
    from choicelm.models.gpt import GPT

    class SlowGPT(type(lm.model)):
        fast_decode_step = None  # generation/step.py: decode through forward

        def forward(self, *args, **kwargs):
            time.sleep(seconds)
            return super().forward(*args, **kwargs)

    assert isinstance(lm.model, GPT)
    lm.model.__class__ = SlowGPT
    return lm


@pytest.fixture(scope="module")
def slow_server(lm):
    """One slot, one queue place, and a model slowed to >= 5 ms a step, so a long request is still running
    when the test acts."""
    with running_server(slowed(choicelm.load(lm.checkpoint, "cpu"), 0.005), max_batch=1, max_queue=1) as url:
        yield url


LONG = {"model": "run", "prompt": "the ", "max_tokens": 500, "temperature": 0, "stream": True}


def test_full_queue_is_429(lm, slow_server):
    url = slow_server
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=LONG) as first:
            lines = first.iter_lines()  # (keep the iterator: dropping it closes the stream)
            next(lines)  # running: it holds the only slot
            with http.stream("POST", url + "/v1/completions", json=LONG) as second:  # waits in the queue
                assert wait_until(lambda: http.get(url + "/health").json()["waiting"] == 1)
                c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model="run", prompt="the ", max_tokens=5)
                assert e.value.status_code == 429 and "--max-queue 1" in e.value.message
                assert e.value.body["type"] == "rate_limit_exceeded"
                assert int(e.value.response.headers["retry-after"]) >= 1  # a real 429 says when to retry
                assert second.status_code == 200
        # both clients hung up mid-stream: the running row and the queue place are freed at once
        assert wait_until(lambda: (lambda h: h["running"] == 0 and h["waiting"] == 0)(http.get(url + "/health").json()))
        r = c.completions.create(model="run", prompt="jumps", max_tokens=8, temperature=0)  # serving again
        assert r.choices[0].text == lm.generate("jumps", max_new_tokens=8, temperature=0)


def test_disconnect_mid_stream_frees_the_slot(slow_server):
    url = slow_server
    with httpx.Client(timeout=60) as http:
        before = http.get(url + "/health").json()
        with http.stream("POST", url + "/v1/completions", json=LONG) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
            assert http.get(url + "/health").json()["running"] == 1
        assert wait_until(lambda: http.get(url + "/health").json()["running"] == 0)
        health = http.get(url + "/health").json()
    assert health["cancelled"] == before.get("cancelled", 0) + 1
    # freed at the next step boundary, long before the 500 tokens asked for (>= 2.5 s of slowed steps)
    assert health["tokens"] - before.get("tokens", 0) < 250


# ----------------------------------------------------------------------------- load


def test_32_concurrent_streaming_clients_all_complete(lm, server):
    """32 streaming clients on 8 slots: all finish, none fails, and every greedy text is the single-request text."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + (7 * i) % 40) for i in range(32)]

    def stream(job):
        prompt, n = job
        c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
        chunks = list(c.completions.create(model="run", prompt=prompt, max_tokens=n, temperature=0, stream=True))
        return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, jobs))
    expected = {job: lm.generate(job[0], max_new_tokens=job[1], temperature=0) for job in set(jobs)}
    assert [r[0] for r in results] == [expected[job] for job in jobs]
    assert all(r[1] == "length" for r in results)
    assert httpx.get(server + "/health").json()["running"] == 0


def test_rows_shift_when_the_shared_column_reaches_the_block_size(tmp_path):
    """A tiny block size forces the scheduler to shift rows left and right; greedy texts stay exact."""
    run = make_checkpoint(tmp_path, dict(block_size=64, n_layer=2, n_head=2, n_embd=32), steps=30)
    small = choicelm.load(run, "cpu")
    jobs = [(p, 60 - len(small.tokenizer.encode(p))) for p in PROMPTS] * 3
    with running_server(choicelm.load(run, "cpu"), max_batch=4) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def complete(job):
            return c.completions.create(model="run", prompt=job[0], max_tokens=job[1], temperature=0).choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            texts = list(pool.map(complete, jobs))
        shifts = httpx.get(url + "/health").json().get("shifts", 0)
    assert texts == [small.generate(p, max_new_tokens=n, temperature=0) for p, n in jobs]
    assert shifts > 0


ARCHITECTURES = {
    "moe-expert-choice-causal": (dict(block_size=128, n_layer=2, n_head=2, n_embd=32),
                                 dict(experts=4, every=2, expert_width=64, router="expert_choice_causal",
                                      causal_mode="threshold")),
    "llama-style-rope-gqa": (dict(block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos="rope",
                                  norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False), None),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_other_decoder_architectures_serve_identically_to_lm_generate(tmp_path, arch):
    """MoE with causal expert-choice routing, and the Llama layout (rotary positions per row, grouped-query
    attention) that Hugging Face imports use: batched greedy results equal single-request lm.generate."""
    run = make_checkpoint(tmp_path, *ARCHITECTURES[arch], steps=30)
    ref = choicelm.load(run, "cpu")
    with running_server(choicelm.load(run, "cpu"), max_batch=4) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(lambda p: c.completions.create(model="run", prompt=p, max_tokens=30,
                                                                 temperature=0).choices[0].text, PROMPTS))
    assert texts == [ref.generate(p, max_new_tokens=30, temperature=0) for p in PROMPTS]


def test_an_lstm_checkpoint_is_refused_at_start_up(tmp_path, lm):
    from choicelm.api import LanguageModel
    from choicelm.serve import Scheduler

    cfg = Config.from_dict({"model": dict(kind="lstm", vocab_size=lm.tokenizer.vocab_size, block_size=32, n_layer=1,
                                          n_embd=32)})
    lstm = LanguageModel(build_model(cfg.model).eval(), lm.tokenizer, cfg, tmp_path)
    with pytest.raises(ChoicelmError, match="decoder-only transformer"):
        Scheduler(lstm)


def test_cli_serve_runs_the_real_command(lm):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "choicelm", "serve", "--checkpoint", str(lm.checkpoint.parent),
                             "--port", str(port), "--api-key", "k", "--max-batch", "2", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(up, timeout=60), proc.stdout.read() if proc.poll() is not None else "no answer"
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = c.completions.create(model="run", prompt="jumps", max_tokens=10, temperature=0)
        assert r.choices[0].text == lm.generate("jumps", max_new_tokens=10, temperature=0)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_generation_fields_are_checked_by_the_generation_config(server):
    """The request's generation fields go through GenerationConfig (the one validator): a temperature whose
    reciprocal overflows float32, NaN (which Python's JSON reads) or a huge integer is a 400 naming the field,
    never a failed generation."""
    ok = {"model": "run", "prompt": "the ", "max_tokens": 5}
    for field, raw in (("temperature", "1e-39"), ("temperature", "NaN"), ("top_p", "Infinity"),
                       ("presence_penalty", "1" + "0" * 400), ("frequency_penalty", "2.5")):
        body = json.dumps(ok)[:-1] + f', "{field}": {raw}}}'
        _error(raw_post(server, "/v1/completions", body), 400, field, "invalid_value")
    r = raw_post(server, "/v1/completions", {**ok, "temperature": 0, "presence_penalty": 2, "frequency_penalty": -2})
    assert r.status_code == 200
