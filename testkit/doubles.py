"""Test doubles, kept in testkit/ because the product never uses them: a local OpenAI-compatible
HTTP server (below) and a pixel-statistics scorer (`PixelScoring`, at the end).

Tests and benchmarks drive the real `openai` client against the server, so request shapes, multipart
uploads, headers, status codes and timeouts are exercised as they are in production. It answers
with the offline provider logic, records every request, and applies scripted faults.

    with FakeOpenAIServer(image_latency_s=0.05) as server:
        server.add_faults("chat", Fault("429", retry_after=0.2), "500")
        settings = LLMSettings(base_url=server.base_url, ...)
        ...
        assert server.requests_for("chat")[-1].json["model"] == "..."
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline.providers.offline import infer_task, last_user_payload, offline_reply, render_offline_image
from pipeline.providers.base import ProviderError

Endpoint = Literal["chat", "generations", "edits"]
FaultKind = Literal["429", "500", "400", "timeout", "malformed", "malformed_schema"]
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "generations", "edits")
DEFAULT_IMAGE_SIZE = (512, 288)


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of answering it normally.

    429: rate limited, with a `Retry-After: retry_after` header when given. 500 / 400: error
    JSON. timeout: answer after `sleep_s` (set it above the client's timeout). malformed: chat
    content that is not JSON / an image response with no image data. malformed_schema: chat
    content that is JSON but not the expected schema.
    """

    kind: FaultKind
    retry_after: float | None = None
    sleep_s: float = 3.0
    message: str | None = None


@dataclass
class RecordedRequest:
    endpoint: Endpoint
    path: str
    headers: dict[str, str]
    json: dict | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)
    fault: FaultKind | None = None
    request_id: str = ""
    started: float = 0.0

    @property
    def image(self) -> bytes | None:
        """The (first) uploaded edit image, however the client named the field."""
        for name in ("image", "image[]"):
            if self.files.get(name):
                return self.files[name][0]
        return None


def _error(status: int, message: str, kind: str, request_id: str, headers: dict[str, str] | None = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers={"x-request-id": request_id, **(headers or {})})


# What the double, like OpenAI, accepts in a strict json_schema (structure and a subset of
# constraints); checked independently of pipeline.structured, which builds the schemas.
_STRICT_ALLOWED = {
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "$ref", "$defs", "enum",
    "const", "description", "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minItems", "maxItems",
}


def strict_schema_problems(node: Any, where: str = "root") -> list[str]:
    """Why a strict structured-output schema would be refused (empty: it would be accepted):
    every object closed with every property required, no keyword outside the subset, nothing
    beside a $ref."""
    if not isinstance(node, dict):
        return [f"{where}: not a schema object"]
    problems = [f"{where}: '{key}' is not permitted" for key in node if key not in _STRICT_ALLOWED]
    if "$ref" in node and len(node) > 1:
        problems.append(f"{where}: $ref cannot have keywords {sorted(set(node) - {'$ref'})}")
    if node.get("type") == "object":
        if node.get("additionalProperties") is not False:
            problems.append(f"{where}: 'additionalProperties' is required to be supplied and to be false")
        missing = sorted(set(node.get("properties", {})) - set(node.get("required", [])))
        if missing:
            problems.append(f"{where}: 'required' must include every key in properties; missing {missing}")
    for group in ("properties", "$defs"):
        for name, sub in (node.get(group) or {}).items():
            problems += strict_schema_problems(sub, f"{where}.{name}")
    if "items" in node:
        problems += strict_schema_problems(node["items"], f"{where}[]")
    for i, sub in enumerate(node.get("anyOf") or []):
        problems += strict_schema_problems(sub, f"{where}.anyOf[{i}]")
    return problems


def _parse_size(size: object) -> tuple[int, int]:
    try:
        width, height = str(size).lower().split("x")
        return int(width), int(height)
    except ValueError:
        return DEFAULT_IMAGE_SIZE  # "auto" or absent


class LoopbackServer:
    """`self.app` (ASGI) served by uvicorn on 127.0.0.1 in a background thread, for the test
    doubles that real clients talk to over HTTP. Subclasses set `app`, `name` and `base_path`."""

    name = "loopback"
    base_path = "/"
    app: Any
    _server: "uvicorn.Server | None" = None
    _thread: "threading.Thread | None" = None
    port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def start(self, timeout_s: float = 10.0):
        # Bind first, so the port is known and no other process can take it in between.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeOpenAIServer(LoopbackServer):
    """An OpenAI-compatible server on 127.0.0.1 in a background thread.

    Faults: `add_faults(endpoint, *faults)` queues faults (a Fault or its kind as a string)
    applied one per request, in order, to that endpoint's next requests.
    Recording: `requests` (all, in arrival order), `requests_for(endpoint)`, `max_in_flight`
    (peak concurrent requests per endpoint), `reset()`.
    Latency: `chat_latency_s` and `image_latency_s`, read per request, so they can be changed
    while the server runs.
    Structured outputs: a `json_schema` response_format is checked as OpenAI checks a strict one
    (400 naming the problem); with `json_schema_support = False` the server refuses any json_schema
    with a 400 naming response_format, as endpoints without structured outputs do.
    """

    name = "fake-openai"
    base_path = "/v1"

    def __init__(self, *, chat_latency_s: float = 0.0, image_latency_s: float = 0.0):
        self.chat_latency_s = chat_latency_s
        self.image_latency_s = image_latency_s
        self.json_schema_support = True
        self._lock = threading.Lock()
        self._faults: dict[Endpoint, deque[Fault]] = {endpoint: deque() for endpoint in ENDPOINTS}
        self._requests: list[RecordedRequest] = []
        self._in_flight: dict[Endpoint, int] = dict.fromkeys(ENDPOINTS, 0)
        self._max_in_flight: dict[Endpoint, int] = dict.fromkeys(ENDPOINTS, 0)
        self._prompt_counts: dict[str, int] = {}
        self._counter = 0
        self.app = self._build_app()

    # --- scripting and recording ---------------------------------------------------------

    def add_faults(self, endpoint: Endpoint, *faults: Fault | FaultKind) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        with self._lock:
            self._faults[endpoint].extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, endpoint: Endpoint) -> list[RecordedRequest]:
        return [request for request in self.requests if request.endpoint == endpoint]

    @property
    def max_in_flight(self) -> dict[Endpoint, int]:
        with self._lock:
            return dict(self._max_in_flight)

    def reset(self) -> None:
        """Forget requests, pending faults and peaks, and take json_schema again (between tests
        sharing one server)."""
        self.json_schema_support = True
        with self._lock:
            self._requests.clear()
            self._prompt_counts.clear()
            for endpoint in ENDPOINTS:
                self._faults[endpoint].clear()
                self._max_in_flight[endpoint] = 0

    def _begin(self, record: RecordedRequest) -> Fault | None:
        with self._lock:
            self._counter += 1
            record.request_id = f"req_fake_{self._counter:06d}"
            record.started = time.monotonic()
            fault = self._faults[record.endpoint].popleft() if self._faults[record.endpoint] else None
            record.fault = fault.kind if fault else None
            self._requests.append(record)
            self._in_flight[record.endpoint] += 1
            peak = max(self._max_in_flight[record.endpoint], self._in_flight[record.endpoint])
            self._max_in_flight[record.endpoint] = peak
        return fault

    def _end(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._in_flight[endpoint] -= 1

    def _next_variation(self, prompt: str) -> int:
        """Each repeat of a prompt is a new sample, as with a real image API."""
        with self._lock:
            count = self._prompt_counts.get(prompt, 0)
            self._prompt_counts[prompt] = count + 1
            return count

    # --- HTTP ----------------------------------------------------------------------------

    async def _handle(self, record: RecordedRequest, latency_s: float, answer):
        fault = self._begin(record)
        rid = record.request_id
        try:
            if latency_s:
                await asyncio.sleep(latency_s)
            if fault is not None:
                if fault.kind == "429":
                    headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
                    return _error(429, fault.message or "Rate limit reached (fake)", "rate_limit_error", rid, headers)
                if fault.kind == "500":
                    return _error(500, fault.message or "Internal server error (fake)", "server_error", rid)
                if fault.kind == "400":
                    return _error(400, fault.message or "Invalid request (fake)", "invalid_request_error", rid)
                if fault.kind == "timeout":
                    await asyncio.sleep(fault.sleep_s)
            try:
                body = await answer(fault.kind if fault else None)
            except ProviderError as error:
                return _error(400, str(error), "invalid_request_error", rid)
            return JSONResponse(body, headers={"x-request-id": rid})
        finally:
            self._end(record.endpoint)

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake OpenAI")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            record = RecordedRequest("chat", request.url.path, dict(request.headers), json=body)

            async def answer(fault: FaultKind | None) -> dict:
                _check_response_format(body.get("response_format"), self.json_schema_support)
                if fault == "malformed":
                    content = "Sure! Here is the JSON you asked for: {not valid json"
                elif fault == "malformed_schema":
                    content = json.dumps({"unexpected": "shape", "scores": "high"})
                else:
                    payload = last_user_payload(body.get("messages") or [])
                    content = json.dumps(offline_reply(infer_task(payload), payload))
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
                completion_tokens = len(content.split())
                return {
                    "id": f"chatcmpl-{record.request_id}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }

            return await self._handle(record, self.chat_latency_s, answer)

        @app.post("/v1/images/generations")
        async def generations(request: Request):
            body = await request.json()
            record = RecordedRequest("generations", request.url.path, dict(request.headers), json=body)

            async def answer(fault: FaultKind | None) -> dict:
                return await self._image_body(str(body.get("prompt", "")), body.get("size"), None, fault)

            return await self._handle(record, self.image_latency_s, answer)

        @app.post("/v1/images/edits")
        async def edits(request: Request):
            form = await request.form()
            fields: dict[str, str] = {}
            files: dict[str, list[bytes]] = {}
            for name, value in form.multi_items():
                if isinstance(value, str):
                    fields[name] = value
                else:
                    files.setdefault(name, []).append(await value.read())
            record = RecordedRequest("edits", request.url.path, dict(request.headers), form=fields, files=files)

            async def answer(fault: FaultKind | None) -> dict:
                if record.image is None:
                    raise ProviderError("edits need an 'image' file")
                return await self._image_body(fields.get("prompt", ""), fields.get("size"), record.image, fault)

            return await self._handle(record, self.image_latency_s, answer)

        return app

    async def _image_body(
        self, prompt: str, size: object, reference: bytes | None, fault: FaultKind | None
    ) -> dict:
        if fault in ("malformed", "malformed_schema"):
            return {"created": int(time.time()), "data": [{}]}
        data, _ = await asyncio.to_thread(
            render_offline_image,
            prompt,
            variation=self._next_variation(prompt),
            reference=reference,
            size=_parse_size(size),
        )
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(data).decode(), "revised_prompt": f"{prompt} (revised)"}],
        }


def _check_response_format(requested: Any, json_schema_support: bool) -> None:
    """Refuse (ProviderError, answered as a 400) a response_format this server would not take."""
    if not isinstance(requested, dict) or requested.get("type") != "json_schema":
        return
    if not json_schema_support:
        raise ProviderError("Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.")
    spec = requested.get("json_schema") or {}
    if spec.get("strict"):
        problems = strict_schema_problems(spec.get("schema"))
        if problems:
            raise ProviderError(f"Invalid schema for response_format '{spec.get('name')}': {'; '.join(problems[:3])}")


# --- Scoring ---------------------------------------------------------------------------------

import hashlib  # noqa: E402  (kept with the scoring double, appended after the server)
import io  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.schemas import ScorerResult  # noqa: E402

PIXEL_SCORERS = ("pickscore", "clipscore", "vqascore", "aesthetic")


@dataclass
class ScoringCall:
    batch_size: int
    prompts: list[str]
    started: float
    finished: float | None = None
    failed: bool = False


class PixelScoring:
    """A deterministic `ScoringClient` for tests and benchmarks: no model, no GPU.

    Each PNG is decoded and the four scorer results are derived from its pixel statistics
    (contrast, colourfulness, edge energy, exposure), each with a tiny per-image offset from a
    hash of the pixels, so different images get different scores and ties are rare; the same
    image always gets the same scores. Scores are 0-100 and never reach 100, so a
    `quality_threshold` of 100 is above every score.

    `latency_s`: awaited once per call (a remote scorer's round trip). `fail=True`: every call
    raises RuntimeError (a scorer that cannot run). `fixed`: every image gets these 0-100
    scores (to force ties). Recording: `calls` (one ScoringCall per call), `batch_sizes`,
    `max_in_flight`.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fail: bool = False,
        fail_message: str = "scorer 'pickscore' is unavailable (PixelScoring fail=True)",
        fixed: dict[str, float] | None = None,
    ):
        self.latency_s = latency_s
        self.fail = fail
        self.fail_message = fail_message
        self.fixed = fixed
        self.calls: list[ScoringCall] = []
        self.max_in_flight = 0
        self._in_flight = 0

    @property
    def batch_sizes(self) -> list[int]:
        return [call.batch_size for call in self.calls]

    async def score(self, images: list[bytes], prompts: list[str]) -> list[dict[str, ScorerResult]]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        call = ScoringCall(batch_size=len(images), prompts=list(prompts), started=time.monotonic())
        self.calls.append(call)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if self.fail:
                call.failed = True
                raise RuntimeError(self.fail_message)
            # off the event loop, like a remote or threaded scorer
            return await asyncio.to_thread(lambda: [self.score_one(data) for data in images])
        finally:
            self._in_flight -= 1
            call.finished = time.monotonic()

    def score_one(self, data: bytes) -> dict[str, ScorerResult]:
        """The four results for one encoded image (synchronous, for tests to recompute)."""
        if self.fixed is not None:
            return {name: ScorerResult(raw=float(self.fixed[name]), score=float(self.fixed[name])) for name in PIXEL_SCORERS}
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        luminance = rgb @ np.array([0.299, 0.587, 0.114])
        contrast = min(luminance.std() / 100.0, 1.0)
        rg = rgb[..., 0] - rgb[..., 1]
        yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
        colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())  # Hasler-Suesstrunk
        colour = min(colourfulness / 120.0, 1.0)
        edges = 0.0
        if luminance.shape[0] > 1 and luminance.shape[1] > 1:
            edges = np.abs(np.diff(luminance, axis=0)).mean() + np.abs(np.diff(luminance, axis=1)).mean()
        detail = min(edges / 40.0, 1.0)
        exposure = 1.0 - min(abs(luminance.mean() - 128.0) / 128.0, 1.0)
        digest = hashlib.sha256(rgb.astype(np.uint8).tobytes()).digest()

        def unit(value: float, slot: int) -> float:
            # Up to 0.002 of jitter from the pixel hash breaks ties; stays below 1.
            jitter = int.from_bytes(digest[2 * slot : 2 * slot + 2], "big") / 65536 * 0.002
            return min(max(0.02 + 0.95 * value + jitter, 0.0), 0.999)

        pick = unit(0.55 * contrast + 0.45 * colour, 0)
        clip = unit(0.6 * detail + 0.4 * exposure, 1)
        vqa = unit(0.5 * exposure + 0.5 * colour, 2)
        aesthetic = unit(0.4 * contrast + 0.3 * colour + 0.3 * exposure, 3)
        return {
            # raw values on each model's own scale, scores 0-100
            "pickscore": ScorerResult(raw=round(16 + 8 * pick, 6), score=round(100 * pick, 4)),
            "clipscore": ScorerResult(raw=round(0.4 * clip, 6), score=round(100 * clip, 4)),
            "vqascore": ScorerResult(raw=round(vqa, 6), score=round(100 * vqa, 4)),
            "aesthetic": ScorerResult(raw=round(1 + 9 * aesthetic, 6), score=round(100 * aesthetic, 4)),
        }
