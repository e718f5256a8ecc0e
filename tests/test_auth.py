"""JWT verification (HS256 and JWKS), algorithm pinning, the FastAPI dependency, signed URLs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from deployments.auth import (
    AuthConfigError,
    AuthError,
    AuthSettings,
    Authenticator,
    Principal,
    bearer_principal,
    mint_token,
)
from deployments.signing import SignatureError, sign_url, verify_signed

SECRET = "s" * 16 + "0123456789abcdef0123"
ENV = "SCENEREF_TEST_JWT_SECRET"


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**extra) -> dict:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600, **extra}


@pytest.fixture
def hs_auth(monkeypatch) -> Authenticator:
    monkeypatch.setenv(ENV, SECRET)
    return Authenticator(AuthSettings(mode="hs256", secret_env=ENV, audience="sceneref", issuer="https://idp.test"))


def hs_token(**extra) -> str:
    return jwt.encode(claims(**{"aud": "sceneref", "iss": "https://idp.test", **extra}), SECRET, algorithm="HS256")


def refused(auth: Authenticator, token: str, fragment: str) -> None:
    with pytest.raises(AuthError) as info:
        auth.verify(token)
    assert fragment in info.value.detail


# --- HS256 ----------------------------------------------------------------------------


def test_hs256_good_token(hs_auth):
    principal = hs_auth.verify(hs_token(scope="generate"))
    assert principal == Principal(subject="alice", claims=principal.claims)
    assert principal.claims["scope"] == "generate"


def test_missing_exp(hs_auth):
    payload = claims(aud="sceneref", iss="https://idp.test")
    del payload["exp"]
    refused(hs_auth, jwt.encode(payload, SECRET, algorithm="HS256"), "'exp'")


def test_missing_or_empty_sub(hs_auth):
    payload = claims(aud="sceneref", iss="https://idp.test")
    del payload["sub"]
    refused(hs_auth, jwt.encode(payload, SECRET, algorithm="HS256"), "'sub'")
    with pytest.raises(AuthError):
        hs_auth.verify(hs_token(sub=""))


def test_expired_beyond_leeway(hs_auth):
    refused(hs_auth, hs_token(exp=int(time.time()) - 120), "expired")
    assert hs_auth.verify(hs_token(exp=int(time.time()) - 5)).subject == "alice"  # within leeway


def test_not_yet_valid(hs_auth):
    refused(hs_auth, hs_token(nbf=int(time.time()) + 600), "not valid yet")
    refused(hs_auth, hs_token(iat=int(time.time()) + 600), "not valid yet")


def test_bad_signature(hs_auth):
    forged = jwt.encode(claims(aud="sceneref", iss="https://idp.test"), "x" * 40, algorithm="HS256")
    refused(hs_auth, forged, "signature")
    header, payload, signature = hs_token().split(".")
    tampered = ".".join([header, b64(claims(sub="admin", aud="sceneref", iss="https://idp.test")), signature])
    refused(hs_auth, tampered, "signature")


def test_alg_none_refused(hs_auth):
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims(aud='sceneref', iss='https://idp.test'))}."
    refused(hs_auth, token, "'none'")


def test_rs256_token_in_hs256_mode(hs_auth):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(aud="sceneref", iss="https://idp.test"), key, algorithm="RS256")
    refused(hs_auth, token, "'RS256'")


def test_wrong_audience_and_issuer(hs_auth):
    refused(hs_auth, hs_token(aud="another-service"), "audience")
    refused(hs_auth, hs_token(iss="https://evil.test"), "issuer")
    no_aud = claims(iss="https://idp.test")
    refused(hs_auth, jwt.encode(no_aud, SECRET, algorithm="HS256"), "'aud'")


def test_malformed_and_oversized(hs_auth):
    refused(hs_auth, "not-a-jwt", "malformed")
    refused(hs_auth, "", "missing")
    refused(hs_auth, "a" * 10000, "too long")


@pytest.mark.parametrize("crit", [["x"], "x", [1], [["nested"]], {"a": 1}, ["exp"]])
def test_crit_header_is_401_not_500(hs_auth, crit):
    """PyJWT refuses an unknown or malformed `crit` while reading the header, with an error the
    header check did not catch (a 500 before any signature was checked)."""
    token = f"{b64({'alg': 'HS256', 'crit': crit})}.{b64(claims(aud='sceneref', iss='https://idp.test'))}.AAAA"
    refused(hs_auth, token, "crit")
    signed = jwt.encode(claims(aud="sceneref", iss="https://idp.test"), SECRET, algorithm="HS256", headers={"crit": ["x"]})
    refused(hs_auth, signed, "crit")


def test_lifetime_is_capped(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(mode="hs256", secret_env=ENV, max_lifetime_s=3600))
    now = int(time.time())
    assert auth.verify(jwt.encode({"sub": "a", "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256"))
    # exp - iat beyond the cap, even though the token is not expired yet
    refused(auth, jwt.encode({"sub": "a", "iat": now - 3000, "exp": now + 1000}, SECRET, algorithm="HS256"), "lifetime")
    # no iat: exp - now beyond the cap (an exp of 10^30 never expires otherwise)
    refused(auth, jwt.encode({"sub": "a", "exp": 10**30}, SECRET, algorithm="HS256"), "lifetime")
    refused(auth, jwt.encode({"sub": "a", "exp": now + 7200}, SECRET, algorithm="HS256"), "lifetime")
    refused(auth, jwt.encode({"sub": "a", "iat": now, "exp": 10**30}, SECRET, algorithm="HS256"), "lifetime")
    assert AuthSettings().max_lifetime_s == 24 * 3600
    with pytest.raises(ValueError):
        AuthSettings(max_lifetime_s=0)


def test_audience_in_token_refused_when_none_configured(monkeypatch):
    """A token minted for another service must not be accepted just because this one has no
    audience configured."""
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(mode="hs256", secret_env=ENV))
    now = int(time.time())
    assert auth.verify(jwt.encode({"sub": "a", "exp": now + 60}, SECRET, algorithm="HS256")).subject == "a"
    refused(auth, jwt.encode({"sub": "a", "exp": now + 60, "aud": "other-api"}, SECRET, algorithm="HS256"), "audience")
    refused(auth, jwt.encode({"sub": "a", "exp": now + 60, "aud": ["x", "y"]}, SECRET, algorithm="HS256"), "audience")


def test_secret_required_at_startup(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(AuthConfigError, match=ENV):
        Authenticator(AuthSettings(mode="hs256", secret_env=ENV))
    monkeypatch.setenv(ENV, "short")
    with pytest.raises(AuthConfigError, match="32 bytes"):
        Authenticator(AuthSettings(mode="hs256", secret_env=ENV))


def test_settings_pin_algorithms():
    assert AuthSettings(mode="hs256").algorithms == ["HS256"]
    with pytest.raises(ValueError):
        AuthSettings(mode="hs256", algorithms=["HS256", "RS256"])
    assert AuthSettings(mode="jwks", jwks_url="https://idp.test/jwks").algorithms == ["RS256", "ES256"]
    with pytest.raises(ValueError):
        AuthSettings(mode="jwks", jwks_url="https://idp.test/jwks", algorithms=["RS256", "HS256"])
    with pytest.raises(ValueError):
        AuthSettings(mode="jwks", jwks_url="https://idp.test/jwks", algorithms=["none"])
    with pytest.raises(ValueError):
        AuthSettings(mode="jwks")


def test_mint_token_round_trip(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    auth = Authenticator(AuthSettings(mode="hs256", secret_env=ENV, audience="sceneref", issuer="sceneref-dev"))
    token = mint_token(SECRET, "bob", ttl_s=60, audience="sceneref", issuer="sceneref-dev")
    principal = auth.verify(token)
    assert principal.subject == "bob"
    assert principal.claims["exp"] - principal.claims["iat"] == 60
    with pytest.raises(ValueError):
        mint_token("short", "bob")


# --- JWKS -----------------------------------------------------------------------------


class _Keys:
    rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def jwks_url():
    keys = [
        {**RSAAlgorithm.to_jwk(_Keys.rsa.public_key(), as_dict=True), "kid": "rsa-1", "use": "sig"},
        {**ECAlgorithm.to_jwk(_Keys.ec.public_key(), as_dict=True), "kid": "ec-1", "use": "sig"},
    ]
    body = json.dumps({"keys": keys}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


@pytest.fixture
def jwks_auth(jwks_url) -> Authenticator:
    return Authenticator(AuthSettings(mode="jwks", jwks_url=jwks_url, audience="sceneref"))


def test_jwks_rsa_and_ec_by_kid(jwks_auth):
    rs = jwt.encode(claims(aud="sceneref"), _Keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(aud="sceneref", sub="carol"), _Keys.ec, algorithm="ES256", headers={"kid": "ec-1"})
    assert jwks_auth.verify(rs).subject == "alice"
    assert jwks_auth.verify(es).subject == "carol"


def test_jwks_kid_mismatch_and_unknown(jwks_auth):
    wrong_key = jwt.encode(claims(aud="sceneref"), _Keys.rsa, algorithm="RS256", headers={"kid": "ec-1"})
    refused(jwks_auth, wrong_key, "cannot verify")
    unknown = jwt.encode(claims(aud="sceneref"), _Keys.rsa, algorithm="RS256", headers={"kid": "nope"})
    refused(jwks_auth, unknown, "no signing key")
    no_kid = jwt.encode(claims(aud="sceneref"), _Keys.rsa, algorithm="RS256")
    refused(jwks_auth, no_kid, "'kid'")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(aud="sceneref"), other, algorithm="RS256", headers={"kid": "rsa-1"})
    refused(jwks_auth, forged, "signature")


def test_jwks_algorithm_confusion(jwks_auth):
    """An HS256 token keyed with the (public) RSA key's PEM must not verify."""
    pem = _Keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    payload = b64(claims(aud="sceneref"))
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    refused(jwks_auth, token, "'HS256'")


def test_jwks_settings_restrict_algorithms(jwks_url):
    auth = Authenticator(AuthSettings(mode="jwks", jwks_url=jwks_url, algorithms=["ES256"]))
    rs = jwt.encode(claims(), _Keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    refused(auth, rs, "'RS256'")


def test_jwks_unreachable():
    auth = Authenticator(AuthSettings(mode="jwks", jwks_url="http://127.0.0.1:9/jwks.json", jwks_timeout_s=2))
    token = jwt.encode(claims(), _Keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    refused(auth, token, "unavailable")


# --- FastAPI dependency ---------------------------------------------------------------


def test_dependency_401_with_challenge(hs_auth):
    app = FastAPI()
    current = bearer_principal(hs_auth)

    @app.get("/me")
    def me(principal: Principal = Depends(current)) -> dict:
        return {"sub": principal.subject}

    client = TestClient(app)
    ok = client.get("/me", headers={"Authorization": f"Bearer {hs_token()}"})
    assert ok.status_code == 200 and ok.json() == {"sub": "alice"}

    missing = client.get("/me")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "error=" not in missing.headers["www-authenticate"]

    basic = client.get("/me", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert basic.status_code == 401 and 'error="invalid_token"' in basic.headers["www-authenticate"]

    expired = client.get("/me", headers={"Authorization": f"Bearer {hs_token(exp=int(time.time()) - 600)}"})
    assert expired.status_code == 401
    challenge = expired.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge and 'error_description="token has expired"' in challenge
    assert expired.json()["detail"] == "token has expired"


# --- signed URLs ----------------------------------------------------------------------


def test_signed_url_good_expired_tampered():
    path = "/api/artifacts/gen-1/scene_1/variation_2.png"
    url = sign_url(path, SECRET, ttl_s=60, now=1_000_000)
    assert url.startswith(path + "?expires=1000060&sig=")
    sig = url.rsplit("sig=", 1)[1]
    verify_signed(path, "1000060", sig, SECRET, now=1_000_030)
    with pytest.raises(SignatureError, match="expired"):
        verify_signed(path, "1000060", sig, SECRET, now=1_000_060)
    with pytest.raises(SignatureError, match="signature"):
        verify_signed(path, "1000999", sig, SECRET, now=1_000_030)  # extended expiry
    with pytest.raises(SignatureError, match="signature"):
        verify_signed(path.replace("gen-1", "gen-2"), "1000060", sig, SECRET, now=1_000_030)
    with pytest.raises(SignatureError, match="signature"):
        verify_signed(path, "1000060", sig, "another-secret-" * 3, now=1_000_030)
    with pytest.raises(SignatureError, match="malformed"):
        verify_signed(path, "soon", sig, SECRET, now=1_000_030)
    fresh = sign_url(path, SECRET, ttl_s=60)
    expires, fresh_sig = fresh.split("?", 1)[1].replace("expires=", "").split("&sig=")
    verify_signed(path, expires, fresh_sig, SECRET)
