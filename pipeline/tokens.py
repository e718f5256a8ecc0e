"""Minting development JWTs (HS256), in one small module that depends only on pyjwt.

Both the `sceneref token` command and the Serve layer's auth (`deployments/auth.py`) need it;
keeping it here lets the CLI mint tokens without importing the Serve layer (the pipeline never
imports `deployments`), while the secret rules stay written once.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

# An HS256 key shorter than the hash output weakens the signature: refuse it everywhere.
MIN_SECRET_BYTES = 32
SECRET_HINT = "e.g. export {env}=$(python -c 'import secrets; print(secrets.token_urlsafe(48))')"


class WeakSecretError(ValueError):
    """The HS256 secret is too short to sign tokens safely."""


def check_secret(secret: str, name: str) -> None:
    """Refuse a secret shorter than MIN_SECRET_BYTES, saying how to make a good one."""
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise WeakSecretError(
            f"{name} is shorter than {MIN_SECRET_BYTES} bytes; "
            f"use a longer random secret ({SECRET_HINT.format(env=name)})"
        )


def mint_token(
    secret: str,
    sub: str,
    *,
    ttl_s: int = 3600,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for development (`sceneref token --sub NAME`), with `iat`/`nbf`/`exp`
    and a random `jti`, so it passes the service's checks as long as its settings match."""
    check_secret(secret, "the secret")
    if not sub:
        raise ValueError("sub must be non-empty")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + ttl_s, "jti": secrets.token_hex(8)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


__all__ = ["MIN_SECRET_BYTES", "SECRET_HINT", "WeakSecretError", "check_secret", "mint_token"]
