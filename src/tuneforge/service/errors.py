"""One error envelope for every failure, as OpenAI's API sends it:
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the matching HTTP status."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error answered to the client. Subclasses fix status and type; the message says what to do."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401

    def __init__(self, message: str = "Incorrect or missing API key: send `Authorization: Bearer <key>` "
                 "(make one with `tuneforge keys create`)"):
        super().__init__(message, code="invalid_api_key")


class NotFound(APIError):
    status = 404

    def __init__(self, kind: str, ident: str, param: str | None = None):
        super().__init__(f"No such {kind}: {ident}", param=param, code="not_found")


class Conflict(APIError):
    status = 409


class TooLarge(APIError):
    status = 413


class Unprocessable(APIError):
    status = 422


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"


class ServerError(APIError):
    status = 500
    type = "server_error"


def _dotted(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _dotted(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"{param}: {first.get('msg', 'invalid')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s): " + "; ".join(
                f"{_dotted(e.get('loc', ()))}: {e.get('msg')}" for e in errors[1:4]) + ")"
        return JSONResponse(InvalidRequest(message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        if exc.status_code == 405:
            err.message = f"Method {request.method} not allowed on {request.url.path}"
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # our bug: logged with its traceback
        import logging

        logging.getLogger("tuneforge.service").exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(ServerError("The server had an error while processing your request.").body(),
                            status_code=500)
