"""What a request must satisfy before its body is read: the API key."""

from .errors import APIError


def authorize(request, api_key: str | None) -> None:
    """With --api-key, every /v1 request must carry it. A plain function called by the routes, not a middleware: the
    health check and the chat page need no key (and Starlette's BaseHTTPMiddleware cancels streaming responses)."""
    if api_key:
        given = request.headers.get("authorization", "")
        if given != f"Bearer {api_key}":
            what = "no API key was given" if not given else "the API key is wrong"
            raise APIError(401, f"{what}; send it as the header 'Authorization: Bearer KEY' (the server's "
                                "--api-key)", None, "invalid_api_key")
