"""One error envelope for every failure, as OpenAI's API sends it:
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the matching HTTP status."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tuneforge.errors import DataError, ModelError, OutputError, SpecError, TuneforgeError


class ErrorObject(BaseModel):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request parameter at fault, e.g. training_file, if one is.")
    code: str | None = Field(description="A machine-readable reason, e.g. file_not_found, when there is one.")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorObject


ERROR_STATUSES = {
    400: "Invalid request: a parameter, the body or the object's state is wrong (`param` names what)",
    401: "Missing or invalid API key",
    404: "No such object in this organization",
    409: "Conflict: the object is in use, or a request with this Idempotency-Key is still running",
    413: "The upload, or a JSON request body, is larger than this server's limit",
    422: "This Idempotency-Key was already used with a different request",
    429: "Too busy: too many unfinished jobs in this organization, or too many requests waiting for a model "
         "(see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route: the error statuses it can answer, each with the error envelope."""
    return {status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]} for status in statuses}


def drop_default_validation_responses(schema: dict) -> dict:
    """FastAPI documents a 422 `HTTPValidationError` on every route with parameters; this server answers
    validation problems with 400 in the error envelope instead (see `install_error_handlers`), so that
    default is removed. Routes that really answer 422 declare it with `error_responses`."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422", {})
            ref = answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
            if ref.endswith("/HTTPValidationError"):
                del operation["responses"]["422"]
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]]+")


def without_server_paths(text: str, known: dict[str, str] | None = None) -> str:
    """A message for a client: each `known` server path replaced by the name the client knows it by, and any
    other absolute path by "<server path>" (a client never learns how the server's disk is laid out)."""
    for path, name in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if path:
            text = text.replace(path, name)
    return _SERVER_PATH.sub("<server path>", text)


class APIError(TuneforgeError):
    """An error answered to the client: part of tuneforge's one error hierarchy, with the HTTP status and
    OpenAI's error type it is answered with. The message says what to do."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The statuses the API answers with (their meanings: ERROR_STATUSES above).
class InvalidRequest(APIError): status = 400  # noqa: E701
class Conflict(APIError): status = 409  # noqa: E701
class TooLarge(APIError): status = 413  # noqa: E701
class Unprocessable(APIError): status = 422  # noqa: E701
class TooManyRequests(APIError): status, type = 429, "rate_limit_error"  # noqa: E701
class ServerError(APIError): status, type = 500, "server_error"  # noqa: E701


class Unauthorized(APIError):
    status = 401

    def __init__(self, message: str = "Incorrect or missing API key: send `Authorization: Bearer <key>` "
                 "(make one with `tuneforge keys create`)"):
        super().__init__(message, code="invalid_api_key")


class NotFound(APIError):
    status = 404

    def __init__(self, kind: str, ident: str, param: str | None = None):
        super().__init__(f"No such {kind}: {ident}", param=param, code="not_found")


# A job that failed: the engine's error type decides OpenAI's `error.code` and `error.param`.
JOB_ERRORS = ((DataError, "invalid_training_file", "training_file"), (SpecError, "invalid_job_spec", None),
              (ModelError, "model_error", "model"), (OutputError, "storage_error", None))


def job_error(error: TuneforgeError) -> dict:
    """A failed job's `error` object ({code, param, message}) for the error its training ended with."""
    code, param = next(((code, param) for kind, code, param in JOB_ERRORS if isinstance(error, kind)),
                       ("training_failed", None))
    return {"code": code, "param": param, "message": str(error)}


# pydantic names the branch of a union that failed inside `loc` ("n_epochs.literal['auto']", "stop.list[str]",
# "function-after[_check(), str]"); a client knows the field, not our types.
_UNION_BRANCH = re.compile(r"^(?:[a-z_-]+\[.*\]|int|float|str|bool|bytes|none|list|dict)$")


def _dotted(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and _UNION_BRANCH.match(p))]
    return ".".join(parts) or "body"


def _message(error: dict) -> str:
    msg = str(error.get("msg", "invalid"))
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors: one line per field (the branches of a union folded into one),
    in the terms of the API, not of its Python types."""
    if errors and errors[0].get("type") == "json_invalid":
        where = errors[0].get("loc", ())
        at = where[1] if len(where) > 1 and isinstance(where[1], int) else None
        reason = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        return (f"The request body is not valid JSON: {reason}" + (f" at character {at}" if at is not None else "")
                + "; send a JSON object with Content-Type: application/json"), None
    by_param: dict[str, list[str]] = {}
    extra: list[str] = []
    for e in errors:
        param = _dotted(e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            extra.append(param)
            continue
        messages = by_param.setdefault(param, [])
        if _message(e) not in messages:
            messages.append(_message(e))
    if extra and not by_param:
        return f"Unrecognized request argument supplied: {', '.join(extra)}", extra[0]
    lines = [f"{param}: {' or '.join(messages)}" for param, messages in by_param.items()]
    lines += [f"{param}: unrecognized argument" for param in extra]
    first = next(iter(by_param))
    message = lines[0]
    if len(lines) > 1:
        message += f" (and {len(lines) - 1} more problem(s): " + "; ".join(lines[1:4]) + ")"
    return message, first


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own 405 names only the first route whose
    path matched, so `OPTIONS /v1/files/{id}` answered `Allow: GET` though DELETE is served there too."""
    routes = request.app.router.routes
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


def install_error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()) or [{"loc": (), "msg": "invalid request"}])
        return JSONResponse(InvalidRequest(message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            err.message = f"Method {request.method} not allowed on {request.url.path}"
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # our bug: logged with its traceback
        import logging

        logging.getLogger("tuneforge.service").exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(ServerError("The server had an error while processing your request.").body(),
                            status_code=500)
