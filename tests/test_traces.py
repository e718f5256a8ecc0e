"""Trace trees through the object store, on a local directory and on a real S3 server
(SeaweedFS, tests/seaweed.py): the guide's names, images stored once, cleanup of one
generation only, the read API the ingress uses, and a whole offline generation on S3."""

from __future__ import annotations

import errno
import io
import json
import os
import random

import pytest
from PIL import Image

from pipeline.storage.objectstore import ArtifactNotFound, LocalObjectStore, stored_bytes
from pipeline.storage.factory import open_store
from pipeline.providers.offline import OfflineChat, OfflineImages
from pipeline.runner import Services, run_generation
from pipeline.schemas import (
    DimensionScores,
    EnhancementResult,
    GenerationRequest,
    IterationRecord,
    SceneResult,
    ScorerResult,
    VariationResult,
)
from pipeline.settings import PipelineSettings, TraceSettings
from testkit.doubles import PixelScoring
from pipeline.traces import LINK_SUFFIX, TraceStore, TraceWriter

SCORES = DimensionScores(completeness=80, specificity=70, professionalism=75, cinematography=60, brand_alignment=72)


def png(seed: int, size=(96, 54)) -> bytes:
    """Noise (so PNG cannot shrink it to nothing), the same for the same seed."""
    noise = random.Random(seed).randbytes(size[0] * size[1] * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", size, noise).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    """(artifacts, traces) on one backend, as the service would configure them."""
    if request.param == "local":
        return open_store(tmp_path / "artifacts"), open_store(tmp_path / "traces")
    location = request.getfixturevalue("s3_location")
    return (
        open_store(location.url + "/artifacts", location.settings),
        open_store(location.url + "/traces", location.settings),
    )


def enhancement(prompt: str) -> EnhancementResult:
    records = [
        IterationRecord(iteration=1, enhanced_prompt=prompt + ", 35mm", scores=SCORES, overall=72.0, critique="more light"),
        IterationRecord(iteration=2, enhanced_prompt=prompt + ", 35mm, 3200K", scores=SCORES, overall=88.0, critique="ok"),
    ]
    return EnhancementResult(
        original_prompt=prompt, final_prompt=records[1].enhanced_prompt, initial_scores=SCORES, initial_overall=72.0,
        final_scores=SCORES, final_overall=88.0, total_iterations=2, approved=True, stop_reason="approved", iterations=records,
    )  # fmt: skip


def write_scene(writer: TraceWriter, artifacts, n: int, images: list[bytes]) -> SceneResult:
    """One scene's whole trace, images first stored as artifacts as the runner does."""
    writer.original_prompt(n, f"scene {n} prompt")
    writer.enhancement(n, enhancement(f"scene {n} prompt"))
    variations = []
    for k, data in enumerate(images, start=1):
        key = artifacts.put(f"{writer.generation_id}/scene_{n}/variation_{k}.png", data)
        writer.image(n, k, data, artifact_key=key, artifacts=artifacts)
        score = {"pickscore": ScorerResult(raw=1.0, score=50.0 + k)}
        variations.append(VariationResult(variation=k, image_key=key, scores=score, overall=50.0 + k, rank=len(images) - k + 1))
    writer.quality_scores(n, "final", {"pickscore": 1.0}, variations)
    scene = SceneResult(
        scene_number=n, duration=4, original_prompt="p", enhanced_prompt="final", reference_image_key=variations[-1].image_key,
        quality_score=50.0 + len(images), selected_variation=len(images), variations=variations,
    )  # fmt: skip
    writer.selected(scene, threshold=30)
    return scene


GUIDE_NAMES = [
    "00_original_prompt.txt",
    "01_agent1_iteration_1.txt",
    "02_agent2_iteration_1.txt",
    "03_agent1_iteration_2.txt",
    "04_agent2_iteration_2.txt",
    "final_enhanced_prompt.txt",
    "image_1.png",
    "image_2.png",
    "image_3.png",
    "prompt_trace_summary.json",
    "quality_scores.json",
    "selected_best.txt",
]


def test_trace_tree_has_exactly_the_guides_names(stores):
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-a", artifacts=artifacts)
    images = [png(k) for k in range(3)]
    for n in (1, 2):
        write_scene(writer, artifacts, n, images)

    expected = sorted(f"scene_{n}/{name}" for n in (1, 2) for name in GUIDE_NAMES)
    assert writer.files() == expected
    assert TraceStore(traces, artifacts).list_files("gen-a") == expected  # what the ingress sees
    assert writer.list_files() == writer.list_files("gen-a") == expected
    assert writer.read_file("scene_1/00_original_prompt.txt") == writer.read_file("gen-a", "scene_1/00_original_prompt.txt")
    assert TraceWriter(traces, "gen-a", artifacts=artifacts).read_file("scene_1/image_2.png") == images[1]
    for k, data in enumerate(images, start=1):
        assert writer.read(f"scene_2/image_{k}.png") == data
    summary = json.loads(writer.read("gen-a", "scene_1/prompt_trace_summary.json"))
    assert summary["final_scores"]["overall"] == 88.0 and summary["total_iterations"] == 2
    assert writer.read("scene_1/selected_best.txt").decode().startswith("selected: image_3.png")
    assert "Prompt Engineer - iteration 2" in writer.read("scene_1/04_agent2_iteration_2.txt").decode()
    # Every stored key starts with a guide name (the S3 pointers are `image_k.png.link`).
    raw = [key.split("/", 2)[2] for key in traces.list("gen-a")]
    assert all(any(name.startswith(guide) for guide in GUIDE_NAMES) for name in raw)


def test_images_are_stored_once(stores):
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-b", artifacts=artifacts)
    images = [png(k, size=(320, 180)) for k in range(4)]
    write_scene(writer, artifacts, 1, images)

    image_bytes = sum(map(len, images))
    text_bytes = sum(len(writer.read(name)) for name in writer.files() if not name.endswith(".png"))
    total = stored_bytes(artifacts, traces)
    assert stored_bytes(artifacts) == image_bytes
    # The trace tree adds its text files and at most a small pointer per image, never the images.
    assert text_bytes <= total - image_bytes < text_bytes + 200 * len(images)
    assert [writer.read(f"scene_1/image_{k}.png") for k in range(1, 5)] == images


def test_local_trace_images_are_hard_links_with_the_guides_names(tmp_path):
    artifacts = LocalObjectStore(tmp_path / "artifacts")
    writer = TraceWriter(tmp_path / "traces", "gen-c")  # a plain root still works
    key = artifacts.put("gen-c/scene_1/variation_1.png", png(1))
    assert writer.image(1, 1, png(1), artifact_key=key, artifacts=artifacts) == "link"
    on_disk = tmp_path / "traces" / "gen-c" / "scene_1" / "image_1.png"
    assert os.path.samefile(on_disk, artifacts.path(key))
    assert sorted(p.name for p in on_disk.parent.iterdir()) == ["image_1.png"]


def test_local_trace_images_are_copied_across_filesystems(tmp_path, monkeypatch):
    artifacts = LocalObjectStore(tmp_path / "artifacts")
    writer = TraceWriter(tmp_path / "traces", "gen-d", artifacts=artifacts)
    key = artifacts.put("gen-d/scene_1/variation_1.png", png(2))

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert writer.image(1, 1, png(2), artifact_key=key) == "copy"
    assert writer.read("scene_1/image_1.png") == png(2)


def test_s3_traces_copy_images_whose_artifact_is_on_one_node(tmp_path, s3_location):
    """A pointer from shared storage into one node's disk would be unreadable elsewhere."""
    artifacts = LocalObjectStore(tmp_path / "artifacts")
    traces = open_store(s3_location.url, s3_location.settings)
    writer = TraceWriter(traces, "gen-e", artifacts=artifacts)
    key = artifacts.put("gen-e/scene_1/variation_1.png", png(3))
    assert writer.image(1, 1, png(3), artifact_key=key) == "copy"
    assert traces.list("gen-e") == ["gen-e/scene_1/image_1.png"]


def test_s3_trace_images_are_pointers_to_the_artifacts(s3_location):
    artifacts = open_store(s3_location.url + "/artifacts", s3_location.settings)
    traces = open_store(s3_location.url + "/traces", s3_location.settings)
    writer = TraceWriter(traces, "gen-f")
    key = artifacts.put("gen-f/scene_1/variation_2.png", png(4))
    assert writer.image(1, 2, png(4), artifact_key=key, artifacts=artifacts) == "pointer"
    assert traces.list("gen-f") == ["gen-f/scene_1/image_2.png" + LINK_SUFFIX]
    # A reader that was not handed the artifact store finds it from the pointer.
    assert TraceStore(traces, s3=s3_location.settings).read_file("gen-f", "scene_1/image_2.png") == png(4)
    assert TraceWriter(traces, "gen-f").read_file("scene_1/image_2.png") == png(4)  # the trace store's settings


def test_cleanup_removes_one_generation_and_nothing_else(stores):
    artifacts, traces = stores
    one, other = TraceWriter(traces, "gen-1", artifacts=artifacts), TraceWriter(traces, "gen-10", artifacts=artifacts)
    write_scene(one, artifacts, 1, [png(5), png(6)])
    write_scene(other, artifacts, 1, [png(7)])
    before_other = other.files()

    stored = traces.list("gen-1")
    assert one.cleanup() == len(stored) > 0
    assert one.files() == [] and traces.list("gen-1") == []
    assert other.files() == before_other  # gen-10 starts with "gen-1": untouched
    assert artifacts.get("gen-1/scene_1/variation_2.png") == png(6)  # the images are artifacts: kept
    assert other.read("scene_1/image_1.png") == png(7)
    assert one.cleanup() == 0  # twice is harmless


def test_cleanup_counts_what_it_removed(stores):
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-g", artifacts=artifacts)
    write_scene(writer, artifacts, 1, [png(8)])
    stored = len(traces.list("gen-g"))
    assert stored == len(writer.files()) > 0
    assert writer.cleanup() == stored


def test_read_api_refuses_bad_and_missing_names(stores):
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-h", artifacts=artifacts)
    write_scene(writer, artifacts, 1, [png(9)])
    reader = TraceStore(traces, artifacts)
    for name in ["../gen-x/scene_1/00_original_prompt.txt", "/etc/passwd", "scene_1/../../x", ""]:
        with pytest.raises(ValueError):
            reader.read_file("gen-h", name)
    with pytest.raises(ValueError):
        reader.list_files("../gen-h")
    with pytest.raises(ArtifactNotFound):
        reader.read_file("gen-h", "scene_1/image_7.png")
    with pytest.raises(ArtifactNotFound):
        reader.read_file("gen-h", "scene_1/image_1.png" + LINK_SUFFIX)  # pointers are not trace files
    assert reader.list_files("gen-unknown") == []


async def test_offline_generation_on_s3_is_read_back_from_the_store(s3_location):
    """A whole generation (offline providers, pixel scoring) with artifacts and traces on S3
    and nothing on local disk; everything is then read back through the stores."""
    artifacts_url, traces_url = s3_location.url + "/artifacts", s3_location.url + "/traces"
    settings = PipelineSettings.offline().model_copy(
        update={
            "artifacts_dir": artifacts_url,
            "traces": TraceSettings(root=traces_url, keep=True),
            "s3": s3_location.settings,
        }
    )
    artifacts, traces = open_store(artifacts_url, settings.s3), open_store(traces_url, settings.s3)
    services = Services(
        chat=OfflineChat(), images=OfflineImages(settings.images), scoring=PixelScoring(), artifacts=artifacts, traces=traces
    )
    request = GenerationRequest(prompt="A launch video for Aurora, a smart desk lamp", target_duration=15)
    scenes = await run_generation("gen-s3", request, services, settings)

    reader = TraceStore(traces, artifacts)
    files = reader.list_files("gen-s3")
    for scene in scenes:
        n = scene.scene_number
        assert artifacts.exists(scene.reference_image_key)
        for name in ["00_original_prompt.txt", "final_enhanced_prompt.txt", "prompt_trace_summary.json",
                     "quality_scores.json", "selected_best.txt"]:  # fmt: skip
            assert f"scene_{n}/{name}" in files
        for v in scene.variations:
            assert reader.read_file("gen-s3", f"scene_{n}/image_{v.variation}.png") == artifacts.get(v.image_key)
        selected = reader.read_file("gen-s3", f"scene_{n}/selected_best.txt").decode()
        assert selected.startswith(f"selected: image_{scene.selected_variation}.png")
    assert len(scenes) == 4 and artifacts.list("gen-s3")

    # keep=false: the same run on S3 leaves no trace objects, only the artifacts.
    settings.traces.keep = False
    await run_generation("gen-s3-b", request, services, settings)
    assert traces.list("gen-s3-b") == [] and len(artifacts.list("gen-s3-b")) == 4 * 4


async def test_failed_agent1_iteration_is_written_as_an_agent1_failure(stores):
    """Agent 1 fails at iteration 2: its file says so (not iteration 1's prompt passed off as a
    new one), and no agent-2 file claims a review that never ran."""
    from tests.test_agents import SCENE, STORY, ScriptedChat, review, rewrite
    from pipeline.agents import enhance_scene
    from pipeline.settings import EnhancementSettings

    chat = ScriptedChat([rewrite(1), review(70, 70, 70, 70, 70), "{not json", "still not json"])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=4, settings=EnhancementSettings(), retries=1)
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-fail1", artifacts=artifacts)
    writer.enhancement(2, result)

    names = writer.files()
    assert "scene_2/03_agent1_iteration_2.txt" in names
    assert "scene_2/04_agent2_iteration_2.txt" not in names
    agent1 = writer.read("scene_2/03_agent1_iteration_2.txt").decode()
    assert "FAILED" in agent1 and "2 attempt" in agent1
    assert "rewrite number 1" not in agent1  # iteration 1's prompt is not shown as a new one
    agent2_first = writer.read("scene_2/02_agent2_iteration_1.txt").decode()
    assert "ERROR" not in agent2_first
    summary = json.loads(writer.read("scene_2/prompt_trace_summary.json"))
    failed = summary["iterations"][-1]
    assert failed["iteration"] == 2 and failed["failed_agent"] == "cinematographer"
    assert failed["enhanced_prompt"] is None and "2 attempt" in failed["error"]
    assert summary["iterations"][0]["failed_agent"] is None
    assert summary["final_prompt"].startswith("rewrite number 1")


async def test_failed_agent2_iteration_is_written_in_the_agent2_file(stores):
    from tests.test_agents import SCENE, STORY, ScriptedChat, rewrite
    from pipeline.agents import enhance_scene
    from pipeline.settings import EnhancementSettings

    chat = ScriptedChat([rewrite(1), "nope"])
    result = await enhance_scene(chat, SCENE, STORY, max_iterations=2, settings=EnhancementSettings(), retries=0)
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-fail2", artifacts=artifacts)
    writer.enhancement(2, result)
    assert "rewrite number 1" in writer.read("scene_2/01_agent1_iteration_1.txt").decode()
    assert "ERROR" in writer.read("scene_2/02_agent2_iteration_1.txt").decode()
    summary = json.loads(writer.read("scene_2/prompt_trace_summary.json"))
    assert summary["iterations"][0]["failed_agent"] == "prompt_engineer"


def test_rewritten_enhancement_leaves_no_stale_agent_files(stores):
    """A resumed job enhances a scene again, maybe in fewer iterations: the earlier run's files
    of higher iterations must not stay behind as if they belonged to this run."""
    artifacts, traces = stores
    writer = TraceWriter(traces, "gen-resume", artifacts=artifacts)
    writer.original_prompt(1, "scene 1 prompt")
    writer.enhancement(1, enhancement("scene 1 prompt"))  # two iterations
    writer.original_prompt(2, "scene 2 prompt")
    writer.enhancement(2, enhancement("scene 2 prompt"))
    one = enhancement("scene 1 prompt again")
    one = one.model_copy(update={"iterations": one.iterations[:1], "total_iterations": 1})
    writer.enhancement(1, one)

    assert [n for n in writer.files() if n.startswith("scene_1/")] == [
        "scene_1/00_original_prompt.txt",
        "scene_1/01_agent1_iteration_1.txt",
        "scene_1/02_agent2_iteration_1.txt",
        "scene_1/final_enhanced_prompt.txt",
        "scene_1/prompt_trace_summary.json",
    ]
    assert "scene 1 prompt again" in writer.read("scene_1/01_agent1_iteration_1.txt").decode()
    assert "scene_2/04_agent2_iteration_2.txt" in writer.files()  # another scene's files stay


async def test_a_refused_rewrite_is_an_agent1_failure_naming_the_dropped_markers(tmp_path):
    """Consistency markers: a rewrite that dropped a consistency marker is shown with REFUSED and the
    markers it dropped; agent 2 never reviewed it, so it has no agent-2 file. The summary
    carries the scene's sheet and markers."""
    from tests.test_agents import MARKED, MARKERS, STORY, ScriptedChat, marked_rewrite, review
    from pipeline.agents import enhance_scene
    from pipeline.schemas import ConsistencySheet
    from pipeline.settings import EnhancementSettings

    chat = ScriptedChat([marked_rewrite(1, MARKERS[1:]), marked_rewrite(2), review(90, 90, 90, 90, 90)])
    result = await enhance_scene(chat, MARKED, STORY, max_iterations=3, settings=EnhancementSettings(), retries=0)
    writer = TraceWriter(open_store(tmp_path / "traces"), "gen-refused", artifacts=open_store(tmp_path / "a"))
    sheet = ConsistencySheet(style="soft morning light, warm neutrals")
    writer.enhancement(2, result, scene=MARKED.model_copy(update={"sheet": sheet}))

    names = writer.files()
    assert "scene_2/02_agent2_iteration_1.txt" not in names and "scene_2/04_agent2_iteration_2.txt" in names
    agent1 = writer.read("scene_2/01_agent1_iteration_1.txt").decode()
    assert "REFUSED" in agent1 and MARKERS[0] in agent1 and "rewrite 1" in agent1
    summary = json.loads(writer.read("scene_2/prompt_trace_summary.json"))
    refused = summary["iterations"][0]
    assert refused["failed_agent"] == "cinematographer" and refused["dropped_markers"] == [MARKERS[0]]
    assert summary["iterations"][1]["failed_agent"] is None and summary["final_prompt"].startswith("rewrite 2")
    assert summary["consistency_markers"] == MARKERS and summary["scene_description"] == MARKED.description
    assert summary["consistency_sheet"]["style"] == sheet.style
