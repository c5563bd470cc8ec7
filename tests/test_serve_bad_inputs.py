"""The server's bad-input suite (issue 18): every malformed request in CASES gets its 4xx (never a 500) with an
OpenAI-shaped error whose message names the problem, and the server still answers a good request afterwards.

Two real uvicorn servers: "open" (no API key, bound to 127.0.0.1 so the Host check is on, a 0.25 MB body limit,
--max-queue 4, --max-batch 8) and "keyed" (--api-key). `pytest -rA tests/test_serve_bad_inputs.py` lists each case;
test_the_suite_is_big_enough counts them."""

import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import choicelm

from test_serve import KEY, httpx, make_checkpoint, running_server

BLOCK = 64
OK = {"model": "run", "prompt": "the ", "max_tokens": 1, "temperature": 0}
CHAT = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
USER = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    id: str
    body: object  # dict -> JSON; str / bytes as is; a callable -> an iterator of chunks (no Content-Length)
    status: int
    says: str  # the message must contain this (case-insensitive): the problem, named
    path: str = "/v1/completions"
    server: str = "open"
    method: str = "POST"
    headers: dict = field(default_factory=dict)
    marks: tuple = ()


def C(id, extra, status, says, **kw):
    """A completion request: OK with `extra` merged in (a None value removes the field)."""
    body = {k: v for k, v in {**OK, **extra}.items() if v is not None or k not in OK}
    return Case(id, body, status, says, **kw)


def H(id, extra, status, says, **kw):
    """A chat request: CHAT with `extra` merged in (a None value removes the field)."""
    body = {k: v for k, v in {**CHAT, **extra}.items() if v is not None or k not in CHAT}
    return Case(id, body, status, says, path="/v1/chat/completions", **kw)


def raw(id, text, status, says, **kw):
    return Case(id, text, status, says, **kw)


DEEP = 100_000
BIG_INT = "1" * 5000  # beyond Python's 4,300-digit limit for int <-> str
HUGE = 10 ** 400  # a valid JSON integer far beyond float range
LONG_TEXT = "y" * (BLOCK * 16 + 1)  # over block x (longest token: 13 characters) characters

CASES = [
    # --- the body is not JSON, not an object, or is hostile JSON
    raw("not-json", "{not json", 400, "not valid JSON"),
    raw("empty-body", "", 400, "not valid JSON"),
    raw("array-body", "[1, 2]", 400, "JSON object"),
    raw("string-body", '"hello"', 400, "JSON object"),
    raw("null-body", "null", 400, "JSON object"),
    raw("number-body", "123", 400, "JSON object"),
    raw("bad-utf8", b'{"model": "run", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
    raw("trailing-comma", '{"model": "run", "prompt": "a",}', 400, "not valid JSON"),
    raw("missing-comma", '{"model": "run" "prompt": "a"}', 400, "not valid JSON"),
    raw("truncated", '{"model": "run", "prompt": "a', 400, "not valid JSON"),
    raw("deep-arrays", '{"model": "run", "prompt": ' + "[" * DEEP + "]" * DEEP + "}", 400, "nests too deeply"),
    raw("deep-objects", '{"model": "run", "prompt": "a", "user": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", 400,
        "nests too deeply", server="keyed"),  # 700 kB: beyond the open server's body limit
    C("nested-40", {"user": json.loads('{"a": ' * 40 + "1" + "}" * 40)}, 400, "nests too deeply"),
    raw("int-5000-digits-max-tokens", '{"model": "run", "prompt": "a", "max_tokens": ' + BIG_INT + "}", 400,
        "4300 digits"),
    raw("int-5000-digits-seed", '{"model": "run", "prompt": "a", "seed": -' + BIG_INT + "}", 400, "4300 digits"),
    raw("surrogate-prompt", '{"model": "run", "prompt": "a\\ud800b"}', 400, "lone surrogate"),
    raw("surrogate-prompt-list", '{"model": "run", "prompt": ["ok", "\\udc00"]}', 400, "lone surrogate"),
    raw("surrogate-stop", '{"model": "run", "prompt": "a", "stop": ["\\ud83d"]}', 400, "lone surrogate"),
    raw("surrogate-model", '{"model": "\\ud800", "prompt": "a"}', 400, "lone surrogate"),
    raw("surrogate-key", '{"model": "run", "prompt": "a", "\\ud800": 1}', 400, "lone surrogate"),
    raw("surrogate-user", '{"model": "run", "prompt": "a", "user": "\\udfff"}', 400, "lone surrogate"),
    raw("surrogate-chat-content", '{"model": "run", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
        "lone surrogate", path="/v1/chat/completions"),
    raw("surrogate-chat-role", '{"model": "run", "messages": [{"role": "\\ud800", "content": "a"}]}', 400,
        "lone surrogate", path="/v1/chat/completions"),
    raw("surrogate-content-part", '{"model": "run", "messages": [{"role": "user", "content": [{"type": "text", '
        '"text": "\\udbff"}]}]}', 400, "lone surrogate", path="/v1/chat/completions"),

    # --- sampling options: wrong types, out of range, not finite
    C("temperature-string", {"temperature": "hot"}, 400, "temperature"),
    C("temperature-list", {"temperature": [1]}, 400, "temperature"),
    C("temperature-object", {"temperature": {}}, 400, "temperature"),
    C("temperature-bool", {"temperature": True}, 400, "temperature"),
    raw("temperature-1e400", '{"model": "run", "prompt": "a", "temperature": 1e400}', 400, "temperature"),
    C("temperature-huge-int", {"temperature": HUGE}, 400, "temperature"),
    C("temperature-minus-huge-int", {"temperature": -HUGE}, 400, "temperature"),
    raw("temperature-nan", '{"model": "run", "prompt": "a", "temperature": NaN}', 400, "temperature"),
    raw("temperature-inf", '{"model": "run", "prompt": "a", "temperature": Infinity}', 400, "temperature"),
    C("temperature-negative", {"temperature": -1}, 400, "temperature"),
    C("temperature-too-high", {"temperature": 2.5}, 400, "temperature"),
    C("temperature-1e-39", {"temperature": 1e-39}, 400, "temperature"),
    C("temperature-5e-324", {"temperature": 5e-324}, 400, "temperature"),
    C("top-p-zero", {"top_p": 0}, 400, "top_p"),
    C("top-p-negative", {"top_p": -0.1}, 400, "top_p"),
    C("top-p-too-high", {"top_p": 1.5}, 400, "top_p"),
    raw("top-p-nan", '{"model": "run", "prompt": "a", "top_p": NaN}', 400, "top_p"),
    C("top-p-string", {"top_p": "1"}, 400, "top_p"),
    C("top-k-negative", {"top_k": -1}, 400, "top_k"),
    C("top-k-float", {"top_k": 1.5}, 400, "top_k"),
    C("top-k-string", {"top_k": "5"}, 400, "top_k"),
    C("top-k-bool", {"top_k": True}, 400, "top_k"),
    C("min-p-too-high", {"min_p": 2}, 400, "min_p"),
    C("min-p-negative", {"min_p": -0.5}, 400, "min_p"),
    C("repetition-penalty-zero", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    C("repetition-penalty-negative", {"repetition_penalty": -1}, 400, "repetition_penalty"),
    C("repetition-penalty-huge", {"repetition_penalty": 1e39}, 400, "repetition_penalty"),
    C("presence-penalty-too-high", {"presence_penalty": 2.5}, 400, "presence_penalty"),
    C("presence-penalty-too-low", {"presence_penalty": -3}, 400, "presence_penalty"),
    raw("presence-penalty-nan", '{"model": "run", "prompt": "a", "presence_penalty": NaN}', 400, "presence_penalty"),
    C("frequency-penalty-huge-int", {"frequency_penalty": HUGE}, 400, "frequency_penalty"),
    C("frequency-penalty-string", {"frequency_penalty": "0"}, 400, "frequency_penalty"),
    raw("frequency-penalty-inf", '{"model": "run", "prompt": "a", "frequency_penalty": -Infinity}', 400,
        "frequency_penalty"),
    C("n-zero", {"n": 0}, 400, "n="),
    C("n-negative", {"n": -1}, 400, "n="),
    C("n-beyond-max-batch", {"n": 9, "temperature": 1}, 400, "n="),
    C("n-float", {"n": 1.0}, 400, "must be an integer"),
    C("n-string", {"n": "2"}, 400, "must be an integer"),
    C("n-bool", {"n": True}, 400, "must be an integer"),
    C("max-tokens-zero", {"max_tokens": 0}, 400, "max_tokens"),
    C("max-tokens-negative", {"max_tokens": -5}, 400, "max_tokens"),
    C("max-tokens-float", {"max_tokens": 2.5}, 400, "max_tokens"),
    C("max-tokens-string", {"max_tokens": "10"}, 400, "max_tokens"),
    C("max-tokens-beyond-context", {"max_tokens": 10 ** 30}, 400, "maximum context length"),
    C("max-tokens-huge-int", {"max_tokens": HUGE}, 400, "maximum context length"),
    C("seed-negative", {"seed": -1}, 400, "seed"),
    C("seed-too-big", {"seed": 2 ** 64}, 400, "seed"),
    C("seed-float", {"seed": 1.5}, 400, "seed"),
    C("seed-string", {"seed": "1"}, 400, "seed"),
    C("stop-empty", {"stop": ""}, 400, "stop"),
    C("stop-empty-item", {"stop": ["a", ""]}, 400, "stop"),
    C("stop-five", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    C("stop-number", {"stop": 5}, 400, "stop"),
    C("stop-number-item", {"stop": [1]}, 400, "stop"),
    C("stop-object", {"stop": {"a": 1}}, 400, "stop"),
    C("stream-string", {"stream": "yes"}, 400, "stream"),
    C("stream-number", {"stream": 1}, 400, "stream"),
    C("stream-options-without-stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    C("stream-options-unknown", {"stream": True, "stream_options": {"foo": 1}}, 400, "stream_options"),
    C("stream-options-string", {"stream": True, "stream_options": "x"}, 400, "stream_options"),
    C("include-usage-string", {"stream": True, "stream_options": {"include_usage": "yes"}}, 400, "include_usage"),
    C("echo-string", {"echo": "yes"}, 400, "echo"),
    C("logprobs-too-many", {"logprobs": 6}, 400, "logprobs"),
    C("logprobs-negative", {"logprobs": -1}, 400, "logprobs"),
    C("logprobs-with-stream", {"logprobs": 2, "stream": True}, 400, "logprobs"),
    C("logprobs-with-echo", {"logprobs": 2, "echo": True}, 400, "logprobs"),
    C("best-of", {"best_of": 3}, 400, "best_of"),
    C("suffix", {"suffix": "x"}, 400, "suffix"),
    C("logit-bias", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
    C("unknown-field", {"frobnicate": 1}, 400, "frobnicate"),
    C("legacy-functions", {"functions": [{"name": "f"}]}, 400, "functions"),
    C("greedy-with-n", {"temperature": 0, "n": 2}, 400, "greedy"),
    C("greedy-with-top-p", {"temperature": 0, "top_p": 0.5}, 400, "greedy"),
    C("greedy-with-top-k", {"temperature": 0, "top_k": 5}, 400, "greedy"),
    C("greedy-with-min-p", {"temperature": 0, "min_p": 0.1}, 400, "greedy"),

    # --- model
    C("model-missing", {"model": None}, 400, "model is required"),
    C("model-number", {"model": 5}, 400, "model must be a string"),
    C("model-list", {"model": ["run"]}, 400, "model must be a string"),
    C("model-unknown", {"model": "gpt-4"}, 404, "does not exist"),
    C("model-empty", {"model": ""}, 404, "does not exist"),
    Case("model-card-unknown", None, 404, "does not exist", path="/v1/models/gpt-4", method="GET"),

    # --- prompt
    C("prompt-missing", {"prompt": None}, 400, "prompt is required"),
    C("prompt-number", {"prompt": 5}, 400, "prompt must be"),
    C("prompt-empty-list", {"prompt": []}, 400, "prompt must be"),
    C("prompt-mixed", {"prompt": [1, "a"]}, 400, "prompt must be"),
    C("prompt-negative-id", {"prompt": [-1]}, 400, "token ids"),
    C("prompt-id-beyond-vocab", {"prompt": [10 ** 9]}, 400, "token ids"),
    C("prompt-huge-id", {"prompt": [HUGE]}, 400, "token ids"),
    C("prompt-bool-ids", {"prompt": [True, False]}, 400, "prompt must be"),
    C("prompt-mixed-lists", {"prompt": [[1, 2], "a", 5]}, 400, "prompt must be"),
    C("prompt-object", {"prompt": {"text": "a"}}, 400, "prompt must be"),
    C("prompt-float-ids", {"prompt": [1.5]}, 400, "prompt must be"),
    C("prompt-too-long-text", {"prompt": LONG_TEXT}, 400, "maximum context length"),
    C("prompt-too-many-ids", {"prompt": [5] * (BLOCK + 1)}, 400, "maximum context length"),
    C("prompt-plus-max-tokens-beyond-context", {"prompt": "ab" * 30, "max_tokens": 10}, 400, "maximum context length"),
    C("prompts-beyond-the-queue", {"prompt": ["a"] * 5}, 400, "--max-queue"),

    # --- chat
    H("messages-missing", {"messages": None}, 400, "messages"),
    H("messages-string", {"messages": "hi"}, 400, "messages"),
    H("messages-empty", {"messages": []}, 400, "messages"),
    H("messages-number-item", {"messages": [1]}, 400, "messages[0]"),
    H("message-without-role", {"messages": [{"content": "x"}]}, 400, "messages[0]"),
    H("message-role-number", {"messages": [{"role": 1, "content": "x"}]}, 400, "messages[0]"),
    H("message-role-tool", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    H("message-role-function", {"messages": [{"role": "function", "content": "x"}]}, 400, "messages[0].role"),
    H("message-without-content", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    H("message-content-number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    H("message-image-part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, 400, "text only"),
    H("message-part-without-text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
      "text only"),
    H("message-tool-calls", {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, 400,
      "tool_calls"),
    H("last-message-from-assistant", {"messages": USER + [{"role": "assistant", "content": "x"}]}, 400,
      "last message"),
    H("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    H("response-format-json", {"response_format": {"type": "json_object"}}, 400, "response_format"),
    H("top-logprobs-without-logprobs", {"top_logprobs": 2}, 400, "top_logprobs"),
    H("top-logprobs-too-many", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    H("chat-logprobs-string", {"logprobs": "yes"}, 400, "logprobs"),
    H("chat-logprobs-with-stream", {"logprobs": True, "stream": True}, 400, "logprobs"),
    H("max-completion-tokens-zero", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    H("max-completion-tokens-beyond-context", {"max_completion_tokens": 1000}, 400, "maximum context length"),
    H("chat-content-too-long", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "maximum context length"),
    H("chat-n-zero", {"n": 0}, 400, "n="),
    H("chat-model-unknown", {"model": "gpt-4"}, 404, "does not exist"),

    # --- HTTP: content type, Host, size, routes
    Case("content-type-text", OK, 415, "application/json", headers={"Content-Type": "text/plain"}),
    Case("content-type-missing", OK, 415, "Content-Type", headers={"Content-Type": None}),
    Case("content-type-form", OK, 415, "application/json",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("content-type-text-chat", CHAT, 415, "application/json", path="/v1/chat/completions",
         headers={"Content-Type": "text/plain;charset=UTF-8"}),
    Case("host-evil", OK, 400, "DNS-rebinding", headers={"Host": "evil.example.com"}),
    Case("host-evil-port", OK, 400, "DNS-rebinding", headers={"Host": "attacker.test:8000"}),
    Case("host-evil-get", None, 400, "DNS-rebinding", path="/health", method="GET", headers={"Host": "rebind.test"}),
    Case("host-lookalike", OK, 400, "DNS-rebinding", headers={"Host": "localhost.attacker.test"}),
    Case("body-over-limit", {**OK, "prompt": "x" * 300_000}, 413, "--max-body-mb"),
    Case("body-over-limit-chunked", lambda: iter([json.dumps({**OK, "prompt": "x" * 300_000}).encode()]), 413,
         "--max-body-mb"),
    Case("get-on-post-route", None, 405, "not allowed", method="GET"),
    Case("put-on-post-route", OK, 405, "not allowed", method="PUT"),
    Case("unknown-route", OK, 404, "not found", path="/v1/engines"),
    Case("static-missing", None, 404, "no static file", path="/static/nothing.js", method="GET"),
    Case("static-traversal", None, 404, "not found", path="/static/..%2Fapp.py", method="GET"),

    # --- API key
    Case("no-key", OK, 401, "no API key", server="keyed"),
    Case("wrong-key", OK, 401, "API key is wrong", server="keyed", headers={"Authorization": "Bearer nope"}),
    Case("key-basic-scheme", OK, 401, "API key is wrong", server="keyed", headers={"Authorization": f"Basic {KEY}"}),
    Case("key-without-scheme", OK, 401, "API key is wrong", server="keyed", headers={"Authorization": KEY}),
    Case("key-scheme-only", OK, 401, "API key is wrong", server="keyed", headers={"Authorization": "Bearer"}),
    Case("key-with-extra", OK, 401, "API key is wrong", server="keyed", headers={"Authorization": f"Bearer {KEY}x"}),
    Case("key-missing-chat", CHAT, 401, "no API key", server="keyed", path="/v1/chat/completions"),
    Case("key-missing-models", None, 401, "no API key", server="keyed", path="/v1/models", method="GET"),
    Case("key-missing-model-card", None, 401, "no API key", server="keyed", path="/v1/models/run", method="GET"),
    Case("key-missing-openapi", None, 401, "no API key", server="keyed", path="/openapi.json", method="GET"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    run = make_checkpoint(tmp_path_factory.mktemp("bad"), dict(block_size=BLOCK, n_layer=1, n_head=2, n_embd=32),
                          steps=5)
    with running_server(choicelm.load(run, "cpu"), host="127.0.0.1", max_body_mb=0.25, max_queue=4,
                        max_batch=8) as open_url, \
            running_server(choicelm.load(run, "cpu"), api_key=KEY, max_batch=8) as keyed_url:
        yield {"open": (open_url, {}), "keyed": (keyed_url, {"Authorization": f"Bearer {KEY}"})}


def send(url: str, case: Case, auth: dict):
    headers = {"Content-Type": "application/json", **(auth if case.status != 401 else {}), **case.headers}
    headers = {k: v for k, v in headers.items() if v is not None}
    body = case.body() if callable(case.body) else case.body
    content = json.dumps(body) if isinstance(body, dict) else body
    if case.method == "GET":
        return httpx.get(url + case.path, headers=headers, timeout=60)
    return httpx.request(case.method, url + case.path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_gets_a_clean_4xx_and_the_server_serves_on(servers, case):
    url, auth = servers[case.server]
    r = send(url, case, auth)
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    assert r.status_code == case.status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert case.says.lower() in err["message"].lower(), err["message"]
    good = httpx.post(url + "/v1/completions", json=OK, headers=auth, timeout=60)
    assert good.status_code == 200 and len(good.json()["choices"]) == 1, good.text


def test_the_suite_is_big_enough():
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
