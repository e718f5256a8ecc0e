"""The ingress's FastAPI app, built by a factory for each replica.

The handlers live on the `Ingress` class and say their route with `@route(...)`, which only
records it; `create_api(server)` builds a new FastAPI app for one replica, with that replica's
settings (upload limit, authenticator) fixed at construction, and registers the bound handlers.
Serve calls it through the class's `__serve_build_asgi_app__` after the constructor, so there is
no module-level app that replicas (or tests) mutate, and two apps in one process never share
state.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.auth import Authenticator, Principal, bearer_principal
from deployments.bodylimit import JSON_BODY_LIMIT, BodyLimit, upload_body_limit
from deployments.contract import (
    PROBLEM_MEDIA_TYPE, problem, problem_schemas, request_path, validation_problem,
)
from pipeline.storage.objectstore import ObjectStoreError

log = logging.getLogger("sceneref.ingress")

UPLOAD_PATHS = ("/api/generate-with-image",)
JSON_PATHS = ("/api/generate",)
_ROUTE = "__sceneref_route__"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


def route(method: str, path: str, **options: Any) -> Callable:
    """Mark a handler method with its HTTP route (FastAPI `add_api_route` options); the app that
    serves it is made later, per replica, by `create_api`."""

    def mark(handler: Callable) -> Callable:
        setattr(handler, _ROUTE, Route(method, path, options))
        return handler

    return mark


def routes_of(cls: type) -> list[tuple[str, Route]]:
    """(method name, route) of every marked handler, in definition order, base classes first
    (Serve serves a subclass of the deployment class)."""
    found: dict[str, Route] = {}
    for klass in reversed(cls.__mro__):
        for name, fn in vars(klass).items():
            if hasattr(fn, _ROUTE):
                found[name] = getattr(fn, _ROUTE)
    return list(found.items())


_bearer = HTTPBearer(auto_error=False, description="JWT bearer token (see `sceneref token`)")


def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    """The caller, from the app's own authenticator (`create_api` puts it on `app.state`). A
    plain function, so FastAPI runs it in its thread pool and a JWKS fetch never blocks the loop."""
    return request.app.state.authenticate(request, credentials)


def create_api(server: Any, *, authenticator: Authenticator, upload_limit_bytes: int) -> FastAPI:
    """A new FastAPI app for one ingress replica: every error a Problem Details body
    (`deployments.contract`) as the OpenAPI document declares it, 503 for an unreachable job or object store, body limits enforced while bodies stream in,
    and `server`'s marked handlers as its routes."""
    app = FastAPI(title="sceneref", version="0.1.0", description="Reference images for the scenes of a short video. "
                  "Every error is a Problem Details body (RFC 9457, application/problem+json).")
    app.state.authenticate = bearer_principal(authenticator)

    def answer(request: Request, status: int, detail: str, headers: dict | None = None, **extensions) -> JSONResponse:
        body = problem(status, detail, request_path(request.scope), **extensions)
        return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Every HTTPException (the routes', the auth's, the router's 404 and 405) as a Problem."""
        if exc.status_code < 400:
            return Response(status_code=exc.status_code, headers=exc.headers)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return answer(request, exc.status_code, detail, exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field (`deployments.contract.ValidationProblem`)."""
        body = validation_problem(list(exc.errors()), request_path(request.scope))
        return JSONResponse(body, status_code=422, media_type=PROBLEM_MEDIA_TYPE)

    async def database_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        """The job store is unreachable or locked: a temporary condition, not the client's fault."""
        log.warning("job store unavailable: %s", exc)
        return answer(request, 503, "the job store is unavailable; try again shortly", {"Retry-After": "5"})

    async def object_store_unavailable(request: Request, exc: ObjectStoreError) -> JSONResponse:
        log.warning("object store unavailable: %s", exc)
        return answer(request, 503, "the object store is unavailable; try again shortly", {"Retry-After": "5"})

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: still the one shape (Starlette logs the traceback and re-raises after this)."""
        return answer(request, 500, "internal server error")

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(OperationalError, database_unavailable)
    app.add_exception_handler(ObjectStoreError, object_store_unavailable)
    app.add_exception_handler(Exception, server_error)
    # Refused while they stream in, before Starlette spools or parses the body.
    limits = {path: upload_body_limit(upload_limit_bytes) for path in UPLOAD_PATHS}
    limits.update({path: JSON_BODY_LIMIT for path in JSON_PATHS})
    what = {path: "the image upload (form fields included)" for path in UPLOAD_PATHS}
    what.update({path: "a JSON body" for path in JSON_PATHS})
    app.add_middleware(BodyLimit, limits=limits, what=what)

    for name, spec in routes_of(type(server)):
        handler = getattr(server, name)
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"{name}: route handlers are async (sync ones would run in FastAPI's thread pool)")
        options = {"name": name, **spec.options}
        app.add_api_route(spec.path, handler, methods=[spec.method], **options)

    def openapi() -> dict:
        """FastAPI's document, with the Problem schemas the routes' error responses refer to."""
        if app.openapi_schema is None:
            document = FastAPI.openapi(app)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI declares a 422 of its own shape on every route with parameters, also where
            # none can fail (plain strings): a route declares its 422 with `responses()` or has none.
            for item in document["paths"].values():
                for operation in item.values():
                    declared = operation.get("responses", {}).get("422", {})
                    if "HTTPValidationError" in json.dumps(declared):
                        del operation["responses"]["422"]
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            schemas.update(problem_schemas())
        return app.openapi_schema

    app.openapi = openapi
    return app
