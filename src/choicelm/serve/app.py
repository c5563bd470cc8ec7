"""The OpenAI-compatible HTTP API over one model, assembled: /v1/models, /v1/completions, /v1/chat/completions,
/health, and the chat page at /.

    openai.py     request bodies and fields, checked (each refusal names its field; nothing is silently ignored)
    security.py   Host, API key, content type, body size and time: what a request must pass before it is read
    routes.py     the routes
    responses.py  prompts -> scheduler requests -> one JSON object or SSE chunks; cancelled when the client goes
    context.py    what every route knows: the model, its scheduler, name and limits
    formats.py    the JSON of completions and chat completions, and their log-probabilities
    errors.py     every error in OpenAI's shape {"error": {"message", "type", "param", "code"}}
    listener.py   the uvicorn `choicelm serve` runs (timeouts for half-sent requests)
    scheduler.py  continuous batching: decoding itself
"""

from contextlib import asynccontextmanager
from pathlib import Path

from ..core.errors import ChoicelmError
from .context import ServeContext
from .errors import install_error_handlers
from .scheduler import Scheduler
from .security import HostGuard, allowed_hosts_for

MAX_BODY_MB = 8.0  # a block of 100k tokens is ~0.5 MB of text; 8 MB leaves room for long message histories
BODY_TIMEOUT_S = 30.0


def create_app(lm, *, model_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, host: str | None = None, allowed_hosts: list[str] | None = None,
               max_body_mb: float = MAX_BODY_MB, body_timeout: float = BODY_TIMEOUT_S):
    """A FastAPI app serving `lm` (a choicelm.api.LanguageModel). Start and stop it with uvicorn; the decode
    thread starts here and stops at the app's shutdown.

    host: the address the server listens on; a loopback address without an api_key turns on the Host check
    (security.py), and allowed_hosts replaces its list ("*": any host). max_body_mb: larger bodies get a 413;
    body_timeout: seconds for a body to arrive (408 after)."""
    from fastapi import FastAPI

    from .routes import router

    if not (isinstance(max_body_mb, (int, float)) and 0 < max_body_mb < 2**20):
        raise ChoicelmError(f"--max-body-mb {max_body_mb} must be a number of megabytes > 0")
    scheduler = Scheduler(lm, max_batch=max_batch, max_queue=max_queue)
    ckpt = Path(lm.checkpoint)
    name = model_name or (ckpt.parent.name if ckpt.name.startswith("step-") else ckpt.name)
    # /openapi.json is a route of ours, behind the API key; the interactive /docs stay off
    app = FastAPI(title="choicelm", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ServeContext(lm, scheduler, name, api_key, max_batch, int(max_body_mb * 2**20), body_timeout)
    app.state.scheduler = scheduler
    app.state.model_name = name
    install_error_handlers(app)
    allowed = allowed_hosts_for(host, api_key, allowed_hosts)
    if allowed is not None:
        app.add_middleware(HostGuard, allowed=allowed)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app):
    yield
    app.state.ctx.scheduler.close()
