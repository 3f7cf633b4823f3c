"""Request bodies are bounded before any handler sees them: a JSON body larger than `MAX_JSON_BYTES` is a 413,
one nested deeper than `MAX_JSON_DEPTH` a 400. Without the depth bound, a 900-deep list in a job's `tuneforge`
object parsed, validated, and then failed in serialisation (a 500), and the connection was reset.

Uploads (multipart/form-data) are not read here: the files API streams them to disk under its own limit.
"""
from __future__ import annotations

import json
import re

MAX_JSON_BYTES = 8 * 2**20  # a chat request of a whole 128k-token context is ~0.5 MB; token-id prompts ~6 bytes/token
MAX_JSON_DEPTH = 64  # OpenAI's JSON schemas (response_format, tools) are limited to 5-10 levels
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in `body` (strings skipped); a malformed body is measured as far as
    it goes, and its syntax left to the JSON parser to report."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(_STRING.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class BodyLimits:
    """Pure ASGI middleware: reads a non-multipart request body (at most `max_bytes`), checks its nesting, and
    hands the same bytes on to the app."""

    def __init__(self, app, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        too_big = _error(413, f"The request body is larger than this server's limit of {self.max_bytes // 2**20} MiB "
                         "for JSON requests", "request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._answer(send, *too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._answer(send, *too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if json_depth(body) > self.max_depth:
            return await self._answer(send, *_error(
                400, f"The request body nests arrays or objects deeper than {self.max_depth} levels; no parameter of "
                "this API needs that many", "nested_too_deep"))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client's disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _answer(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
