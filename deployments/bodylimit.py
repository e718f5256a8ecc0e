"""The request-body limits, enforced while the body streams in, as one ASGI middleware: a JSON
body (`JSON_BODY_LIMIT`) and an upload form (the image limit plus `FORM_ALLOWANCE`) alike.

A route's own size check runs too late for multipart: Starlette parses (and spools to disk) the
whole form before the route function is called, so a 60 MB body was read in full before a
20 MB image limit could refuse it. This middleware sits in front of the parser: it refuses a
declared Content-Length over the limit without reading a byte, and otherwise counts the body as
the app reads it and stops reading as soon as the count passes the limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from deployments.contract import send_problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_BODY_LIMIT = 64 * 1024
"""Bytes of a JSON request body. The largest valid body is a 2000-character prompt (at most
8000 bytes of UTF-8, or 12 000 as `\\uXXXX` escapes) plus five small fields; 64 KiB is several
times that, and small enough that no client can make a replica parse megabytes of junk."""

FORM_ALLOWANCE = 64 * 1024
"""Bytes of a multipart upload that are not the image. The largest form field is the prompt (at
most 2000 characters, so at most 8000 bytes of UTF-8); the other five fields are a few bytes
each; every part adds a boundary line and a header block (about 100-300 bytes with a long
filename). 64 KiB is several times the worst case and 0.3% of the default 20 MiB image limit."""


class _BodyTooLarge(Exception):
    """Raised into the app from `receive` once the body passes the limit: its parsing stops."""


def upload_body_limit(image_bytes: int) -> int:
    """The body limit for a multipart form carrying one image of at most `image_bytes`."""
    return image_bytes + FORM_ALLOWANCE


class BodyLimit:
    """Answers 413 (a Problem, `deployments.contract`) for a request to one of `limits`' paths
    whose body is over that path's limit in bytes: at once when Content-Length says so, else as
    soon as the streamed body passes it (also when the route had started parsing: whatever the
    app answers to the body it never got whole is replaced by the 413). The response says
    `Connection: close`, so the server drops the connection instead of reading the rest of the
    body to reach a next request. Other paths pass untouched.

    Each replica's app is built with its own limits (`deployments.api.create_api`).
    """

    def __init__(self, app: ASGIApp, *, limits: dict[str, int], what: dict[str, str] | None = None):
        self.app = app
        self.limits = dict(limits)
        # What the body of a path is, so a 413 names it ("the image upload, form fields included").
        self.what = dict(what or {})

    def _path(self, scope: Scope) -> str | None:
        if scope["type"] != "http":
            return None
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        # Starlette puts the mount prefix in both `root_path` and `path`; match either form.
        if path not in self.limits and root and path.startswith(root):
            path = path[len(root):]
        return path if path in self.limits else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = self._path(scope)
        if path is None:
            await self.app(scope, receive, send)
            return
        limit, what = self.limits[path], self.what.get(path, "the request body")
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, scope, limit, what, f"Content-Length is {declared}")
            return

        received = 0
        tripped = False
        app_started = False

        async def counted_receive() -> Message:
            nonlocal received, tripped
            if tripped:
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started
            if tripped and not app_started:
                return  # the app's answer to a cut-off body (often a 400 or 500): the 413 replaces it
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not tripped or app_started:
                raise
        if tripped and not app_started:
            await _refuse(send, scope, limit, what, f"more than {limit} bytes were sent")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _refuse(send: Send, scope: Scope, limit: int, what: str, why: str) -> None:
    detail = f"request body too large: {what} may be at most {limit} bytes ({limit / 2**20:.1f} MiB); {why}"
    await send_problem(send, scope, 413, detail, {"Connection": "close"})
