"""OpenAI-compatible serving: `create_app(lm)` (app.py) over a continuous-batching Scheduler (scheduler.py),
and `serve(...)`, what `choicelm serve` runs. FastAPI and uvicorn are imported only when a server is made."""

from __future__ import annotations

from .scheduler import QueueFull, Request, Scheduler


def create_app(lm, **kwargs):
    from .app import create_app as _create_app

    return _create_app(lm, **kwargs)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, device: str = "auto", dtype: str | None = None,
          model_name: str | None = None, max_body_mb: float = 8.0, allowed_hosts: list[str] | None = None) -> None:
    """Load a checkpoint and serve it until interrupted (Ctrl-C). Security and limits: serve/security.py."""
    import uvicorn

    from ..api import load
    from .listener import uvicorn_settings

    lm = load(checkpoint, device, dtype)
    app = create_app(lm, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     host=host, allowed_hosts=allowed_hosts, max_body_mb=max_body_mb)
    print(f"serving {app.state.model_name!r} at http://{host}:{port}/ (OpenAI API under /v1, chat page at /)",
          flush=True)
    uvicorn.run(app, host=host, port=port, **uvicorn_settings())


__all__ = ["QueueFull", "Request", "Scheduler", "create_app", "serve"]
