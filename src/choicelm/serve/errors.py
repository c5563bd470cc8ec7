"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, Starlette's own 404/405s included."""


class APIError(Exception):
    """A refusal: the HTTP status, a message that names the problem, the request field it concerns (param) and a
    machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


async def _api_error(request, exc: APIError):
    return exc.response()


async def _http_error(request, exc):
    """Starlette's 404 (no such route) and 405 (wrong method)."""
    return APIError(exc.status_code, str(exc.detail), None, None).response()


def install_error_handlers(app) -> None:
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
