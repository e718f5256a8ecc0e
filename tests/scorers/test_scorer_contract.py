"""What the rest of the project relies on, for all four scorers."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from PIL import Image

import scorers
from scorers import ImageError, ModelNotFoundError, ScoreOutput, load_scorer
from scorers.base import resolve_device, resolve_dtype
from scorers.tiny import build_tiny_models

NAMES = ["pickscore", "clipscore", "vqascore", "aesthetic"]


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_one_at_a_time(tiny_scorers, name, images, prompts):
    scorer = tiny_scorers(name)
    batch = scorer.score(images, prompts)
    single = [scorer.score([im], [p])[0] for im, p in zip(images, prompts)]
    assert scorer.name == name and len(batch) == len(images)
    for b, s in zip(batch, single):
        assert isinstance(b, ScoreOutput)
        assert b.raw == pytest.approx(s.raw, rel=1e-4, abs=1e-5)
        assert b.score == pytest.approx(s.score, rel=1e-4, abs=1e-4)
        assert b.truncated == s.truncated
        assert 0.0 <= b.score <= 100.0


@pytest.mark.parametrize("name", NAMES)
def test_any_image_mode_is_scored_as_its_rgb(tiny_scorers, name, make_picture):
    rgb = make_picture(7, (80, 48))
    rgba = rgb.convert("RGBA")
    grey = rgb.convert("L")
    out = tiny_scorers(name).score([rgb, rgba, grey, grey.convert("RGB")], ["a scene"] * 4)
    assert out[0].raw == pytest.approx(out[1].raw, abs=1e-5)  # opaque alpha changes nothing
    assert out[2].raw == pytest.approx(out[3].raw, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_scores_a_demo_sized_image(tiny_scorers, name, make_picture):
    [out] = tiny_scorers(name).score([make_picture(9, (512, 288))], ["a lighthouse at dusk"])
    assert 0.0 <= out.score <= 100.0


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(tiny_scorers, name, images):
    scorer = tiny_scorers(name)
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, ["only one"])
    with pytest.raises(ImageError):
        scorer.score([Image.new("RGB", (1, 1))], ["tiny"])


@pytest.mark.parametrize("name", NAMES)
def test_auto_device_and_dtype_accepted(tiny_options, name):
    scorer = load_scorer(name, **tiny_options[name], device="auto", dtype="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert scorer.device.type == expected
    if expected == "cpu":
        assert scorer.dtype == torch.float32


def test_resolve_dtype():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("auto", gpu) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype(torch.float16, cpu) == torch.float16
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)


def test_score_output_is_a_frozen_dataclass():
    out = ScoreOutput(raw=1.0, score=50.0, truncated=False)
    assert [f.name for f in dataclasses.fields(ScoreOutput)] == ["raw", "score", "truncated"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.score = 1.0


def test_public_names():
    for name in ("load_scorer", "ScoreOutput", "ModelNotFoundError", "ImageError", "open_image"):
        assert hasattr(scorers, name)
    assert issubclass(ModelNotFoundError, RuntimeError) and issubclass(ImageError, ValueError)
    assert list(inspect.signature(scorers.Scorer.score).parameters) == ["self", "images", "prompts"]


def test_unknown_scorer():
    with pytest.raises(ValueError, match="pickscore"):
        load_scorer("nope")


def test_missing_hf_model_names_id_and_how(tiny_options):
    with pytest.raises(ModelNotFoundError, match="(?s)yuvalkirstain/PickScore_v1.*save_pretrained.*HF_HOME"):
        load_scorer("pickscore", processor=tiny_options["pickscore"]["processor"], device="cpu")


def test_missing_local_directory_names_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        load_scorer("pickscore", model=str(missing), device="cpu")


def test_tiny_build_is_idempotent(tiny_options):
    root = tiny_options["pickscore"]["model"].split("/pickscore/")[0]
    before = {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()}
    assert build_tiny_models(Path(root)) == tiny_options
    assert {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()} == before
