"""The serving benchmark's own bookkeeping (benchmarks/serving.py, scoring throughput), without running it:
what it reads back from a run's traces for the in-process limit, the configs it writes for
each scorer profile and layout, and its CPU accounting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving  # noqa: E402

from deployments.args import AppArgs  # noqa: E402


def scene(directory: Path, number: int, text: str, references: list[int], selected: int = 1) -> None:
    folder = directory / f"scene_{number}"
    folder.mkdir(parents=True)
    variations = []
    for k in (1, 2):
        (folder / f"image_{k}.png").write_bytes(f"scene {number} image {k}".encode())
        consistency = {"references": [{"scene_number": r} for r in references]} if references else None
        variations.append({"variation": k, "image": f"image_{k}.png", "consistency": consistency})
    variations.append({"variation": 3, "image": None, "error": "provider refused"})  # never scored
    (folder / "quality_scores.json").write_text(json.dumps(
        {"prompt": "enhanced prompt", "scoring": {"text": text}, "variations": variations}))
    (folder / "selected_best.txt").write_text(f"selected: image_{selected}.png\noverall quality score: 50\n")


def test_the_limit_reads_back_every_scored_image_its_text_and_consistency_pair(tmp_path):
    generation = tmp_path / "gen"
    scene(generation, 1, "scene one", [], selected=2)
    scene(generation, 2, "scene two", [1])
    scene(generation, 3, "scene three", [2, 1])
    scored = serving.scored_inputs(tmp_path)
    assert len(scored) == 6
    assert (b"scene 2 image 1", "scene two") in scored and (b"scene 3 image 2", "scene three") in scored
    pairs = serving.consistency_inputs(tmp_path)
    assert len(pairs) == 2 + 4
    assert (b"scene 2 image 1", b"scene 1 image 2") in pairs  # scene 1's selected image is image 2
    assert (b"scene 3 image 2", b"scene 2 image 1") in pairs and (b"scene 3 image 2", b"scene 1 image 2") in pairs


@pytest.mark.parametrize("profile,layout", [("shipped", None), ("shipped", "separate"), ("before", None), ("before", "colocated")])
def test_each_profile_and_layout_writes_a_config_the_app_accepts(tmp_path, profile, layout):
    models = {name: {"model": f"/models/{name}"} for name in serving.SCORERS}
    path = serving.write_config(tmp_path, 8123, models, serving.MODES["on"], profile, layout)
    app = yaml.safe_load(path.read_text())["applications"][0]
    args = AppArgs.model_validate(app["args"])
    expected = layout or ("separate" if profile == "before" else "colocated")
    assert args.scorers.layout == expected
    if profile == "before":  # the serving before the scoring-throughput work: no CPU reserved, one thread, batch 16
        assert args.scorers.vqascore.torch_threads() == 1 and args.scorers.vqascore.batch.max_batch_size == 16
    off = serving.write_config(tmp_path, 8123, models, serving.MODES["off"], profile, layout)
    args = AppArgs.model_validate(yaml.safe_load(off.read_text())["applications"][0]["args"])
    assert args.scorers.colocated.batch.max_batch_size == args.scorers.pickscore.batch.max_batch_size == 1


def test_the_cpu_accounting_shares_add_up_to_the_whole_machine():
    before = {"processes": {"ray::ServeReplica:sceneref:Scoring": 10.0}, "busy": 100.0, "idle": 50.0}
    after = {"processes": {"ray::ServeReplica:sceneref:Scoring": 25.0, "ray::ProxyActor": 1.0}, "busy": 118.0, "idle": 52.0}
    shares = serving.cpu_share(before, after)
    assert shares["ray::ServeReplica:sceneref:Scoring"] == pytest.approx(0.75)
    assert shares["ray::ProxyActor"] == pytest.approx(0.05) and shares["idle"] == pytest.approx(0.1)
    assert sum(shares.values()) == pytest.approx(1.0)
    snapshot = serving.cpu_snapshot(__import__("os").getpid())
    assert snapshot["busy"] > 0 and any("python" in title for title in snapshot["processes"])
