"""API keys: `sk-tf-<prefix><secret>`, shown once. Stored as HMAC-SHA256(pepper, key) with the pepper on the
server only, looked up by prefix and compared with `hmac.compare_digest`; never stored in clear."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from tuneforge.service.errors import Unauthorized
from tuneforge.service.storage.store import Store

KEY_PREFIX = "sk-tf-"
KEY_CACHE_SECONDS = 10.0
PREFIX_LEN = 12
ORG_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Org:
    id: str
    name: str


def digest(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def create_key(store: Store, pepper: bytes, org_name: str) -> str:
    """Make the org if it is new, add a key to it and return the key (the only time it is seen in clear)."""
    from tuneforge.errors import SpecError

    if not ORG_NAME.match(org_name):
        raise SpecError(f"--org {org_name!r}: use lowercase letters, digits and '-' (up to 63), e.g. acme")
    org = store.create_org("org-" + secrets.token_hex(12), org_name)
    key = KEY_PREFIX + secrets.token_urlsafe(36)
    store.add_key("key-" + secrets.token_hex(12), org["id"], key[len(KEY_PREFIX): len(KEY_PREFIX) + PREFIX_LEN],
                  digest(pepper, key))
    return key


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header; the scheme is required and, as HTTP says, matched
    without regard to case (`bearer KEY` is the same). None for anything else."""
    scheme, _, key = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def authenticate(store: Store, pepper: bytes, header: str | None) -> Org:
    key = bearer_key(header)
    if key is None:
        raise Unauthorized()
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + PREFIX_LEN + 8:
        raise Unauthorized()
    row = store.key_by_prefix(key[len(KEY_PREFIX): len(KEY_PREFIX) + PREFIX_LEN])
    expected = row["digest"] if row else digest(pepper, "no such key")  # same work either way
    if not hmac.compare_digest(expected, digest(pepper, key)) or row is None:
        raise Unauthorized()
    return Org(row["org_id"], row["org_name"])


# Declares the scheme in the OpenAPI document; the key itself is checked by `authenticate`, with our 401.
bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key from `tuneforge keys create`: `Authorization: Bearer sk-tf-...`")


class KeyCache:
    """Orgs of recently accepted keys, by the key's HMAC (the key itself is never kept), for
    `KEY_CACHE_SECONDS`: a request whose key was seen in that time needs no database query and no thread.
    A key deleted from the database therefore keeps working for up to that long; refusals are never cached."""

    def __init__(self, seconds: float = KEY_CACHE_SECONDS, size: int = 4096):
        self.seconds, self.size = seconds, size
        self.orgs: dict[str, tuple[Org, float]] = {}

    def get(self, key_digest: str) -> Org | None:
        hit = self.orgs.get(key_digest)
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def put(self, key_digest: str, org: Org) -> None:
        if len(self.orgs) >= self.size:
            self.orgs.clear()
        self.orgs[key_digest] = (org, time.monotonic() + self.seconds)


async def current_org(request: Request,
                      _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> Org:
    """FastAPI dependency: the org whose key signed this request (401 otherwise). Runs on the event loop;
    only a key not seen lately is looked up, in the threadpool."""
    state = request.app.state
    header = request.headers.get("authorization")
    cache = getattr(state, "key_cache", None)
    if cache is None:
        cache = state.key_cache = KeyCache()
    key = bearer_key(header)
    if key is None:
        raise Unauthorized()
    presented = digest(state.pepper, key)
    if (org := cache.get(presented)) is not None:
        return org
    org = await run_in_threadpool(authenticate, state.store, state.pepper, header)
    cache.put(presented, org)
    return org
