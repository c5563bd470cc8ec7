"""What a request must satisfy before its body is read: the Host it names, the API key, the content type, and
the body's size and arrival time.

    Host: a server bound to a loopback address without --api-key answers only requests that name a loopback host
          (localhost, 127.0.0.1, [::1], any port). A web page cannot then reach it through a DNS name that it
          rebinds to 127.0.0.1 (DNS rebinding). `allowed_hosts` replaces that list ("*": any host).
    Key:  with --api-key every /v1 route and /openapi.json need "Authorization: Bearer KEY" (the scheme in any case).
    Type: POST bodies must be application/json (415 otherwise), so a cross-origin form or text/plain POST, which a
          browser sends without asking, is refused; a JSON POST from another origin needs a CORS preflight, which
          this server never grants.
    Size: a body over --max-body-mb is refused (413) without being read; one that does not arrive within
          `body_timeout` seconds gets a 408.
"""

import asyncio
import hmac
import ipaddress

from .errors import APIError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str | None, api_key: str | None, allowed_hosts=None) -> frozenset[str] | None:
    """The Host names to accept, lower case and without port; None = any. Given explicitly, `allowed_hosts` wins
    ("*" in it = any); otherwise loopback names only, for a loopback server without an API key."""
    if allowed_hosts is not None:
        names = frozenset(h.strip().lower().strip("[]") for h in allowed_hosts if h.strip())
        return None if "*" in names else names
    if api_key is None and is_loopback(bind_host):
        return frozenset(LOOPBACK_HOSTS)
    return None


def host_name(header: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostGuard:
    """ASGI middleware: a request whose Host header is not allowed gets a 400 before any route sees it. (Pure ASGI,
    not Starlette's BaseHTTPMiddleware, which would cancel streaming responses.)"""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(header) not in self.allowed:
                shown = repr(header[:100]) if header else "no Host header"
                err = APIError(400, f"this server answers only requests addressed to {', '.join(sorted(self.allowed))}"
                                    f" (got {shown}); a page that reached it under another name may be a DNS-rebinding"
                                    " attack. Set the server's allowed hosts to accept other names", None,
                               "invalid_host")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def authorize(request, api_key: str | None) -> None:
    """With an API key, the request must carry it as 'Authorization: Bearer KEY' (the scheme in any case). A plain
    function called by the routes, not a middleware: the health check and the chat page need no key."""
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        what = "no API key was given" if not given else "the API key is wrong"
        raise APIError(401, f"{what}; send it as the header 'Authorization: Bearer KEY' (the server's --api-key)",
                       None, "invalid_api_key")


def _close(err: APIError) -> APIError:
    err.headers["Connection"] = "close"  # the rest of the body is not read: the connection cannot be reused
    return err


def require_json(request) -> None:
    """415 unless the body is declared as JSON (application/json, any case, any parameters)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"{ctype[:100]!r})" if ctype else "the request has no Content-Type; send the body as JSON "
                            "with 'Content-Type: application/json'", None, "unsupported_media_type")


async def read_body(request, max_bytes: int, timeout: float) -> bytes:
    """The body of a JSON POST: 415 for another content type, 413 beyond max_bytes (at once when Content-Length
    says so, else as soon as the bytes read pass it), 408 when it is not complete within `timeout` seconds."""
    require_json(request)
    limit = f"this server accepts at most {max_bytes / 2**20:g} MB (its --max-body-mb)"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _close(APIError(413, f"the request body is {int(declared):,} bytes; {limit}", None, "request_too_large"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0))
        except TimeoutError:
            raise _close(APIError(408, f"the request body did not arrive within {timeout:g} s ({size:,} bytes came)",
                                  None, "request_timeout")) from None
        if message["type"] == "http.disconnect":
            raise _close(APIError(400, "the client went away before sending the whole body", None, "client_gone"))
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _close(APIError(413, f"the request body is over {max_bytes:,} bytes; {limit}", None,
                                  "request_too_large"))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
