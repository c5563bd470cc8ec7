"""The routes: /v1/models, /v1/completions, /v1/chat/completions, /health, /openapi.json, and the chat page at /.
Each reads the server's context (context.py) from `request.app.state.ctx`."""

import asyncio
import time
import uuid

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import FileResponse

from ..core.errors import ChoicelmError
from ..text.chat_template import TURN_STOP, chat_prompt_ids
from . import openai
from .errors import APIError
from .formats import ChatFormat, CompletionFormat
from .responses import Job, respond
from .security import authorize, read_body

router = APIRouter()

INLINE_JSON_BYTES = 64 * 1024  # bodies larger than this are parsed off the event loop


async def read_json(http: HTTPRequest) -> dict:
    """The checked JSON body of a POST, after the API key."""
    ctx = http.app.state.ctx
    authorize(http, ctx.api_key)
    raw = await read_body(http, ctx.max_body_bytes, ctx.body_timeout)
    if len(raw) > INLINE_JSON_BYTES:
        return await asyncio.to_thread(openai.parse_body, raw)
    return openai.parse_body(raw)


@router.get("/health")
async def health(http: HTTPRequest):
    ctx = http.app.state.ctx
    return {"status": "ok", "model": ctx.name, **ctx.scheduler.stats()}


@router.get("/v1/models")
async def models(http: HTTPRequest):
    ctx = http.app.state.ctx
    authorize(http, ctx.api_key)
    return {"object": "list", "data": [ctx.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def one_model(model_id: str, http: HTTPRequest):
    ctx = http.app.state.ctx
    authorize(http, ctx.api_key)
    openai.check_model(model_id, ctx.name)
    return ctx.model_card()


@router.get("/openapi.json", include_in_schema=False)
async def openapi_schema(http: HTTPRequest):
    authorize(http, http.app.state.ctx.api_key)
    return http.app.openapi()


@router.get("/")
async def index(http: HTTPRequest):
    return FileResponse(http.app.state.ctx.static / "index.html")


@router.get("/static/{file}")
async def static(file: str, http: HTTPRequest):
    path = http.app.state.ctx.static / file
    if "/" in file or not path.is_file():
        raise APIError(404, f"no static file {file[:100]!r}", None, "not_found")
    return FileResponse(path)


async def _checked_request(http: HTTPRequest, fields: set[str]):
    """The server context, the request's JSON body and its generation options, every field checked."""
    ctx = http.app.state.ctx
    body = await read_json(http)
    openai.refuse_unsupported(body, fields)
    openai.check_model(body.get("model"), ctx.name)
    return ctx, body, openai.Options(body, ctx.max_batch)


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    ctx, body, opts = await _checked_request(http, openai.COMPLETION_FIELDS)
    echo = openai.echo(body)
    logprobs = openai.completion_logprobs(body, opts.stream, echo)
    tokenizer = ctx.lm.tokenizer
    items = openai.prompt_items(body, tokenizer.vocab_size, ctx.block)
    for item in items:
        if isinstance(item, str):
            openai.check_length(len(item), "prompt", ctx.block, ctx.chars_per_token)
    prompts = await asyncio.to_thread(openai.prompt_ids, tokenizer, items)
    max_tokens = [openai.max_tokens_for(body, len(p), ctx.block, 16, ("max_tokens",)) for p in prompts]
    fmt = CompletionFormat(tokenizer, f"cmpl-{uuid.uuid4().hex}", int(time.time()), ctx.name, opts.n, len(prompts),
                           echo, [tokenizer.decode(p) if echo else "" for p in prompts], logprobs)
    return await respond(http, Job(ctx, prompts, opts, max_tokens, opts.stop, fmt, logprobs))


@router.post("/v1/chat/completions")
async def chat_completions(http: HTTPRequest):
    ctx, body, opts = await _checked_request(http, openai.CHAT_FIELDS)
    logprobs = openai.chat_logprobs(body, opts.stream)
    messages = openai.chat_messages(body.get("messages"))
    openai.check_length(sum(len(m["content"]) for m in messages), "messages", ctx.block, ctx.chars_per_token)
    try:
        prompt = await asyncio.to_thread(chat_prompt_ids, ctx.lm.tokenizer, messages)  # special-token text: text
    except ChoicelmError as e:  # the model's own template refused the conversation
        raise APIError(400, str(e), "messages", "invalid_value") from None
    max_tokens = openai.max_tokens_for(body, len(prompt), ctx.block, None, ("max_completion_tokens", "max_tokens"))
    fmt = ChatFormat(ctx.lm.tokenizer, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), ctx.name, opts.n, logprobs)
    return await respond(http, Job(ctx, [prompt], opts, [max_tokens], opts.stop + [TURN_STOP], fmt, logprobs))
