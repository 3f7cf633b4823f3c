"""API keys: `sk-tf-<prefix><secret>`, shown once. Stored as HMAC-SHA256(pepper, key) with the pepper on the
server only, looked up by prefix and compared with `hmac.compare_digest`; never stored in clear."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from fastapi import Request

from tuneforge.service.errors import Unauthorized
from tuneforge.service.storage.store import Store

KEY_PREFIX = "sk-tf-"
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


def authenticate(store: Store, pepper: bytes, header: str | None) -> Org:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized()
    key = header.removeprefix("Bearer ").strip()
    if not key.startswith(KEY_PREFIX) or len(key) < len(KEY_PREFIX) + PREFIX_LEN + 8:
        raise Unauthorized()
    row = store.key_by_prefix(key[len(KEY_PREFIX): len(KEY_PREFIX) + PREFIX_LEN])
    expected = row["digest"] if row else digest(pepper, "no such key")  # same work either way
    if not hmac.compare_digest(expected, digest(pepper, key)) or row is None:
        raise Unauthorized()
    return Org(row["org_id"], row["org_name"])


def current_org(request: Request) -> Org:
    """FastAPI dependency: the org whose key signed this request (401 otherwise)."""
    state = request.app.state
    return authenticate(state.store, state.pepper, request.headers.get("authorization"))
