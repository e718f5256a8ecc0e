"""JWT bearer authentication for the HTTP API.

Two modes: `hs256` with a shared secret from an environment variable (development, small
deployments, `sceneref token`), and `jwks` for tokens from an identity provider whose public
keys are fetched from its JWKS URL. In both, the accepted algorithms are pinned by
configuration, never taken from the token, so `alg: none` and algorithm confusion (an HMAC
token "signed" with a public key, an RSA token sent to an HMAC verifier) are refused.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import jwt
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.signing import SignatureError, sign_url, verify_signed  # re-exported for the ingress
# Token minting lives in pipeline.tokens so the CLI can use it without this Serve-layer module;
# re-exported here for callers that already import it from auth.
from pipeline.tokens import MIN_SECRET_BYTES, SECRET_HINT, WeakSecretError, check_secret, mint_token

MAX_TOKEN_CHARS = 8192
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_SECRET_HINT = SECRET_HINT


class AuthError(Exception):
    """A request's credentials are missing or not acceptable; the ingress answers 401."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class AuthConfigError(ValueError):
    """The service is misconfigured; raised at startup, never per request."""


@dataclass(frozen=True)
class Principal:
    subject: str
    claims: dict[str, Any] = field(default_factory=dict)


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["hs256", "jwks"] = "hs256"
    secret_env: str = "SCENEREF_JWT_SECRET"
    jwks_url: str | None = None
    algorithms: list[str] | None = Field(
        None, description='jwks: default ["RS256", "ES256"]; hs256: always ["HS256"]'
    )
    audience: str | None = None
    issuer: str | None = None
    leeway_s: int = Field(30, ge=0, le=300)
    max_lifetime_s: int = Field(
        24 * 3600,
        gt=0,
        description="longest accepted token lifetime (exp - iat, and exp - now): a token that "
        "never expires (exp 10^30) is a stolen credential that can never be revoked by waiting",
    )
    jwks_cache_s: int = Field(300, gt=0)
    jwks_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _pin_algorithms(self) -> "AuthSettings":
        if self.mode == "hs256":
            if self.algorithms not in (None, ["HS256"]):
                raise ValueError('hs256 mode accepts exactly algorithms=["HS256"]')
            self.algorithms = ["HS256"]
        else:
            if not self.jwks_url:
                raise ValueError("jwks mode needs jwks_url")
            if self.algorithms is None:
                self.algorithms = ["RS256", "ES256"]
            refused = [alg for alg in self.algorithms if alg not in ASYMMETRIC_ALGORITHMS]
            if refused or not self.algorithms:
                raise ValueError(
                    f"jwks mode accepts only asymmetric algorithms {sorted(ASYMMETRIC_ALGORITHMS)}, got {refused}"
                )
        return self


def load_secret(env: str = "SCENEREF_JWT_SECRET") -> str:
    """The HS256 secret from the environment, checked so a weak or missing one fails loudly."""
    secret = os.environ.get(env, "")
    if not secret:
        raise AuthConfigError(f"{env} is not set; set it to a random secret of at least "
                              f"{MIN_SECRET_BYTES} bytes ({_SECRET_HINT.format(env=env)})")
    _check_secret(secret, env)
    return secret


def _check_secret(secret: str, name: str) -> None:
    """The rule is `pipeline.tokens`' (shared with minting); here a weak secret is a config error."""
    try:
        check_secret(secret, name)
    except WeakSecretError as exc:
        raise AuthConfigError(str(exc)) from None


class Authenticator:
    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self.algorithms: list[str] = list(settings.algorithms or [])
        self._secret: str | None = None
        self._jwks: jwt.PyJWKClient | None = None
        if settings.mode == "hs256":
            self._secret = load_secret(settings.secret_env)
        else:
            # Only the JWK Set is cached (with a lifespan), not individual keys: PyJWT's per-key
            # cache never expires, which would keep trusting a key the provider has rotated out.
            self._jwks = jwt.PyJWKClient(
                settings.jwks_url or "",
                cache_jwk_set=True,
                lifespan=settings.jwks_cache_s,
                timeout=settings.jwks_timeout_s,
            )

    def verify(self, token: str) -> Principal:
        """Check signature, algorithm, time claims, audience and issuer; return the subject.

        Blocking in jwks mode (may fetch the key set): call it from a worker thread."""
        if not token:
            raise AuthError("missing bearer token")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError("token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.InvalidTokenError as exc:
            # PyJWT checks `crit` while reading the header, with an error that is not a
            # DecodeError: without this it escaped as a 500 before any signature was checked.
            raise AuthError(f"malformed token header: {exc}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise AuthError(f"token algorithm {alg!r} is not accepted (expected one of {self.algorithms})")
        key = self._key_for(token, header, alg)
        settings = self.settings
        required = ["exp", "sub"] + (["aud"] if settings.audience else []) + (["iss"] if settings.issuer else [])
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                # Always verified: with no audience configured, PyJWT refuses any token that
                # names one (a token for another service is not a token for this one).
                options={"require": required, "verify_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token is not valid yet (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError) as exc:
            raise AuthError(f"invalid token: {exc}") from None
        self._check_lifetime(claims)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthError("token subject ('sub') is empty")
        return Principal(subject=subject, claims=claims)

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        """`exp` far in the future makes a leaked token valid for ever; cap it both against
        `iat` (what the issuer granted) and against now (a token without `iat`)."""
        limit = self.settings.max_lifetime_s
        exp = claims["exp"]  # PyJWT has checked it is a number
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and exp - iat > limit:
            raise AuthError(f"token lifetime (exp - iat) exceeds the maximum of {limit} s")
        if exp - time.time() > limit + self.settings.leeway_s:
            raise AuthError(f"token lifetime (exp - now) exceeds the maximum of {limit} s")

    def _key_for(self, token: str, header: dict[str, Any], alg: str) -> Any:
        if self._secret is not None:
            return self._secret
        assert self._jwks is not None
        if not header.get("kid"):
            raise AuthError("token header has no 'kid'")
        try:
            jwk = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise AuthError("signing keys are unavailable (JWKS fetch failed)") from None
        except jwt.PyJWKClientError:
            raise AuthError(f"no signing key matches kid {header['kid']!r}") from None
        # The key type must fit the pinned algorithm (an EC key never verifies an RSA token).
        if jwk.key_type != _KEY_TYPES.get(alg[:2]):
            raise AuthError(f"key {header['kid']!r} ({jwk.key_type}) cannot verify a {alg} token")
        return jwk.key


def www_authenticate(detail: str | None) -> str:
    """RFC 6750 challenge; without a detail (no credentials at all) no error code is given."""
    if detail is None:
        return 'Bearer realm="sceneref"'
    safe = re.sub(r'[^\x20-\x7e]|["\\]', "'", detail)
    return f'Bearer realm="sceneref", error="invalid_token", error_description="{safe}"'


def unauthorized(detail: str, *, missing: bool = False) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": www_authenticate(None if missing else detail)},
    )


_bearer_scheme = HTTPBearer(auto_error=False, description="JWT bearer token")


def bearer_principal(authenticator: Authenticator) -> Callable[..., Principal]:
    """A FastAPI dependency: `principal: Principal = Depends(bearer_principal(auth))`.

    It is a plain function, so FastAPI runs it in its thread pool and a JWKS fetch never
    blocks the event loop."""

    def principal(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer_scheme),
    ) -> Principal:
        if credentials is None:
            header = request.headers.get("authorization")
            if header is None:
                raise unauthorized("missing Authorization header", missing=True)
            raise unauthorized("Authorization header must be 'Bearer <token>'")
        try:
            return authenticator.verify(credentials.credentials)
        except AuthError as exc:
            raise unauthorized(exc.detail) from None

    return principal


__all__ = [
    "AuthConfigError", "AuthError", "AuthSettings", "Authenticator", "Principal", "SignatureError",
    "bearer_principal", "load_secret", "mint_token", "sign_url", "unauthorized", "verify_signed",
    "www_authenticate",
]
