"""The OpenAI-compatible HTTP API over one model: /v1/models, /v1/completions, /v1/chat/completions, /health,
and the chat page at /.

Every request field is checked here, by hand, so that each refusal names its field in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}. A field we do not implement is refused with a 400 unless it is
absent, null, or set to its "off" value (best_of 1, suffix "", ...): nothing is silently ignored, and
temperature=0 is greedy. Decoding itself is the scheduler's (scheduler.py).
"""


import asyncio
import collections
import json
import time
import uuid
from pathlib import Path

from ..core.errors import ChoicelmError
from ..generation.chat import TURN_STOP, chat_prompt
from ..generation.config import GenerationConfig, OptionError, request_fields, request_options
from .scheduler import QueueFull, Request, Scheduler

STATIC = Path(__file__).parent / "static"

# fields both endpoints take: the generation options' (declared in generation/config.py) and these
COMMON = ("model", "max_tokens", "stream", "stream_options", "user", *sorted(request_fields()))
COMPLETION_FIELDS = set(COMMON) | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = set(COMMON) | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
# fields we accept only at their "off" value
OFF_VALUES = {"best_of": (None, 1), "suffix": (None, ""),
              "response_format": (None, {"type": "text"})}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- request checking


def _integer(body: dict, name: str, low: int, high: int | None, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        limit = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"{name}={value} is out of range; it must be {limit}", name, "invalid_value")
    return value


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name not in allowed:
            if value is None:
                continue
            raise APIError(400, f"{name} is not supported by this server (choicelm); remove it from the request",
                           name, "unsupported_parameter")
        if name in OFF_VALUES and value not in OFF_VALUES[name]:
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by this server (choicelm); leave it "
                                f"unset (only {json.dumps(OFF_VALUES[name][1])} is accepted)", name,
                           "unsupported_parameter")


class Options:
    """The generation part of a request, checked by the generation config (the one validator; OpenAI's limits):
    becomes a GenerationConfig per prompt."""

    def __init__(self, body: dict, max_batch: int):
        try:
            self.options = request_options(body)
            GenerationConfig(**self.options)  # options that clash (greedy with top_p, or with n > 1)
        except OptionError as e:
            raise APIError(400, str(e), e.field, "invalid_type" if e.kind == "type" else "invalid_value") from None
        self.n = self.options.get("num_return_sequences", 1)
        if self.n > max_batch:
            raise APIError(400, f"n={self.n} is out of range; it must be between 1 and {max_batch} (the server's "
                                "--max-batch)", "n", "invalid_value")
        self.stop = self.options.get("stop", [])
        self.stream = _bool(body, "stream")
        so = body.get("stream_options")
        if so is not None and (not isinstance(so, dict) or set(so) - {"include_usage"}):
            raise APIError(400, "stream_options supports only {\"include_usage\": true|false}", "stream_options",
                           "unsupported_parameter")
        if so is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")
        self.include_usage = _bool(so or {}, "include_usage")

    def generation_config(self, lm, max_tokens: int, stop: list[str]):
        return lm.generation_config(**{**self.options, "max_new_tokens": max_tokens, "stop": stop})


def _prompts(body: dict, tokenizer) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    bad = APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                        "token ids", "prompt", "invalid_type")
    if prompt is None:
        raise APIError(400, "prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise APIError(400, f"prompt token ids must be in 0..{tokenizer.vocab_size - 1}", "prompt",
                               "invalid_value")
        else:
            raise bad
        out.append(ids or [tokenizer.eot_id])  # an empty prompt starts a new document, as GPT-2 does
    return out


def chat_messages(messages) -> list[dict]:
    """OpenAI messages checked and reduced to {role, content} text messages for the model's chat template
    (generation/chat.py): system (and developer) messages joined into one, first."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages", "invalid_type")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and a content", f"messages[{i}]",
                           "invalid_type")
        extra = sorted(k for k, v in m.items() if k not in ("role", "content", "name") and v is not None)
        if extra:
            raise APIError(400, f"messages[{i}].{extra[0]} is not supported by this server (choicelm)",
                           f"messages[{i}].{extra[0]}", "unsupported_parameter")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be {{\"type\": \"text\", \"text\": ...}}; "
                                    "this model reads text only", f"messages[{i}].content", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
        role = m["role"]
        if role in ("system", "developer"):
            system.append(content)
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": content})
        else:
            raise APIError(400, f"messages[{i}].role={role!r} is not supported; use system, user or assistant",
                           f"messages[{i}].role", "invalid_value")
    if messages[-1].get("role") != "user":
        raise APIError(400, "the last message must come from the user", "messages", "invalid_value")
    return ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns


# ----------------------------------------------------------------------------- the app


def create_app(lm, *, model_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64):
    """A FastAPI app serving `lm` (a choicelm.api.LanguageModel). Start and stop it with uvicorn; the decode
    thread starts here and stops at the app's shutdown."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    scheduler = Scheduler(lm, max_batch=max_batch, max_queue=max_queue)
    ckpt = Path(lm.checkpoint)
    name = model_name or (ckpt.parent.name if ckpt.name.startswith("step-") else ckpt.name)
    created = int(time.time())
    block = lm.model.config.block_size

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="choicelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.model_name = name

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        err = APIError(exc.status_code, str(exc.detail), None, None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def authorize(request: HTTPRequest) -> None:
        """With --api-key, every /v1 request must carry it. (A plain function, not an HTTP middleware: Starlette's
        BaseHTTPMiddleware cancels streaming responses.)"""
        if api_key:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                what = "no API key was given" if not given else "the API key is wrong"
                raise APIError(401, f"{what}; send it as the header 'Authorization: Bearer KEY' (the server's "
                                    "--api-key)", None, "invalid_api_key")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "choicelm",
                "max_model_len": block}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorize(http)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, http: HTTPRequest):
        authorize(http)
        _check_model(model_id)
        return model_card()

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{file}")
    async def static(file: str):
        path = STATIC / file
        if "/" in file or not path.is_file():
            raise APIError(404, f"no static file {file!r}", None, "not_found")
        return FileResponse(path)

    def _check_model(model_id) -> None:
        if model_id is None:
            raise APIError(400, "model is required; this server serves " + repr(name), "model",
                           "missing_required_parameter")
        if not isinstance(model_id, str):
            raise APIError(400, "model must be a string", "model", "invalid_type")
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")

    async def read_json(request: HTTPRequest) -> dict:
        authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def max_tokens_for(body: dict, prompt_len: int, default: int | None, names: tuple[str, ...]) -> int:
        given = [(n, _integer(body, n, 1, None, None)) for n in names]
        given = [(n, v) for n, v in given if v is not None]
        param, value = given[0] if given else (names[0], default if default is not None else block - prompt_len)
        if prompt_len + value > block:
            raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                                f"{prompt_len + value} tokens ({prompt_len} in the prompt, {value} for the "
                                f"completion). Please reduce the prompt or {param}.", param,
                           "context_length_exceeded")
        if value < 1:
            raise APIError(400, f"the prompt ({prompt_len} tokens) fills the model's context of {block} tokens; "
                                "shorten it", "messages" if "max_completion_tokens" in names else "prompt",
                           "context_length_exceeded")
        return value

    async def run(http: HTTPRequest, prompts: list[list[int]], opts: Options, max_tokens: list[int], stop,
                  chunk, final, strip_first: bool, logprobs: int | None = None):
        """Submit one Request per prompt; answer with one JSON object, or SSE chunks ending in [DONE]."""
        events = _EventInbox(asyncio.get_running_loop())
        sink = events.put

        requests = []
        try:
            for i, (ids, mt) in enumerate(zip(prompts, max_tokens)):
                cfg = opts.generation_config(lm, mt, stop)
                req = Request(ids, cfg, sink, index_base=i * opts.n, logprobs=logprobs)
                scheduler.submit(req)
                requests.append(req)
        except QueueFull as e:
            for req in requests:
                scheduler.cancel(req)
            raise APIError(429, str(e), None, "queue_full", "rate_limit_exceeded") from None
        except ChoicelmError as e:
            for req in requests:
                scheduler.cancel(req)
            raise APIError(400, str(e), None, "invalid_value") from None

        total = len(prompts) * opts.n
        prompt_tokens = sum(len(p) for p in prompts) * opts.n

        async def events_until_done():
            """Batches of events (whatever arrived since the last wake-up) until every choice has finished."""
            open_choices, started = total, set()
            while open_choices:
                batch = []
                for event in await events.get_all():
                    if event[0] == "error":
                        raise APIError(500, event[1], None, "generation_failed", "server_error")
                    if event[0] == "delta" and strip_first and event[1] not in started:
                        text = event[2].lstrip()  # the template leaves the space after "Assistant:" to the model
                        if not text:
                            continue
                        started.add(event[1])
                        event = ("delta", event[1], text)
                    if event[0] == "finish":
                        open_choices -= 1
                    batch.append(event)
                yield batch

        def cancel_all():
            for req in requests:
                scheduler.cancel(req)

        if not opts.stream:
            texts, reasons, n_tokens = [""] * total, [None] * total, 0
            token_logprobs = [[] for _ in range(total)]  # per choice: (token, logprob, top)
            try:
                async for batch in events_until_done():
                    for event in batch:
                        if event[0] == "delta":
                            texts[event[1]] += event[2]
                        elif event[0] == "logprob":
                            token_logprobs[event[1]].append(event[2:])
                        else:
                            reasons[event[1]] = event[2]
                            n_tokens += event[3]
            finally:
                cancel_all()
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                     "total_tokens": prompt_tokens + n_tokens}
            return JSONResponse(final(texts, reasons, usage, token_logprobs))

        async def sse():
            n_tokens = 0
            try:
                for first in chunk(None, None, None):  # opening chunks (the chat role)
                    yield f"data: {json.dumps(first)}\n\n"
                async for batch in events_until_done():
                    out = []  # one write for everything that arrived together
                    for event in batch:
                        if event[0] == "logprob":  # not requested when streaming (refused before)
                            continue
                        if event[0] == "delta":
                            data = chunk(event[1], event[2], None)
                        else:
                            n_tokens += event[3]
                            data = chunk(event[1], None, event[2])
                        out.append(f"data: {json.dumps(data)}\n\n")
                    if out:
                        yield "".join(out)
                if opts.include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                             "total_tokens": prompt_tokens + n_tokens}
                    yield f"data: {json.dumps(chunk('usage', usage, None))}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                cancel_all()  # a finished request is gone already; a disconnected client's rows are freed now
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_json(http)
        _refuse_unsupported(body, COMPLETION_FIELDS)
        _check_model(body.get("model"))
        opts = Options(body, max_batch)
        echo = _bool(body, "echo")
        logprobs = _integer(body, "logprobs", 0, 5, None)
        if logprobs is not None and (opts.stream or echo):
            raise APIError(400, f"logprobs with {'stream' if opts.stream else 'echo'}=true is not supported by this "
                                "server (choicelm); drop one of them", "logprobs", "unsupported_parameter")
        prompts = _prompts(body, lm.tokenizer)
        max_tokens = [max_tokens_for(body, len(p), 16, ("max_tokens",)) for p in prompts]
        echoes = [lm.tokenizer.decode(p) if echo else "" for p in prompts]
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, text, reason):
            if index is None:  # no opening chunk; echo goes out as the first text of each choice
                return [_completion_chunk(cid, now, name, i, echoes[i // opts.n], None)
                        for i in range(len(prompts) * opts.n) if echo]
            if index == "usage":
                return {"id": cid, "object": "text_completion", "created": now, "model": name, "choices": [],
                        "usage": text}
            return _completion_chunk(cid, now, name, index, text or "", reason)

        def final(texts, reasons, usage, token_logprobs):
            choices = [{"index": i, "text": echoes[i // opts.n] + t, "finish_reason": r,
                        "logprobs": None if logprobs is None else _completion_logprobs(lm.tokenizer, lps, t)}
                       for i, (t, r, lps) in enumerate(zip(texts, reasons, token_logprobs))]
            return {"id": cid, "object": "text_completion", "created": now, "model": name, "choices": choices,
                    "usage": usage}

        return await run(http, prompts, opts, max_tokens, opts.stop, chunk, final, strip_first=False,
                         logprobs=logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await read_json(http)
        _refuse_unsupported(body, CHAT_FIELDS)
        _check_model(body.get("model"))
        opts = Options(body, max_batch)
        want_logprobs = _bool(body, "logprobs")
        top_logprobs = _integer(body, "top_logprobs", 0, 20, None)
        if top_logprobs is not None and not want_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
        if want_logprobs and opts.stream:
            raise APIError(400, "logprobs with stream=true is not supported by this server (choicelm); drop one of "
                                "them", "logprobs", "unsupported_parameter")
        logprobs = (top_logprobs or 0) if want_logprobs else None
        prompt = lm.tokenizer.encode(chat_prompt(lm.tokenizer, chat_messages(body.get("messages"))))
        max_tokens = max_tokens_for(body, len(prompt), None, ("max_completion_tokens", "max_tokens"))
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, text, reason):
            if index is None:
                return [_chat_chunk(cid, now, name, i, {"role": "assistant", "content": ""}, None)
                        for i in range(opts.n)]
            if index == "usage":
                return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name, "choices": [],
                        "usage": text}
            return _chat_chunk(cid, now, name, index, {"content": text} if text is not None else {}, reason)

        def final(texts, reasons, usage, token_logprobs):
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None if logprobs is None else _chat_logprobs(lm.tokenizer, lps, t)}
                       for i, (t, r, lps) in enumerate(zip(texts, reasons, token_logprobs))]
            return {"id": cid, "object": "chat.completion", "created": now, "model": name, "choices": choices,
                    "usage": usage}

        return await run(http, [prompt], opts, [max_tokens], opts.stop + [TURN_STOP], chunk, final, strip_first=True,
                         logprobs=logprobs)

    return app


class _EventInbox:
    """Events from the scheduler thread to one request's coroutine. The loop is woken once per burst, not once per
    event: at 32 streams that is 32 wake-ups a decode step instead of hundreds of cross-thread calls."""

    def __init__(self, loop):
        self.loop, self.items = loop, collections.deque()
        self.ready = asyncio.Event()
        self.wake_scheduled = False

    def put(self, event) -> None:  # scheduler thread
        self.items.append(event)
        if not self.wake_scheduled:
            self.wake_scheduled = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # event loop
        self.wake_scheduled = False
        self.ready.set()

    async def get_all(self) -> list:
        while not self.items:
            self.ready.clear()
            if self.items:
                break
            await self.ready.wait()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out


def _kept_tokens(tokenizer, token_logprobs: list, text: str, lstripped: bool = False) -> list[tuple]:
    """(token string, offset in the text, logprob, top) for the tokens that made the returned text: a stop string
    cuts the text, and the tokens that only spelled the stop string are dropped with it."""
    pieces = [tokenizer.decode([tok]) for tok, _, _ in token_logprobs]
    raw = "".join(pieces)
    skip = len(raw) - len(raw.lstrip()) if lstripped else 0  # the chat reply's leading space is stripped
    out, offset = [], -skip
    for piece, (tok, lp, top) in zip(pieces, token_logprobs):
        if offset >= len(text):
            break
        out.append((piece, max(offset, 0), lp, top))
        offset += len(piece)
    return out


def _completion_logprobs(tokenizer, token_logprobs: list, text: str) -> dict:
    kept = _kept_tokens(tokenizer, token_logprobs, text)
    return {"tokens": [p for p, _, _, _ in kept], "token_logprobs": [lp for _, _, lp, _ in kept],
            "top_logprobs": [{tokenizer.decode([t]): v for t, v in top} for _, _, _, top in kept],
            "text_offset": [o for _, o, _, _ in kept]}


def _chat_logprobs(tokenizer, token_logprobs: list, text: str) -> dict:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    kept = _kept_tokens(tokenizer, token_logprobs, text, lstripped=True)
    return {"content": [{**entry(p, lp), "top_logprobs": [entry(tokenizer.decode([t]), v) for t, v in top]}
                        for p, _, lp, top in kept], "refusal": None}


def _completion_chunk(cid, created, model, index, text, reason) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def _chat_chunk(cid, created, model, index, delta, reason) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}
