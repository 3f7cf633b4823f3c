"""`Idempotency-Key` on POST: a retry with the same key replays the first answer; while the first is still
running it is a 409; the same key with another payload is a 422. The openai SDK retries timed-out
requests, and that must never create two files or two jobs."""
from __future__ import annotations

import hashlib
import json
from typing import Callable

from pydantic import BaseModel

from tuneforge.service.errors import APIError, Conflict, Unprocessable


def payload_hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def idempotent(store, org_id: str, endpoint: str, key: str | None, request_hash: str,
               run: Callable[[], tuple[int, BaseModel]]) -> tuple[int, dict]:
    """(status, body) of `run()`, or of the first request that used `key`."""
    if not key:
        status, body = run()
        return status, body.model_dump(mode="json")
    if len(key) > 255:
        raise APIError("Idempotency-Key: at most 255 characters", param="Idempotency-Key")
    state, row = store.idempotency_begin(org_id, endpoint, key, request_hash)
    if state == "replay":
        return row["status_code"], json.loads(row["body"])
    if state == "in_flight":
        raise Conflict("A request with this Idempotency-Key is still being processed; retry in a moment",
                       param="Idempotency-Key", code="idempotency_key_in_use")
    if state == "mismatch":
        raise Unprocessable("This Idempotency-Key was already used with a different request; use a new key",
                            param="Idempotency-Key", code="idempotency_key_reused")
    try:
        status, body = run()
    except APIError as e:  # a refusal is an answer too: the same request gets it again
        store.idempotency_finish(org_id, endpoint, key, e.status, json.dumps(e.body()))
        raise
    except BaseException:
        store.idempotency_finish(org_id, endpoint, key, 500, "")
        raise
    dumped = body.model_dump(mode="json")
    store.idempotency_finish(org_id, endpoint, key, status, json.dumps(dumped))
    return status, dumped
