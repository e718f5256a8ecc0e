"""Every error the API declares, answered for real and checked against its declaration.

The real `Ingress` handlers on the app `create_api` builds (no Ray: readiness is asked of a
function returning a real `ServeStatus`), over a real SQLite job store and local stores. The
test walks the OpenAPI document: each (route, declared 4xx/5xx code) must have a recipe here
that makes the server answer that code (so no code is declared that the route cannot answer),
and the answer must carry the declared media type, body schema and headers. Answers nobody
declares per route (an unknown path, a wrong method) must still have the one error shape.
"""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient
from ray.serve.schema import ServeStatus

from deployments.api import create_api
from deployments.args import AppArgs
from deployments.auth import Authenticator
from deployments.ingress import Ingress
from deployments.readiness import ReadinessCheck, StoreCheck, ping_object_store
from deployments.signing import sign_url
from pipeline.jobs.store import JobStore
from pipeline.jobs.worker import JobSettings, JobWorker
from pipeline.storage.factory import open_store
from pipeline.tokens import mint_token
from tests.test_events_routes import finished_job
from tests.test_jobs import REQUEST

SECRET = "e" * 40
PROBLEM = "application/problem+json"
PNG_1x1 = bytes.fromhex(  # a real 2x2 PNG
    "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a730000001649444154789c633cc1c5c5c0c0c0c4c0c0c0c0c0"
    "00000b3800e011f4d5d60000000049454e44ae426082"
)
BROKEN_FORM = b"--x\r\nContent-Type: text/plain\r\n\r\nno Content-Disposition\r\n--x--\r\n"
BODY = {"prompt": "Artisan coffee that starts your morning right", "target_duration": 12}
FORM = {"prompt": "Artisan coffee that starts your morning right", "target_duration": "12"}


def auth(sub: str = "alice") -> dict:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub)}"}


class Env:
    """One real Ingress (its handlers, not its constructor) with the stores it reads."""

    def __init__(self, root: Path, *, database: Path | None = None, artifacts: str | None = None, s3: dict | None = None):
        self.root = root
        database = database or root / "db" / "jobs.db"
        self.args = AppArgs.model_validate({
            "database_url": f"sqlite:///{database}",
            "pipeline": {"artifacts_dir": artifacts or str(root / "artifacts"),
                         "traces": {"root": str(root / "traces"), "keep": True},
                         **({"s3": s3} if s3 else {})},
            "uploads": {"max_bytes": 4096},
            "limits": {"max_active_per_user": 1},
            "auth": {"mode": "hs256"},
        })
        server = object.__new__(Ingress.func_or_class)
        server.args, server.settings = self.args, self.args.pipeline
        server.authenticator = Authenticator(self.args.auth)
        server.url_secret = self.args.url_secret()
        server.store = self.store = JobStore(self.args.job_store_url())
        server.artifacts = open_store(self.args.pipeline.artifacts_dir, self.args.pipeline.s3)
        server.trace_store = open_store(self.args.pipeline.traces.root, self.args.pipeline.s3)
        server.readiness = ReadinessCheck(ServeStatus, "sceneref", [])  # nothing required: ready
        server.store_check = StoreCheck({"job store": self.store.ping,
                                         "object store": functools.partial(ping_object_store, server.artifacts)})
        server.offline = True
        server.worker = JobWorker(self.store, None, self.args.pipeline, JobSettings(), holder="ingress-test")  # not started
        server.api_pool = ThreadPoolExecutor(max_workers=2)
        self.server = server
        self.client = TestClient(create_api(server, authenticator=server.authenticator, upload_limit_bytes=4096))

    def not_ready(self) -> "Env":
        """Serve reports no live replica of a deployment a generation needs."""
        self.server.readiness = ReadinessCheck(ServeStatus, "sceneref", ["ImageGenerator"])
        return self

    def database_down(self) -> "Env":
        """The job store's database goes away: its directory is removed and pooled connections
        closed, so every next query fails to connect."""
        self.store.close()
        shutil.rmtree(Path(self.args.database_url.removeprefix("sqlite:///")).parent)
        return self

    def signed(self, key: str) -> str:
        return sign_url(f"/api/artifacts/{key}", self.server.url_secret, ttl_s=60)


@pytest.fixture
def make_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCENEREF_JWT_SECRET", SECRET)
    made: list[Env] = []

    def make(name: str = "env", **kwargs) -> Env:
        env = Env(tmp_path / name, **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.client.close()
        env.server.api_pool.shutdown(wait=False)
        env.store.close()


GID = "0123456789abcdef0123456789abcdef"
ENDPOINT_404 = f"/api/generations/{GID}"


def _finished(env: Env) -> str:
    finished_job(env.store, GID, "alice")
    return GID


def _queued(env: Env) -> str:
    env.store.create(GID, "alice", REQUEST, offline=True)
    return GID


def _second_submission(env: Env):
    assert env.client.post("/api/generate", json=BODY, headers=auth()).status_code == 202
    return env.client.post("/api/generate", json=BODY, headers=auth())


def _resume_past_the_limit(env: Env):
    """The limit's one active generation is taken while a cancelled one asks to resume."""
    first = env.client.post("/api/generate", json=BODY, headers=auth()).json()["generation_id"]
    env.client.delete(f"/api/generations/{first}", headers=auth())
    assert env.client.post("/api/generate", json=BODY, headers=auth()).status_code == 202
    return env.client.post(f"/api/generations/{first}/resume", headers=auth())


DOWN = "database_down"
GENERATE, UPLOAD = ("POST", "/api/generate"), ("POST", "/api/generate-with-image")
STATUS, CANCEL = ("GET", "/api/status/{generation_id}"), ("DELETE", "/api/generations/{generation_id}")
RESUME, ARTIFACT = ("POST", "/api/generations/{generation_id}/resume"), ("GET", "/api/artifacts/{key}")
TRACES, TRACE = ("GET", "/api/generations/{generation_id}/traces"), ("GET", "/api/generations/{generation_id}/traces/{name}")
EVENTS, LIST, READY = ("GET", "/api/generations/{generation_id}/events"), ("GET", "/api/generations"), ("GET", "/api/ready")

# (method, path template, code) -> how to make the server answer it: a function of a fresh Env.
RECIPES = {
    (*READY, 503): lambda e: e.not_ready().client.get("/api/ready"),
    (*GENERATE, 400): lambda e: e.client.post("/api/generate", content=b'{"prompt": "\xff\xfe caf\xe9 morning"}',
                                              headers={**auth(), "Content-Type": "application/json"}),
    (*GENERATE, 401): lambda e: e.client.post("/api/generate", json=BODY),
    (*GENERATE, 413): lambda e: e.client.post("/api/generate", json={**BODY, "prompt": "x" * 70_000}, headers=auth()),
    (*GENERATE, 422): lambda e: e.client.post("/api/generate", json={**BODY, "prompt": "short"}, headers=auth()),
    (*GENERATE, 429): _second_submission,
    (*GENERATE, 503): lambda e: e.not_ready().client.post("/api/generate", json=BODY, headers=auth()),
    (*UPLOAD, 400): lambda e: e.client.post("/api/generate-with-image", content=BROKEN_FORM,
                                            headers={**auth(), "Content-Type": "multipart/form-data; boundary=x"}),
    (*UPLOAD, 401): lambda e: e.client.post("/api/generate-with-image", data=FORM, files={"image": ("a.png", PNG_1x1)}),
    (*UPLOAD, 413): lambda e: e.client.post("/api/generate-with-image", data=FORM, headers=auth(),
                                            files={"image": ("a.png", PNG_1x1 + b"\0" * 80_000)}),
    (*UPLOAD, 415): lambda e: e.client.post("/api/generate-with-image", data=FORM, headers=auth(),
                                            files={"image": ("a.png", b"plain text, not an image")}),
    (*UPLOAD, 422): lambda e: e.client.post("/api/generate-with-image", data=FORM, headers=auth(),
                                            files={"image": ("a.png", b"")}),
    (*UPLOAD, 429): lambda e: (e.client.post("/api/generate", json=BODY, headers=auth()), e.client.post(
        "/api/generate-with-image", data=FORM, headers=auth(), files={"image": ("a.png", PNG_1x1)}))[1],
    (*UPLOAD, 503): lambda e: e.not_ready().client.post("/api/generate-with-image", data=FORM, headers=auth(),
                                                        files={"image": ("a.png", PNG_1x1)}),
    (*STATUS, 401): lambda e: e.client.get(f"/api/status/{GID}"),
    (*STATUS, 404): lambda e: e.client.get(f"/api/status/{GID}", headers=auth()),
    (*STATUS, 503): lambda e: e.database_down().client.get(f"/api/status/{GID}", headers=auth()),
    (*CANCEL, 401): lambda e: e.client.delete(ENDPOINT_404),
    (*CANCEL, 404): lambda e: e.client.delete(ENDPOINT_404, headers=auth()),
    (*CANCEL, 409): lambda e: e.client.delete(f"/api/generations/{_finished(e)}", headers=auth()),
    (*CANCEL, 503): lambda e: e.database_down().client.delete(ENDPOINT_404, headers=auth()),
    (*RESUME, 401): lambda e: e.client.post(f"{ENDPOINT_404}/resume"),
    (*RESUME, 404): lambda e: e.client.post(f"{ENDPOINT_404}/resume", headers=auth()),
    (*RESUME, 409): lambda e: e.client.post(f"/api/generations/{_queued(e)}/resume", headers=auth()),
    (*RESUME, 429): _resume_past_the_limit,
    (*RESUME, 503): lambda e: e.database_down().client.post(f"{ENDPOINT_404}/resume", headers=auth()),
    (*ARTIFACT, 403): lambda e: e.client.get("/api/artifacts/a/b.png?expires=1&sig=bad"),
    (*ARTIFACT, 404): lambda e: e.client.get(e.signed("a/missing.png")),
    (*ARTIFACT, 503): "object store down: test_the_artifact_route_answers_503_while_the_object_store_is_down",
    (*TRACES, 401): lambda e: e.client.get(f"{ENDPOINT_404}/traces"),
    (*TRACES, 404): lambda e: e.client.get(f"{ENDPOINT_404}/traces", headers=auth()),
    (*TRACES, 503): lambda e: e.database_down().client.get(f"{ENDPOINT_404}/traces", headers=auth()),
    (*TRACE, 400): lambda e: e.client.get(f"{ENDPOINT_404}/traces/a%00b.txt", headers=auth()),
    (*TRACE, 401): lambda e: e.client.get(f"{ENDPOINT_404}/traces/a.txt"),
    (*TRACE, 404): lambda e: e.client.get(f"{ENDPOINT_404}/traces/a.txt", headers=auth()),
    (*TRACE, 503): lambda e: e.database_down().client.get(f"{ENDPOINT_404}/traces/a.txt", headers=auth()),
    (*EVENTS, 401): lambda e: e.client.get(f"{ENDPOINT_404}/events"),
    (*EVENTS, 404): lambda e: e.client.get(f"{ENDPOINT_404}/events", headers=auth()),
    (*EVENTS, 422): lambda e: e.client.get(f"{ENDPOINT_404}/events?after=-1", headers=auth()),
    (*EVENTS, 503): lambda e: e.database_down().client.get(f"{ENDPOINT_404}/events", headers=auth()),
    (*LIST, 401): lambda e: e.client.get("/api/generations"),
    (*LIST, 422): lambda e: e.client.get("/api/generations?limit=0", headers=auth()),
    (*LIST, 503): lambda e: e.database_down().client.get("/api/generations", headers=auth()),
}


def declared_errors(document: dict) -> dict[tuple[str, str, int], dict]:
    return {
        (method.upper(), path, int(code)): spec
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for code, spec in operation["responses"].items()
        if int(code) >= 400
    }


def check_against(document: dict, spec: dict, response) -> None:
    """The answer has a media type, body schema and headers its declaration names."""
    media = response.headers["content-type"].split(";")[0]
    assert media in spec.get("content", {}), f"{media} is not declared: {sorted(spec.get('content', {}))}"
    schema = spec["content"][media]["schema"]
    jsonschema.validate(response.json(), {**schema, "components": document["components"]})
    for name, header in spec.get("headers", {}).items():
        if header.get("required"):
            assert response.headers.get(name), f"declared header {name} is missing"


def test_every_declared_error_is_answered_as_declared(make_env):
    document = make_env("doc").client.get("/openapi.json").json()
    declared = declared_errors(document)
    failures = []
    for index, (key, recipe) in enumerate(RECIPES.items()):
        method, path, code = key
        if isinstance(recipe, str):  # a test of its own (it needs a server to take down)
            continue
        response = recipe(make_env(f"case{index}"))
        try:
            assert response.status_code == code, f"answered {response.status_code} {response.text[:300]}"
            assert key in declared, "not declared"
            check_against(document, declared[key], response)
            body = response.json()
            assert body.get("status") == code and body.get("detail"), body
        except (AssertionError, jsonschema.ValidationError) as exc:
            failures.append(f"{method} {path} {code}: {str(exc).splitlines()[0][:300]}")
    over = sorted(set(declared) - set(RECIPES))  # declared, but no request here can produce it
    assert not failures and not over, "\n".join(failures + [f"over-declared: {k}" for k in over])


def test_the_artifact_route_answers_503_while_the_object_store_is_down(make_env, s3_outage, tmp_path):
    server = s3_outage.server
    s3 = server.settings().model_dump()
    env = make_env("s3", artifacts=f"s3://{server.bucket}/artifacts-{tmp_path.name}", s3=s3)
    document = env.client.get("/openapi.json").json()
    key = env.server.artifacts.put("g/scene_1/a.png", PNG_1x1, "image/png")
    link = env.signed(key)
    assert env.client.get(link).content == PNG_1x1
    s3_outage.stop()
    try:
        response = env.client.get(link)
    finally:
        s3_outage.start()
    assert response.status_code == 503, response.text
    check_against(document, declared_errors(document)[(*ARTIFACT, 503)], response)


def test_answers_no_route_declares_have_the_same_shape(make_env):
    env = make_env()
    unknown = env.client.get("/api/nothing-here")
    wrong_method = env.client.put("/api/generate", json=BODY)
    for response, code in [(unknown, 404), (wrong_method, 405)]:
        assert response.status_code == code
        assert response.headers["content-type"].startswith(PROBLEM)
        body = response.json()
        assert body["type"] == "about:blank" and body["status"] == code and body["title"] and body["detail"]
    assert "POST" in wrong_method.headers["allow"]


def test_a_validation_problem_names_each_field(make_env):
    env = make_env()
    response = env.client.post("/api/generate", json={**BODY, "prompt": "short", "colour": "red"}, headers=auth())
    body = response.json()
    assert response.status_code == 422 and response.headers["content-type"].startswith(PROBLEM)
    assert {e["field"] for e in body["errors"]} == {"prompt", "colour"}
    assert body["detail"].startswith("invalid request: ") and "colour" in body["detail"]
    assert body["instance"] == "/api/generate"
    empty = env.client.post("/api/generate-with-image", data=FORM, headers=auth(), files={"image": ("a.png", b"")})
    assert empty.status_code == 422 and empty.json()["errors"] == [{"field": "image", "message": "image is empty"}]
