"""What the HTTP API promises and checks at its edge: the error bodies and status codes its
OpenAPI document declares, the checks on names taken from the URL, and the
links it returns.

These live beside the ingress, not in it, so the contract can be read (and tested) in one
place: the OpenAPI document is generated from these declarations, and the server's handlers
answer with exactly these bodies.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from collections.abc import MutableMapping
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

Scope = MutableMapping[str, Any]  # an ASGI scope

MAX_ID_CHARS = 64
_ID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_ID_CHARS)
MAX_NAME_BYTES = 1024  # S3's key limit; a local file system allows less per segment
MAX_SEGMENT_BYTES = 255  # NAME_MAX of common file systems
TRACE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}(/[A-Za-z0-9_.-]{1,128}){0,6}$"
"""The names trace files have (`scene_1/01_agent1_iteration_1.txt`): plain ASCII segments,
short enough for any store. Declared in the OpenAPI document; any other name is a 400."""


# --- error bodies: RFC 9457 Problem Details --------------------------------------------------

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """Every 4xx/5xx body the service sends, as `application/problem+json` (RFC 9457). One shape,
    so a client reads any error the same way; `detail` is a sentence a person can act on, and
    the string clients of the earlier `{"detail": ...}` bodies already read."""

    type: str = Field("about:blank", description="about:blank: the status code says what kind of problem it is")
    title: str = Field(description="the status code's reason phrase")
    status: int = Field(description="the HTTP status code, repeated for clients that only keep the body")
    detail: str = Field(description="what went wrong with this request, in words")
    instance: str = Field(description="the path of the request that got this answer")


class FieldError(BaseModel):
    field: str = Field(description="the request field, dotted for nested ones; empty for the body as a whole")
    message: str


class ValidationProblem(Problem):
    """422: a Problem whose `errors` name each invalid field (`detail` joins them in one line)."""

    errors: list[FieldError]


_WHY = {
    400: "a body that cannot be parsed (not UTF-8, a broken form), or a malformed name in the path",
    401: "missing, malformed, expired, badly signed or wrong-audience token (with WWW-Authenticate)",
    403: "an artifact link that is tampered with or expired",
    404: "unknown, or another user's, generation (ids cannot be probed)",
    409: "the generation is in a state that does not allow this",
    413: "the request body is over the limit (refused while it streams in)",
    415: "the upload is not PNG, JPEG or WEBP by content",
    422: "invalid fields, each named in `errors`",
    429: "this user's limits (with Retry-After)",
    503: "a store is unreachable, or a deployment a generation needs has no live replica (with Retry-After)",
}

_HEADERS = {
    401: {"WWW-Authenticate": {"description": "the RFC 6750 challenge", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait", "required": True, "schema": {"type": "string"}}},
}

AUTHED = (401,)  # any route with a bearer token
JOB_STORE = (503,)  # any route that reads or writes the job store: 503 while its database is unreachable


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: exactly the error codes it can answer, each with its Problem
    body under `application/problem+json` and its headers, so the OpenAPI document lists what
    the server really sends and a code the route cannot answer is not promised."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in sorted(set(codes)):
        model = ValidationProblem if code == 422 else Problem
        spec: dict[str, Any] = {
            "description": _WHY[code],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
        if code in _HEADERS:
            spec["headers"] = _HEADERS[code]
        out[code] = spec
    return out


def problem_schemas() -> dict[str, Any]:
    """The components `responses()` refers to, for the app's OpenAPI document."""
    schema = ValidationProblem.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.pop("$defs", {})
    components["ValidationProblem"] = schema
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    return components


def problem(status: int, detail: str, instance: str, **extensions: Any) -> dict[str, Any]:
    """A Problem Details body (RFC 9457); `extensions` are extra members such as `errors`."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": instance, **extensions}


def request_path(scope: Scope) -> str:
    """The request's path as the client sent it (percent-encoded), without the query: the
    `instance` of a problem."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1").split("?", 1)[0] if raw else scope.get("path", "")


def validation_problem(errors: list[dict[str, Any]], instance: str) -> dict[str, Any]:
    """The 422 body from pydantic/FastAPI errors: each bad field in `errors`, and all of them as
    `field: message; ...` in `detail`."""
    fields = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")),
            "message": str(e.get("msg", "invalid")),
        }
        for e in errors
    ]
    summary = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields)
    return problem(422, f"invalid request: {summary}", instance, errors=fields)


async def send_problem(send, scope: Scope, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A Problem answered straight from ASGI middleware (before any route runs)."""
    payload = json.dumps(problem(status, detail, request_path(scope))).encode()
    raw = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


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
    if not re.fullmatch(TRACE_NAME_PATTERN, name):
        raise HTTPException(400, detail="trace file name: letters, digits, '_', '.' and '-' in at most 7 segments")


# --- links --------------------------------------------------------------------------------


def link(public_base_url: str | None, root_path: str, path: str) -> str:
    """A link the API returns. From the configured public base URL when set, else relative to
    the server root (`/api/...`): never from the request's Host header, which any client
    chooses, so a link in a status can never point a user at someone else's host. `root_path`
    is the app's own route prefix, set by Serve's config, not by the client."""
    base = (public_base_url or "").rstrip("/")
    return f"{base}{root_path.rstrip('/')}{path}"


# --- success bodies -----------------------------------------------------------------------
# Declared so the OpenAPI document shows what a client gets back, not just "an object".


class Accepted(BaseModel):
    """202 of a submission. `status_url` is absolute when `public_base_url` is configured, else
    relative to the server root."""

    generation_id: str
    status: str
    status_url: str


class CancelRequested(BaseModel):
    """The answer to a cancel: the request was recorded (`cancel_requested`), and `status` is the
    job's status right after. When `final` is true that status is how the job ended: `cancelled`
    (a queued job, or one this replica ran and stopped), or `completed` when its last scene was
    already finishing (a cancel never takes away finished scenes). When `final` is false the
    job runs elsewhere: it stops at that runner's next step, within a few seconds, and ends
    `cancelled`, or `completed` if its last scene was finishing; `GET /api/status` says which.
    `message` says the same in words."""

    generation_id: str
    status: str
    cancel_requested: bool
    final: bool
    message: str


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
    status: str = Field(description="ready: the stores answer and every deployment a generation needs has a live replica")
    deployments: list[str] = Field(description="the deployments that were checked")
    stores: list[str] = Field(default_factory=list, description="the stores that were reached (job store, object stores)")
