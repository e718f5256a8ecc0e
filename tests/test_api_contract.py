"""The HTTP API's contract without Ray: request validation (the guide's fields stay accepted,
unknown ones are refused by name, a prompt needs visible text) and the status shape."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.jobs.store import JobStore
from pipeline.schemas import GenerationRequest, SceneResult, ScenePlan
from pipeline.jobs.status import to_status

GUIDE_BODY = {
    "prompt": "Eco-friendly running shoes made from recycled ocean plastic",
    "target_duration": 12,
    "use_advanced_image_generation": True,
    "advanced_image_num_variations": 2,
    "advanced_image_max_enhancement_iterations": 2,
    "advanced_image_quality_threshold": 30.0,
}


def errors_of(body: dict) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        GenerationRequest.model_validate(body)
    return info.value.errors()


def test_guide_fields_are_accepted():
    request = GenerationRequest.model_validate(GUIDE_BODY)
    assert request.model_dump() == GUIDE_BODY


def test_unknown_fields_are_refused_by_name():
    errors = errors_of({**GUIDE_BODY, "padding": "x" * 1000})
    assert [e["loc"] for e in errors] == [("padding",)]
    assert "not permitted" in errors[0]["msg"]
    errors_of({**GUIDE_BODY, "advanced_image_num_variation": 3})  # a misspelling is not silently dropped


@pytest.mark.parametrize(
    "prompt",
    [
        "\u200b" * 10,  # zero-width spaces
        "\x00" * 10,  # NULs
        "\u200b\u200c\u200d\u2060\ufeff" * 4,  # assorted format characters
        "\u0301" * 12,  # combining marks with nothing to combine with
        "a\u200bb " * 3,  # twelve characters, eight of them visible (spaces count, as before)
    ],
)
def test_prompt_needs_visible_text(prompt):
    errors = errors_of({**GUIDE_BODY, "prompt": prompt})
    assert errors[0]["loc"] == ("prompt",)


@pytest.mark.parametrize("prompt", ["Coffee\x00 that starts your morning", "Coffee \ud800 that starts your morning"])
def test_prompt_refuses_control_and_surrogate_characters(prompt):
    """NUL cannot be stored in PostgreSQL text and a lone surrogate cannot be encoded as UTF-8:
    both used to fail later, inside the service, instead of here with the field named."""
    errors = errors_of({**GUIDE_BODY, "prompt": prompt})
    assert errors[0]["loc"] == ("prompt",)


def test_prompts_in_any_script_and_with_emoji_sequences_are_accepted():
    for prompt in [
        "Une tasse de café au lever du soleil",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 \u0642\u0647\u0648\u0647 \u0628\u0646\u0648\u0634\u0645",  # ZWNJ inside Persian
        "Family \U0001f468\u200d\U0001f469\u200d\U0001f467 at the beach at sunset",
        "Tab\tand\nnewline  collapse to spaces",
        "\u0915\u0949\u092b\u093c\u0940 \u0915\u093e \u0915\u092a",  # Devanagari: vowel signs are marks
    ]:
        request = GenerationRequest(prompt=prompt)
        assert request.prompt == " ".join(prompt.split())


def test_status_plan_carries_advanced_flag(tmp_path):
    """The guide's example has `advanced_image_generation_used: true` both at the top level and
    inside `storyboard_plan`."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create("gen-1", "alice", GenerationRequest.model_validate(GUIDE_BODY).model_dump(mode="json"), offline=False)
    store.update("gen-1", status="running", progress=40, storyboard=[ScenePlan(scene_number=1, duration=4, prompt="a shoe")])
    store.checkpoint_scene("gen-1", SceneResult(
        scene_number=1, duration=4, original_prompt="a shoe", enhanced_prompt="a shoe, 35 mm",
        reference_image_key="gen-1/scene_1/variation_1.png", quality_score=50.0,
    ))
    body = to_status(store.get("gen-1"), store.scenes("gen-1"), lambda key: f"/api/artifacts/{key}").model_dump(mode="json")
    assert body["advanced_image_generation_used"] is True
    plan = body["storyboard_plan"]
    assert plan["advanced_image_generation_used"] is True
    assert list(plan) == ["advanced_image_generation_used", "advanced_image_settings", "scenes"]
    assert plan["scenes"][0]["reference_image_url"] == "/api/artifacts/gen-1/scene_1/variation_1.png"
    store.close()


# --- the edge of the HTTP API (deployments.contract), without Ray ---------------------------


def test_json_body_limit_refuses_large_bodies_and_passes_small_ones():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deployments.bodylimit import BodyLimit

    app = FastAPI()
    app.add_middleware(BodyLimit, limits={"/api/generate": 1000})

    @app.post("/api/generate")
    def generate(body: dict) -> dict:
        return {"keys": sorted(body)}

    @app.post("/other")
    def other(body: dict) -> dict:
        return {"n": len(body)}

    client = TestClient(app)
    assert client.post("/api/generate", json={"prompt": "a" * 100}).json() == {"keys": ["prompt"]}
    big = client.post("/api/generate", json={"prompt": "a" * 2000})
    assert big.status_code == 413 and "1000 bytes" in big.json()["detail"]
    assert big.headers["content-type"] == "application/problem+json" and big.json()["instance"] == "/api/generate"

    def chunks():  # no Content-Length: counted while it streams
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"a" * 100
        yield b'"}'

    streamed = client.post("/api/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/other", json={"x": "a" * 5000}).json() == {"n": 1}  # other paths untouched


def test_names_from_the_url_are_checked():
    from fastapi import HTTPException

    from deployments.contract import check_generation_id, check_trace_name

    check_generation_id("3fe8cfdd609f42dd9f8d0c33a4f1c433")
    for bad in ["a\x00b", "x" * 65, "", "../etc", "a b"]:
        with pytest.raises(HTTPException) as info:
            check_generation_id(bad)
        assert info.value.status_code == 404
    check_trace_name("scene_1/01_agent1_iteration_1.txt")
    check_trace_name("scene_1/" + "x" * 128)
    for bad in ["a\x00b.txt", "scene_1/" + "x" * 129, "scene_1/" + "x" * 256, "a/" * 600, "\x7f", "caf\u00e9.txt", "a//b"]:
        with pytest.raises(HTTPException) as info:
            check_trace_name(bad)
        assert info.value.status_code == 400


def test_links_use_the_configured_base_or_stay_relative():
    from deployments.contract import link

    assert link("https://sceneref.example.com/", "", "/api/status/1") == "https://sceneref.example.com/api/status/1"
    assert link("https://sceneref.example.com", "/v1", "/api/status/1") == "https://sceneref.example.com/v1/api/status/1"
    assert link(None, "", "/api/status/1") == "/api/status/1"
    assert link(None, "/cluster/", "/api/status/1") == "/cluster/api/status/1"


def test_validation_problem_matches_its_declared_schema():
    from http import HTTPStatus

    from deployments.contract import ValidationProblem, validation_problem

    body = validation_problem([
        {"loc": ("body", "prompt"), "msg": "too short", "type": "x"},
        {"loc": ("body",), "msg": "Field required", "type": "missing"},
    ], "/api/generate")
    assert ValidationProblem.model_validate(body).model_dump() == body
    assert body["detail"] == "invalid request: prompt: too short; body: Field required"
    assert body["status"] == 422 and body["title"] == HTTPStatus(422).phrase and body["type"] == "about:blank"
