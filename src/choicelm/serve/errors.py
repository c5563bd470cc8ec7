"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, whatever fails, including
Starlette's own 404/405s and our bugs (a 500 that still reads as an OpenAI error)."""

import traceback


class APIError(Exception):
    """A refusal: the HTTP status, a message that names the problem, the request field it concerns (param), a
    machine-readable code, and any headers the response needs (Retry-After on a 429)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def _api_error(request, exc: APIError):
    return exc.response()


async def _http_error(request, exc):
    """Starlette's 404 (no such route) and 405 (wrong method)."""
    return APIError(exc.status_code, str(exc.detail), None, None, headers=getattr(exc, "headers", None)).response()


async def _validation_error(request, exc):
    return APIError(400, f"the request is not valid: {exc.errors()!s:.300}", None, "invalid_value").response()


async def _server_error(request, exc: Exception):
    """A bug: logged with its traceback, answered as an OpenAI error rather than a bare text 500."""
    traceback.print_exception(exc)
    return APIError(500, f"internal server error ({type(exc).__name__}); this is a bug in choicelm", None,
                    "internal_error", "server_error").response()


def install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
