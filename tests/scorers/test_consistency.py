"""The consistency scorer against its formula computed independently: the raw
Dinov2Model on hand-written PIL preprocessing, the CLS token's cosine, 100 * clamp(cos, 0, 1)."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Model

from pipeline.settings import ScoringSettings
from scorers import ModelNotFoundError, RandomWeightsError, load_scorer
from scorers.consistency import Consistency, normalise

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
RESIZE, CROP = 64, 56  # the tiny shapes (scorers/shapes/tiny.json)


def reference_pixels(image: Image.Image) -> torch.Tensor:
    """DINOv2 preprocessing with PIL: shortest edge to RESIZE (bicubic), centre crop CROP, /255,
    ImageNet mean/std."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(RESIZE * long / short)
    resized = image.convert("RGB").resize((RESIZE, new_long) if w <= h else (new_long, RESIZE), Image.Resampling.BICUBIC)
    left, top = (resized.width - CROP) // 2, (resized.height - CROP) // 2
    crop = np.asarray(resized.crop((left, top, left + CROP, top + CROP)), dtype=np.float32) / 255.0
    return torch.from_numpy(((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32))


def expected_cosines(model_dir: str, images, references) -> list[float]:
    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():
        cls = model(pixel_values=torch.stack([reference_pixels(i) for i in images + references])).last_hidden_state[:, 0]
    a, b = cls[: len(images)].numpy(), cls[len(images):].numpy()
    return [float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]


def test_matches_the_formula_computed_independently(tiny_scorers, tiny_options, images, make_picture):
    scorer = tiny_scorers("consistency")
    references = [make_picture(11), images[0], make_picture(12, (80, 120))]
    expected = expected_cosines(tiny_options["consistency"]["model"], images, references)
    out = scorer.score(images, references)
    assert len(out) == 3
    for o, e in zip(out, expected):
        assert o.raw == pytest.approx(e, abs=1e-4)
        assert o.score == pytest.approx(100 * min(max(e, 0.0), 1.0), abs=1e-2)
        assert o.truncated is False
    assert out[1].raw < 0.9999  # a different image is not scored as the same one


def test_an_image_against_itself_is_100(tiny_scorers, images):
    [out] = tiny_scorers("consistency").score(images[:1], images[:1])
    assert out.raw == pytest.approx(1.0, abs=1e-5) and out.score == pytest.approx(100.0, abs=1e-3)


def test_a_batch_gives_the_numbers_of_one_pair_at_a_time(tiny_scorers, images, make_picture):
    scorer = tiny_scorers("consistency")
    references = [make_picture(21), make_picture(22), make_picture(23)]
    batch = scorer.score(images, references)
    single = [scorer.score([i], [r])[0] for i, r in zip(images, references)]
    for b, s in zip(batch, single):
        assert b.raw == pytest.approx(s.raw, abs=1e-5)


def test_one_reference_per_image_and_empty_batches(tiny_scorers, images):
    scorer = tiny_scorers("consistency")
    with pytest.raises(ValueError, match="one reference per image"):
        scorer.score(images, images[:1])
    assert scorer.score([], []) == []


def test_normalisation_bounds():
    assert normalise(-0.3) == 0.0 and normalise(0.42) == pytest.approx(42.0) and normalise(1.2) == 100.0


def test_a_missing_model_says_how_to_provide_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match="save_pretrained"):
        load_scorer("consistency", model=str(tmp_path / "nothing-here"), device="cpu")


def test_an_incomplete_checkpoint_is_refused(tiny_options, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / "dino"
    shutil.copytree(tiny_options["consistency"]["model"], target)
    [checkpoint] = target.glob("*.safetensors")
    state = load_file(checkpoint)
    dropped = sorted(k for k in state if k.endswith("layernorm.weight"))[-1]
    save_file({k: v for k, v in state.items() if k != dropped}, str(checkpoint), metadata={"format": "pt"})
    with pytest.raises(RandomWeightsError, match="lacks 1"):
        load_scorer("consistency", model=str(target), device="cpu")


def test_settings_defaults_are_the_scorers_own(tiny_options):
    """The model id is a setting; the class keeps the same default for library use."""
    fields = type(ScoringSettings().consistency).model_fields
    parameters = inspect.signature(Consistency.__init__).parameters
    assert set(fields) == set(parameters) - {"self"}
    for field, info in fields.items():
        if field not in ("device", "dtype"):
            assert info.default == parameters[field].default, field
    options = ScoringSettings.model_validate({"consistency": tiny_options["consistency"]}).options_for("consistency")
    assert options == {**tiny_options["consistency"], "device": "auto", "dtype": "auto"}
    assert Path(options["model"], "preprocessor_config.json").is_file()
