"""What the HTTP API promises and checks at its edge: the error bodies and status codes its
OpenAPI document declares, the JSON body cap, the checks on names taken from the URL, and the
links it returns.

These live beside the ingress, not in it, so the contract can be read (and tested) in one
place: the OpenAPI document is generated from these declarations, and the server's handlers
answer with exactly these bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

JSON_BODY_LIMIT = 64 * 1024
"""Bytes of a JSON request body. The largest valid body is a 2000-character prompt (at most
8000 bytes of UTF-8, or 12 000 as `\\uXXXX` escapes) plus five small fields; 64 KiB is several
times that, and small enough that no client can make a replica parse megabytes of junk."""

MAX_ID_CHARS = 64
_ID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_ID_CHARS)
MAX_NAME_BYTES = 1024  # S3's key limit; a local file system allows less per segment
MAX_SEGMENT_BYTES = 255  # NAME_MAX of common file systems


# --- error bodies -------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer but 422: `detail` says what went wrong in words; `error` is present
    where the answer was produced before routing (the 413 of a body cap)."""

    detail: str
    error: str | None = None


class FieldError(BaseModel):
    field: str = Field(description="the request field, dotted for nested ones; empty for the body as a whole")
    message: str


class ValidationErrorBody(BaseModel):
    """422: what the server sends for invalid fields (not FastAPI's `loc/msg/type` default)."""

    error: str = Field(description="invalid request: field: message; ...")
    detail: list[FieldError]


_WHY = {
    400: "a body that cannot be parsed (not UTF-8, a broken form), or a malformed name in the path",
    401: "missing, malformed, expired, badly signed or wrong-audience token (with WWW-Authenticate)",
    403: "an artifact link that is tampered with or expired",
    404: "unknown, or another user's, generation (ids cannot be probed)",
    409: "the generation is in a state that does not allow this",
    413: "the request body is over the limit (refused while it streams in)",
    415: "the upload is not PNG, JPEG or WEBP by content",
    422: "invalid fields, each named",
    429: "this user's limits (with Retry-After)",
    503: "the queue is full, a store is unreachable or a needed deployment has no live replica (with Retry-After)",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each code with its body model, so the OpenAPI document lists
    what the server really sends. Every route may answer 503 (a store is unreachable)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted({*codes, 503}):
        model = ValidationErrorBody if code == 422 else ErrorBody
        out[code] = {"model": model, "description": _WHY[code]}
    return out


AUTHED = (401, 422)  # any route with a bearer token (422: a malformed path or query value)


def validation_error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The 422 body from pydantic/FastAPI errors: each bad field as `field: message`."""
    fields = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")),
            "message": str(e.get("msg", "invalid")),
        }
        for e in errors
    ]
    summary = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields)
    return {"error": f"invalid request: {summary}", "detail": fields}


# --- names from the URL -------------------------------------------------------------------


def check_generation_id(generation_id: str) -> None:
    """Ids this service hands out are short and plain; anything else cannot exist, so it is a
    404 like any unknown id, answered before the database sees a NUL or a megabyte-long id (a
    NUL is an error on PostgreSQL, not a miss)."""
    if not _ID.fullmatch(generation_id):
        raise HTTPException(404, detail="generation not found")


def check_trace_name(name: str) -> None:
    """400 for a trace file name that no store could hold: control characters (NUL), a segment
    longer than a file name may be, or a key longer than S3 allows. Before, the file system's
    own errors for these escaped as 500s."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise HTTPException(400, detail="trace file name: control characters are not allowed")
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NAME_BYTES or any(len(s) > MAX_SEGMENT_BYTES for s in encoded.split(b"/")):
        raise HTTPException(400, detail=f"trace file name: longer than a stored name may be ({MAX_SEGMENT_BYTES} bytes a segment)")


# --- links --------------------------------------------------------------------------------


def link(public_base_url: str | None, root_path: str, path: str) -> str:
    """A link the API returns. From the configured public base URL when set, else relative to
    the server root (`/api/...`): never from the request's Host header, which any client
    chooses, so a link in a status can never point a user at someone else's host. `root_path`
    is the app's own route prefix, set by Serve's config, not by the client."""
    base = (public_base_url or "").rstrip("/")
    return f"{base}{root_path.rstrip('/')}{path}"


# --- JSON body cap ------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class JsonBodyLimit:
    """413 for a JSON body over `limit` bytes on `paths`, decided from Content-Length when the
    client declares one, else by counting the body as it streams in (stopping at the limit).
    The body is read here and handed to the app whole, which is cheap at this size."""

    def __init__(self, app: ASGIApp, *, paths: tuple[str, ...], limit: int = JSON_BODY_LIMIT):
        self.app = app
        self.paths = frozenset(paths)
        self.limit = limit

    async def __call__(self, scope: Scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else None
        root = scope.get("root_path", "") if path is not None else ""
        if path is None or not (path in self.paths or (root and path.startswith(root) and path[len(root):] in self.paths)):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        payload = json.dumps({
            "error": "request body too large",
            "detail": f"the JSON body limit is {self.limit} bytes",
        }).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": payload})


# --- success bodies -----------------------------------------------------------------------
# Declared so the OpenAPI document shows what a client gets back, not just "an object".


class Accepted(BaseModel):
    """202 of a submission. `status_url` is absolute when `public_base_url` is configured, else
    relative to the server root."""

    generation_id: str
    status: str
    status_url: str


class CancelRequested(BaseModel):
    generation_id: str
    status: str
    cancel_requested: bool


class Requeued(BaseModel):
    generation_id: str
    status: str


class TraceListing(BaseModel):
    generation_id: str
    files: list[str]


class Health(BaseModel):
    status: str
    running_generations: int
    offline: bool


class Ready(BaseModel):
    status: str = Field(description="ready: every deployment a generation needs has a live replica")
    deployments: list[str] = Field(description="the deployments that were checked")
