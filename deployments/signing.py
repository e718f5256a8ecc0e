"""Signed, expiring artifact URLs, so an `<img src>` can fetch a reference image without
a bearer header while the link still stops working after `ttl_s`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlencode

_DOMAIN = b"sceneref-artifact-url-v1"  # keeps these MACs distinct from anything else keyed the same


class SignatureError(ValueError):
    """A signed URL is malformed, tampered with or expired; answer 403."""


def _mac(path: str, expires: int, secret: str) -> str:
    message = b"\n".join([_DOMAIN, path.encode(), str(expires).encode()])
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_url(path: str, secret: str, *, ttl_s: int, now: float | None = None) -> str:
    """`path?expires=...&sig=...`; the signature covers the path and the expiry."""
    if "?" in path or "#" in path:
        raise ValueError("sign a bare path, without query or fragment")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    expires = int(time.time() if now is None else now) + ttl_s
    return f"{path}?{urlencode({'expires': expires, 'sig': _mac(path, expires, secret)})}"


def verify_signed(path: str, expires: str | int, sig: str, secret: str, *, now: float | None = None) -> None:
    try:
        expiry = int(expires)
    except (TypeError, ValueError):
        raise SignatureError("malformed expiry") from None
    if not isinstance(sig, str) or not hmac.compare_digest(sig.encode(), _mac(path, expiry, secret).encode()):
        raise SignatureError("invalid signature")
    if (time.time() if now is None else now) >= expiry:
        raise SignatureError("link has expired")
