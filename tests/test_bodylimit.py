"""The upload body limit: refused while the body streams in, not after it was spooled whole."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile

from deployments.bodylimit import FORM_ALLOWANCE, BodyLimit, upload_body_limit

BOUNDARY = "sceneref-test-boundary"
CHUNK = 64 * 1024
LIMIT = 256 * 1024


class Consumed:
    """Outermost ASGI layer: records the body messages the server handed to the app."""

    def __init__(self, app):
        self.app = app
        self.messages: list[int] = []

    @property
    def bytes(self) -> int:
        return sum(self.messages)

    def stopped_at_limit(self, limit: int) -> bool:
        """Reading stopped with the first message that took the body past the limit."""
        return sum(self.messages[:-1]) <= limit < self.bytes

    async def __call__(self, scope, receive, send):
        async def counting():
            message = await receive()
            if message["type"] == "http.request":
                self.messages.append(len(message.get("body", b"")))
            return message

        await self.app(scope, counting, send)


def make_app(limit: int = LIMIT) -> Consumed:
    app = FastAPI()
    app.add_middleware(BodyLimit, limits={path: limit for path in ("/upload", "/raw", "/swallow")})

    @app.post("/upload")
    async def upload(image: UploadFile = File(...), prompt: str = Form(...)) -> dict:
        return {"size": len(await image.read()), "prompt": prompt}

    @app.post("/raw")
    async def raw(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.post("/swallow")
    async def swallow(request: Request) -> dict:
        """A route that hides the error of a cut-off body: the client must still get the 413."""
        try:
            await request.body()
        except Exception:
            pass
        return {"ok": True}

    @app.post("/open")
    async def open_route(request: Request) -> dict:
        return {"size": len(await request.body())}

    return Consumed(app)


class Body:
    """A multipart form whose image part is `image_bytes` long, produced lazily in chunks;
    `sent` counts what the client actually pulled from it."""

    def __init__(self, image_bytes: int):
        self.image_bytes = image_bytes
        self.sent = 0

    def parts(self):
        yield (
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na lighthouse at dusk\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        left = self.image_bytes
        while left > 0:
            size = min(CHUNK, left)
            left -= size
            yield b"\x89" * size
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    def __iter__(self):
        for part in self.parts():
            self.sent += len(part)
            yield part

    async def chunks(self):
        for part in self:
            yield part

    def total(self) -> int:
        return sum(len(part) for part in self.parts())


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def assert_refused(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    body = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert set(body) == {"type", "title", "status", "detail", "instance"} and body["status"] == 413
    assert str(limit) in body["detail"]


# --- in process (httpx ASGITransport): exact counts ---------------------------------------


async def client_for(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_within_limit_passes():
    app = make_app()
    async with await client_for(app) as client:
        body = Body(LIMIT - 4096)
        response = await client.post("/upload", content=body.chunks(), headers=HEADERS)
    assert response.status_code == 200, response.text
    assert response.json() == {"size": LIMIT - 4096, "prompt": "a lighthouse at dusk"}
    assert app.bytes == body.total()


@pytest.mark.parametrize("path", ["/upload", "/raw", "/swallow"])
async def test_streamed_body_refused_once_past_limit(path):
    """No Content-Length (chunked): refused while parsing, after about `limit` bytes of 60 MB."""
    app = make_app()
    body = Body(60 * 2**20)
    async with await client_for(app) as client:
        response = await client.post(path, content=body.chunks(), headers=HEADERS)
    assert_refused(response, LIMIT)
    assert app.stopped_at_limit(LIMIT)
    assert body.sent <= LIMIT + 2 * CHUNK  # the client was never asked for the rest
    assert response.headers["connection"] == "close"


async def test_declared_length_refused_before_reading():
    app = make_app()
    body = Body(60 * 2**20)
    headers = HEADERS | {"content-length": str(body.total())}
    async with await client_for(app) as client:
        response = await client.post("/upload", content=body.chunks(), headers=headers)
    assert_refused(response, LIMIT)
    assert "Content-Length" in response.json()["detail"]
    assert app.bytes == 0


async def test_each_app_has_its_limit_and_other_paths_are_free():
    async with await client_for(make_app()) as client:
        assert (await client.post("/open", content=Body(2 * LIMIT).chunks(), headers=HEADERS)).status_code == 200
    async with await client_for(make_app(4 * LIMIT)) as client:
        assert (await client.post("/raw", content=Body(2 * LIMIT).chunks())).status_code == 200
    async with await client_for(make_app(LIMIT // 2)) as client:
        assert_refused(await client.post("/raw", content=Body(LIMIT).chunks()), LIMIT // 2)


def test_body_limit_adds_the_form_allowance():
    assert upload_body_limit(20 * 2**20) == 20 * 2**20 + FORM_ALLOWANCE
    assert 8000 * 4 < FORM_ALLOWANCE < 2**20  # a 2000-character prompt several times over, still small


# --- a real server on a loopback port: the client gets the 413, not a reset or a hang ------


@pytest.fixture(params=["h11", "httptools"])
def server(request):
    """uvicorn (the server of Ray Serve's proxy) with either of its HTTP parsers."""
    pytest.importorskip(request.param)
    app = make_app()
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", http=request.param)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("declared", [False, True], ids=["chunked", "content-length"])
def test_real_server_answers_413_and_stops_reading(server, declared):
    url, app = server
    body = Body(60 * 2**20)
    headers = HEADERS | ({"content-length": str(body.total())} if declared else {})
    with httpx.Client(timeout=20) as client:
        response = client.post(url + "/upload", content=body, headers=headers)
    assert_refused(response, LIMIT)
    assert app.stopped_at_limit(LIMIT) if not declared else app.bytes == 0
    # The client may have written what fits in the loopback socket buffers (a few MB) before it
    # saw the answer; it never got near the end of the 60 MB body.
    assert body.sent < body.total() // 4
    with httpx.Client(timeout=20) as client:  # and the server still serves the next request
        ok = client.post(url + "/upload", content=Body(1000), headers=HEADERS)
    assert ok.status_code == 200 and json.loads(ok.text)["size"] == 1000
