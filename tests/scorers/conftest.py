"""Tiny real-class models built once per session; no network, no Ray."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import scorers  # noqa: E402
from scorers.tiny import build_tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AESTHETIC_HEAD = Path(
    os.environ.get("SCENEREF_AESTHETIC_HEAD", REPO / "../shared/data/aesthetic/sac+logos+ava1-l14-linearMSE.pth")
)


@pytest.fixture(scope="session")
def tiny_options(tmp_path_factory):
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_scorers(tiny_options):
    """Scorer name -> scorer, loaded on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = scorers.load_scorer(name, **tiny_options[name], device="cpu", dtype="fp32")
        return cache[name]

    return get


def picture(seed: int, size=(96, 64)) -> Image.Image:
    """A small RGB image with structure (a gradient plus noise), different per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * rng.uniform(0.2, 1.0, 3)
    noise = rng.integers(0, 80, (h, w, 3))
    return Image.fromarray(np.clip(grad + noise, 0, 255).astype(np.uint8))


@pytest.fixture
def make_picture():
    return picture


@pytest.fixture
def images():
    return [picture(1), picture(2, (64, 96)), picture(3, (128, 72))]


@pytest.fixture
def prompts():
    return ["a red bicycle leaning on a brick wall", "two dogs running on a beach at sunset", "a city street in the rain"]


@pytest.fixture
def long_prompt():
    """More than 77 CLIP tokens."""
    return " ".join(["a very detailed cinematic photograph of a lighthouse"] * 12)


@pytest.fixture
def aesthetic_head_path():
    if not AESTHETIC_HEAD.is_file():
        pytest.skip(f"real aesthetic head sac+logos+ava1-l14-linearMSE.pth not found at {AESTHETIC_HEAD} "
                    "(set SCENEREF_AESTHETIC_HEAD)")
    return AESTHETIC_HEAD
