"""The ingress app is built by a factory, per replica (before, `deployments/ingress.py`
held a module-level FastAPI `app` that every replica's constructor mutated)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

import deployments.ingress as ingress_module
from deployments.api import create_api, route, routes_of
from deployments.auth import Authenticator, AuthSettings

PATHS = {
    ("GET", "/api/health"), ("GET", "/api/ready"), ("POST", "/api/generate"), ("POST", "/api/generate-with-image"),
    ("GET", "/api/status/{generation_id}"), ("DELETE", "/api/generations/{generation_id}"),
    ("POST", "/api/generations/{generation_id}/resume"), ("GET", "/api/artifacts/{key}"),
    ("GET", "/api/generations/{generation_id}/traces"), ("GET", "/api/generations/{generation_id}/traces/{name}"),
    ("GET", "/api/generations"), ("GET", "/api/generations/{generation_id}/events"),
}


def authenticator(monkeypatch) -> Authenticator:
    monkeypatch.setenv("SCENEREF_JWT_SECRET", "x" * 32)
    return Authenticator(AuthSettings())


def test_no_module_level_app():
    assert not [name for name, value in vars(ingress_module).items() if isinstance(value, FastAPI)]


def test_the_real_ingress_routes_make_the_documented_api(monkeypatch):
    cls = ingress_module.Ingress.func_or_class
    server = object.__new__(cls)  # routes and the OpenAPI document need no running replica
    app = create_api(server, authenticator=authenticator(monkeypatch), upload_limit_bytes=1024)
    document = app.openapi()
    found = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert found == PATHS
    documented = [spec for _, spec in routes_of(cls) if spec.options.get("include_in_schema", True)]
    assert len(documented) == len(PATHS)
    hidden = {spec.path for _, spec in routes_of(cls) if not spec.options.get("include_in_schema", True)}
    assert hidden == {"/", "/viewer", "/viewer/static/{name:path}"}  # the viewer's page and files


class Tiny:
    def __init__(self, tag: str):
        self.tag = tag

    @route("GET", "/api/tag")
    async def tag_of(self) -> dict:
        return {"tag": self.tag}

    @route("POST", "/api/generate-with-image", status_code=202)
    async def upload(self) -> dict:
        return {"ok": True}


def test_each_replica_gets_its_own_app_and_limits(monkeypatch):
    auth = authenticator(monkeypatch)
    small = TestClient(create_api(Tiny("a"), authenticator=auth, upload_limit_bytes=1000))
    large = TestClient(create_api(Tiny("b"), authenticator=auth, upload_limit_bytes=10_000_000))
    assert small.get("/api/tag").json() == {"tag": "a"} and large.get("/api/tag").json() == {"tag": "b"}
    body = b"x" * 200_000
    assert small.post("/api/generate-with-image", content=body).status_code == 413
    assert large.post("/api/generate-with-image", content=body).status_code == 202


def test_sync_handlers_are_refused(monkeypatch):
    import pytest

    class Sync:
        @route("GET", "/x")
        def x(self):
            return {}

    with pytest.raises(TypeError, match="async"):
        create_api(Sync(), authenticator=authenticator(monkeypatch), upload_limit_bytes=1)


def test_the_upload_form_takes_its_defaults_and_bounds_from_the_request_model(monkeypatch):
    """Before: generate-with-image's form repeated GenerationRequest's defaults and bounds by
    hand; now each form field is read from the model, so the two routes cannot drift apart."""
    from pipeline.schemas import GenerationRequest

    server = object.__new__(ingress_module.Ingress.func_or_class)
    document = create_api(server, authenticator=authenticator(monkeypatch), upload_limit_bytes=1024).openapi()
    body = document["paths"]["/api/generate-with-image"]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    form = document["components"]["schemas"][ref]["properties"]
    model = GenerationRequest.model_json_schema()["properties"]
    assert set(form) == set(model) | {"image"}
    for name, declared in model.items():
        for key in ("default", "minimum", "maximum", "minLength", "maxLength", "pattern"):
            assert form[name].get(key) == declared.get(key), (name, key)
