"""Cross-scene consistency through the whole runner, no Ray: consistency markers in every scene's prompt and
trace, the scoring text setting with its truncation record, the consistency model (the tiny
DINOv2 through LocalConsistency) against an independent computation, the renormalised overall,
and the status's consistency sheet."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.storage.objectstore import LocalObjectStore
from pipeline.consistency import missing_markers
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.runner import GenerationError, Services, run_generation
from pipeline.schemas import GenerationRequest, ScorerResult
from pipeline.ranking import LocalConsistency, formula, selection_overall
from pipeline.settings import PipelineSettings, ScorerWeights, TraceSettings
from scorers import load_scorer
from testkit.doubles import PixelScoring

STORY = "A launch video for Aurora, a smart desk lamp that adapts to your circadian rhythm"
FOUR = {"pickscore": 0.50, "clipscore": 0.25, "vqascore": 0.15, "aesthetic": 0.10}


class WordLimitScoring(PixelScoring):
    """PixelScoring whose "pickscore" text encoder takes `limit` words: longer texts are cut
    and flagged, as a CLIP scorer flags texts past 77 tokens."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    async def score(self, images, prompts):
        results = await super().score(images, prompts)
        for slot, prompt in zip(results, prompts):
            pick = slot["pickscore"]
            slot["pickscore"] = ScorerResult(raw=pick.raw, score=pick.score, truncated=len(prompt.split()) > self.limit)
        return results


@pytest.fixture(scope="module")
def consistency_model(tmp_path_factory):
    from scorers.tiny import build_tiny_models

    options = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    return load_scorer("consistency", **options["consistency"], device="cpu", dtype="fp32"), options["consistency"]["model"]


def make(tmp_path, *, weights=None, text="scene", scoring=None, consistency=None, markers=True):
    settings = PipelineSettings.offline(tmp_path)
    settings = settings.model_copy(
        update={
            "traces": TraceSettings(root=tmp_path / "traces", keep=True),
            "scoring": settings.scoring.model_copy(update={"text": text, "weights": weights or ScorerWeights()}),
            "storyboard": settings.storyboard.model_copy(update={"markers": markers}),
        }
    )
    services = Services(
        chat=OfflineChat(), images=OfflineImages(settings.images), scoring=scoring or PixelScoring(),
        artifacts=LocalObjectStore(settings.artifacts_dir), consistency=consistency,
    )
    return settings, services


def read(settings, gid, n, name):
    return json.loads((settings.traces.root / gid / f"scene_{n}" / name).read_text())


def request(**kw):
    return GenerationRequest(prompt=STORY, target_duration=15, advanced_image_num_variations=2, **kw)


async def test_every_scene_prompt_and_trace_carries_its_markers_verbatim(tmp_path):
    settings, services = make(tmp_path)
    scenes = await run_generation("gen-m", request(), services, settings)
    sheet = read(settings, "gen-m", 1, "prompt_trace_summary.json")["consistency_sheet"]
    assert sheet["product"]["name"].startswith("Aurora") and sheet["characters"] and sheet["style"]
    assert sheet["source"] == "prompt"
    for scene in scenes:
        n = scene.scene_number
        summary = read(settings, "gen-m", n, "prompt_trace_summary.json")
        markers = summary["consistency_markers"]
        assert summary["consistency_sheet"] == sheet  # the same sheet in every scene
        assert any(m.startswith("Aurora") for m in markers) and any(m.startswith("Style:") for m in markers)
        original = (settings.traces.root / "gen-m" / f"scene_{n}" / "00_original_prompt.txt").read_text()
        assert original.strip() == scene.original_prompt and original.startswith(summary["scene_description"])
        assert missing_markers(scene.original_prompt, markers) == []
        assert missing_markers(scene.enhanced_prompt, markers) == []  # the agents kept them
    host = sheet["characters"][0]["name"]
    with_host = [s for s in scenes if host in s.original_prompt]
    assert 0 < len(with_host) < len(scenes)  # a character's marker only where a person is in the beat


async def test_without_markers_the_sheet_is_planned_but_prompts_are_plain(tmp_path):
    settings, services = make(tmp_path, markers=False)
    scenes = await run_generation("gen-p", request(), services, settings)
    summary = read(settings, "gen-p", 2, "prompt_trace_summary.json")
    assert summary["consistency_markers"] == [] and summary["consistency_sheet"] is not None
    assert "Style:" not in scenes[1].original_prompt


@pytest.mark.parametrize("text", ["scene", "enhanced"])
async def test_the_scoring_text_setting_and_its_truncation_record(tmp_path, text):
    scoring = WordLimitScoring(limit=40)
    settings, services = make(tmp_path, text=text, scoring=scoring)
    scenes = await run_generation("gen-t", request(), services, settings)
    for scene, call in zip(scenes, scoring.calls):
        expected = scene.original_prompt if text == "scene" else scene.enhanced_prompt
        assert call.prompts == [expected] * 2
        quality = read(settings, "gen-t", scene.scene_number, "quality_scores.json")
        assert quality["prompt"] == scene.enhanced_prompt  # the image prompt, as before
        assert quality["scoring"]["text_source"] == text and quality["scoring"]["text"] == expected
        cut = len(expected.split()) > 40
        assert quality["scoring"]["truncated_by"] == (["pickscore"] if cut else [])
        if text == "scene":  # the description comes first: a cut at the end keeps it whole
            description = read(settings, "gen-t", scene.scene_number, "prompt_trace_summary.json")["scene_description"]
            assert expected.startswith(description)
    if text == "enhanced":  # the Cinematographer's rewrites overflow the encoder (docs/scoring.md)
        assert all(len(s.enhanced_prompt.split()) > 40 for s in scenes)


def pixels(data: bytes) -> torch.Tensor:
    """DINOv2 tiny preprocessing by hand: shortest edge 64 bicubic, centre crop 56, ImageNet norm."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = 64 / min(w, h)
    image = image.resize((64, int(h * scale)) if w <= h else (int(w * scale), 64), Image.Resampling.BICUBIC)
    left, top = (image.width - 56) // 2, (image.height - 56) // 2
    crop = np.asarray(image.crop((left, top, left + 56, top + 56)), dtype=np.float32) / 255.0
    crop = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(crop.transpose(2, 0, 1).astype(np.float32))


def cosine(model_dir: str, a: bytes, b: bytes) -> float:
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():
        cls = model(pixel_values=torch.stack([pixels(a), pixels(b)])).last_hidden_state[:, 0].numpy()
    return float(cls[0] @ cls[1] / (np.linalg.norm(cls[0]) * np.linalg.norm(cls[1])))


@pytest.mark.parametrize("weight", [0.0, 0.2])
async def test_consistency_is_measured_against_previous_and_first_and_renormalised(tmp_path, consistency_model, weight):
    model, model_dir = consistency_model
    settings, services = make(tmp_path, weights=ScorerWeights(consistency=weight), consistency=LocalConsistency(model))
    scenes = await run_generation("gen-c", request(), services, settings)
    artifacts = services.artifacts
    first, second, third = scenes[0], scenes[1], scenes[2]

    q1 = read(settings, "gen-c", 1, "quality_scores.json")
    assert first.consistency_score is None and all(v["consistency"] is None for v in q1["variations"])
    assert "no reference image" in q1["scoring"]["note"] and q1["scoring"]["renormalised"] is False

    q2 = read(settings, "gen-c", 2, "quality_scores.json")
    assert q2["scoring"]["consistency_references"] == [{"scene_number": 1, "roles": ["previous", "first"]}]
    q3 = read(settings, "gen-c", 3, "quality_scores.json")
    assert q3["scoring"]["consistency_references"] == [
        {"scene_number": 2, "roles": ["previous"]}, {"scene_number": 1, "roles": ["first"]}
    ]
    for v in third.variations:
        data = artifacts.get(v.image_key)
        cos_prev = cosine(model_dir, data, artifacts.get(second.reference_image_key))
        cos_first = cosine(model_dir, data, artifacts.get(first.reference_image_key))
        assert [r.raw for r in v.consistency.references] == pytest.approx([cos_prev, cos_first], abs=1e-4)
        expected = (100 * min(max(cos_prev, 0), 1) + 100 * min(max(cos_first, 0), 1)) / 2
        assert v.consistency.score == pytest.approx(expected, abs=1e-2)
        text = sum(FOUR[name] * v.scores[name].score for name in FOUR)
        assert v.overall == pytest.approx((text + weight * v.consistency.score) / (1 + weight), abs=1e-3)
    best = min(third.variations, key=lambda v: v.rank)
    assert third.consistency_score == best.consistency.score
    assert q3["scoring"]["renormalised"] is (weight > 0)
    if weight:
        assert q3["scoring"]["formula"] == "(0.5*pickscore + 0.25*clipscore + 0.15*vqascore + 0.1*aesthetic + 0.2*consistency) / 1.2"
        assert "renormalised" in q3["scoring"]["note"]
    else:
        assert q3["scoring"]["formula"] == "0.5*pickscore + 0.25*clipscore + 0.15*vqascore + 0.1*aesthetic"
        assert "not used in selection" in q3["scoring"]["note"]
    selected = (settings.traces.root / "gen-c" / "scene_3" / "selected_best.txt").read_text()
    assert "consistency with earlier scenes" in selected and q3["scoring"]["formula"] in selected


async def test_a_user_image_is_the_first_reference(tmp_path, consistency_model):
    model, _ = consistency_model
    settings, services = make(tmp_path, consistency=LocalConsistency(model))
    out = io.BytesIO()
    Image.new("RGB", (96, 54), (30, 60, 200)).save(out, format="PNG")
    scenes = await run_generation("gen-u", request(), services, settings, reference_image=out.getvalue())
    assert scenes[0].user_provided and scenes[0].consistency_score is None
    summary = read(settings, "gen-u", 1, "prompt_trace_summary.json")
    assert summary["consistency_sheet"]["source"] == "prompt-no-vision"  # the offline LLM reads no images
    assert read(settings, "gen-u", 3, "quality_scores.json")["scoring"]["consistency_references"][1] == {
        "scene_number": 1, "roles": ["first"]
    }
    assert all(s.consistency_score is not None for s in scenes[1:])


async def test_a_consistency_weight_without_a_consistency_scorer_is_refused(tmp_path):
    settings, services = make(tmp_path, weights=ScorerWeights(consistency=0.2))
    with pytest.raises(GenerationError, match="no consistency scorer is configured"):
        await run_generation("gen-x", request(), services, settings)


def test_the_overall_formula_with_and_without_consistency():
    scores = {name: ScorerResult(raw=0, score=s) for name, s in zip(FOUR, (80, 60, 40, 20))}
    from pipeline.schemas import ConsistencyScore

    kept = ConsistencyScore(raw=0.5, score=50, references=[])
    guide = 0.5 * 80 + 0.25 * 60 + 0.15 * 40 + 0.1 * 20
    assert selection_overall(scores, {**FOUR, "consistency": 0.0}, kept) == pytest.approx(guide)
    assert selection_overall(scores, {**FOUR, "consistency": 0.2}, None) == pytest.approx(guide)
    assert selection_overall(scores, {**FOUR, "consistency": 0.2}, kept) == pytest.approx((guide + 0.2 * 50) / 1.2)
    assert formula({**FOUR, "consistency": 0.0}, False) == "0.5*pickscore + 0.25*clipscore + 0.15*vqascore + 0.1*aesthetic"


async def test_the_status_shows_the_sheet_markers_and_consistency(tmp_path):
    from pipeline.jobs.store import JobStore
    from pipeline.schemas import SceneResult
    from pipeline.jobs.status import to_status
    from pipeline.storyboard import plan_storyboard

    plan = await plan_storyboard(OfflineChat(), STORY, 15, retries=0)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create("gen-s", "alice", request().model_dump(mode="json"), offline=True)
    store.update("gen-s", status="running", progress=50, storyboard=plan)
    store.checkpoint_scene("gen-s", SceneResult(
        scene_number=2, duration=4, original_prompt=plan[1].prompt, enhanced_prompt="x",
        reference_image_key="gen-s/scene_2/variation_1.png", quality_score=50.0, consistency_score=61.5,
    ))
    body = to_status(store.get("gen-s"), store.scenes("gen-s"), lambda key: key).model_dump(mode="json")
    sheet = body["storyboard_plan"]["consistency_sheet"]
    assert sheet == plan[0].sheet.model_dump(mode="json") and sheet["product"]["name"].startswith("Aurora")
    first, second = body["storyboard_plan"]["scenes"][:2]
    assert first["consistency_markers"] == plan[0].markers and "consistency_score" not in first
    assert second["consistency_score"] == 61.5


def test_which_llm_reads_images_and_the_new_settings_defaults():
    from pipeline.settings import LLMSettings

    assert LLMSettings().reads_images() is True and LLMSettings(provider="offline").reads_images() is False
    assert LLMSettings(accepts_images=False).reads_images() is False
    defaults = PipelineSettings()
    assert defaults.scoring.text == "scene" and defaults.scoring.weights.consistency == 0.0
    assert defaults.scoring.weights.as_dict() == FOUR and defaults.storyboard.markers is True
    assert defaults.scoring.consistency.model == "facebook/dinov2-base"
    with pytest.raises(ValueError):
        PipelineSettings.model_validate({"scoring": {"text": "rewritten"}})


class BrokenConsistency:
    """A ConsistencyClient whose model cannot run."""

    async def similarity(self, images, references):
        raise RuntimeError("consistency replica is gone")


async def test_a_consistency_scorer_that_cannot_run_fails_the_scene_with_no_made_up_number(tmp_path):
    settings, services = make(tmp_path, consistency=BrokenConsistency())
    with pytest.raises(GenerationError, match="scene 2: scoring failed: consistency replica is gone"):
        await run_generation("gen-b", request(), services, settings)
    # kept in the failed attempt's own folder (fencing: the guide's names follow a checkpoint)
    [kept] = (settings.traces.root / "gen-b" / "scene_2").glob("attempt_*/quality_scores.json")
    quality = json.loads(kept.read_text())
    assert all(v["consistency"] is None and v["overall"] is None for v in quality["variations"])
