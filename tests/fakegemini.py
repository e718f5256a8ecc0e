"""A local stand-in for the Gemini API (generativelanguage), for tests that drive the real
`google-genai` SDK through its `http_options.base_url`.

It speaks the REST shapes of the two calls the product makes: `POST /{version}/models/{model}:
generateContent` (the SDK picks the version: v1 in google-genai 3.x) (camelCase JSON: contents[].parts[] with text / inlineData, generationConfig) and
`GET /{version}/models/{model}`, with Google's error body ({"error": {code, message, status}}).
Images come from the offline renderer, so they depend on the prompt, the seed and the reference.

    with FakeGeminiServer(models={"gemini-test-image"}) as server:
        server.add_faults(Fault("429", retry_after=0.1), "blocked_candidate")
        ...  # ImageSettings(provider="gemini", base_url=server.base_url, ...)
        assert server.requests_for("generate")[-1].json["generationConfig"]["seed"] == 7
"""

from __future__ import annotations

import asyncio
import base64
import threading
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from pipeline.providers.offline import render_offline_image
from pipeline.providers.base import ProviderError
from testkit.doubles import LoopbackServer

FaultKind = Literal[
    "429", "500", "503", "timeout", "blocked_prompt", "blocked_candidate", "no_image", "malformed_image"
]
STATUS_NAMES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
WIDTH = 128  # small images keep tests fast; the height follows the requested aspect ratio


@dataclass(frozen=True)
class Fault:
    """What to do to one generateContent request instead of answering it.

    429 (with `Retry-After: retry_after` when given), 500, 503: Google's error JSON. timeout:
    answer after `sleep_s` (above the client's timeout). blocked_prompt: promptFeedback with
    blockReason `reason` (default SAFETY) and no candidates. blocked_candidate: one candidate with
    finishReason `reason` (default IMAGE_SAFETY) and no parts. no_image: a text-only candidate
    (finishReason STOP). malformed_image: an inlineData part whose bytes are not an image.
    """

    kind: FaultKind
    retry_after: float | None = None
    sleep_s: float = 3.0
    reason: str | None = None


@dataclass
class RecordedRequest:
    call: Literal["generate", "get"]
    model: str
    headers: dict[str, str]
    json: dict | None = None
    fault: FaultKind | None = None
    response_id: str = ""

    @property
    def parts(self) -> list[dict]:
        contents = (self.json or {}).get("contents") or []
        return [part for content in contents for part in content.get("parts") or []]

    @property
    def inline_images(self) -> list[bytes]:
        """The decoded bytes of every inlineData part the client sent (the reference image). The
        API takes standard and URL-safe base64 (the SDK sends the URL-safe alphabet)."""
        return [_b64decode(p["inlineData"]["data"]) for p in self.parts if "inlineData" in p]

    @property
    def inline_mime_types(self) -> list[str | None]:
        """Proto JSON takes both field spellings, and the SDK sends `mime_type` inside inlineData."""
        blobs = [p["inlineData"] for p in self.parts if "inlineData" in p]
        return [blob.get("mimeType", blob.get("mime_type")) for blob in blobs]

    @property
    def text(self) -> str:
        return "\n".join(p["text"] for p in self.parts if "text" in p)


def _b64decode(data: str) -> bytes:
    return base64.b64decode(data.replace("-", "+").replace("_", "/"), validate=True)


def _error(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "status": STATUS_NAMES.get(code, "UNKNOWN")}}
    return JSONResponse(body, status_code=code, headers=headers or {})


def _size(aspect_ratio: str | None) -> tuple[int, int]:
    width, height = (int(x) for x in (aspect_ratio or "1:1").split(":"))
    return WIDTH, max(1, round(WIDTH * height / width))


class FakeGeminiServer(LoopbackServer):
    """The fake on 127.0.0.1 in a background thread. `models`: the ids it serves; any other
    answers 404 NOT_FOUND the way the API does for a retired or unknown model."""

    name = "fake-gemini"

    def __init__(self, *, models: set[str] | frozenset[str] = frozenset({"gemini-test-image"})):
        self.models = set(models)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []
        self._counter = 0
        self.app = self._build_app()

    def add_faults(self, *faults: Fault | FaultKind) -> None:
        """Faults for the next generateContent requests, one per request, in order."""
        with self._lock:
            self._faults.extend(f if isinstance(f, Fault) else Fault(f) for f in faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, call: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.call == call]

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    def _record(self, record: RecordedRequest, *, faultable: bool) -> Fault | None:
        with self._lock:
            self._counter += 1
            record.response_id = f"fake-resp-{self._counter:06d}"
            fault = self._faults.pop(0) if faultable and self._faults else None
            record.fault = fault.kind if fault else None
            self._requests.append(record)
        return fault

    def _unknown(self, version: str, model: str, method: str) -> JSONResponse:
        return _error(
            404,
            f"models/{model} is not found for API version {version}, or is not supported for {method}. "
            "Call ListModels to see the list of available models and their supported methods.",
        )

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake Gemini")

        @app.get("/{version}/models/{model}")
        async def get_model(version: str, model: str, request: Request):
            self._record(RecordedRequest("get", model, dict(request.headers)), faultable=False)
            if model not in self.models:
                return self._unknown(version, model, "get")
            return {
                "name": f"models/{model}",
                "version": "001",
                "displayName": f"Fake {model}",
                "description": "A stand-in model served by tests/fakegemini.py",
                "inputTokenLimit": 65536,
                "outputTokenLimit": 32768,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }

        @app.post("/{version}/models/{model_method}")
        async def generate(version: str, model_method: str, request: Request):
            model, _, method = model_method.partition(":")
            body = await request.json()
            record = RecordedRequest("generate", model, dict(request.headers), json=body)
            fault = self._record(record, faultable=model in self.models)
            if method != "generateContent":
                return _error(400, f"method {method!r} is not served by the fake")
            if model not in self.models:
                return self._unknown(version, model, "generateContent")
            if fault is not None:
                if fault.kind == "429":
                    headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
                    return _error(429, "Resource has been exhausted (e.g. check quota).", headers)
                if fault.kind in ("500", "503"):
                    message = "An internal error has occurred." if fault.kind == "500" else "The model is overloaded."
                    return _error(int(fault.kind), message)
                if fault.kind == "timeout":
                    await asyncio.sleep(fault.sleep_s)
            try:
                return await self._answer(model, record, body, fault)
            except (ProviderError, ValueError) as error:  # an input image it cannot read, like the API
                return _error(400, f"Unable to process input image: {error}")

        return app

    async def _answer(self, model: str, record: RecordedRequest, body: dict, fault: Fault | None) -> dict:
        config = body.get("generationConfig") or {}
        answer: dict = {"modelVersion": f"{model}-fake-001", "responseId": record.response_id}
        usage = {"promptTokenCount": max(1, len(record.text.split())) + 258 * len(record.inline_images)}
        if fault is not None and fault.kind == "blocked_prompt":
            answer["promptFeedback"] = {"blockReason": fault.reason or "SAFETY"}
            return {**answer, "usageMetadata": {**usage, "totalTokenCount": usage["promptTokenCount"]}}
        candidates = []
        for index in range(int(config.get("candidateCount") or 1)):
            if fault is not None and fault.kind == "blocked_candidate" and index == 0:
                candidates.append({"finishReason": fault.reason or "IMAGE_SAFETY", "index": index})
                continue
            if fault is not None and fault.kind == "no_image":
                part = {"text": "I can only describe this scene in words."}
            elif fault is not None and fault.kind == "malformed_image":
                part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(b"not an image").decode()}}
            else:
                seed = config.get("seed")
                variation = (int(seed) if seed is not None else self._counter) + index
                aspect = (config.get("imageConfig") or {}).get("aspectRatio")
                reference = record.inline_images[0] if record.inline_images else None
                data, _ = await asyncio.to_thread(
                    render_offline_image, record.text, variation=variation, reference=reference, size=_size(aspect)
                )
                part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(data).decode()}}
            candidates.append({"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": index})
        usage["candidatesTokenCount"] = 1120 * len(candidates)
        usage["totalTokenCount"] = usage["promptTokenCount"] + usage["candidatesTokenCount"]
        return {**answer, "candidates": candidates, "usageMetadata": usage}

