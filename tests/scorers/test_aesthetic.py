"""Aesthetic predictor: the real LAION head file and the tiny scorer against a hand-written MLP."""

import json

import open_clip
import pytest
import torch

from scorers import ModelNotFoundError, aesthetic, load_scorer
from scorers.aesthetic import load_head


def mlp_by_hand(state: dict, x: torch.Tensor) -> torch.Tensor:
    """simple_inference.py's MLP at inference (dropout off): five linear layers, no activations."""
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x[:, 0]


def test_real_head_file(aesthetic_head_path):
    state = torch.load(aesthetic_head_path, map_location="cpu", weights_only=True)
    head = load_head(aesthetic_head_path, device="cpu")
    assert head.input_size == 768 and not head.training
    torch.manual_seed(0)
    emb = torch.randn(4, 768)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(head(emb)[:, 0], mlp_by_hand(state, emb), atol=1e-5, rtol=1e-5)


def test_real_head_via_default_name_and_env(aesthetic_head_path, monkeypatch):
    monkeypatch.setenv(aesthetic.HEAD_ENV, str(aesthetic_head_path))
    assert aesthetic.resolve_head_path() == aesthetic_head_path


def test_matches_reference_pipeline(tiny_scorers, tiny_options, images):
    options = tiny_options["aesthetic"]
    config = json.loads(open(options["model"]).read())
    model = open_clip.CLIP(**config).eval()
    open_clip.load_checkpoint(model, options["pretrained"])
    state = torch.load(options["head"], map_location="cpu", weights_only=True)
    preprocess = tiny_scorers("aesthetic").clip.preprocess
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        expected = mlp_by_hand(state, emb).tolist()
    out = tiny_scorers("aesthetic").score(images, ["ignored"] * len(images))
    for o, e in zip(out, expected):
        assert o.raw == pytest.approx(e, abs=1e-5)
        assert o.score == pytest.approx(100 * min(max((e - 1) / 9, 0), 1), abs=1e-4)


def test_defaults():
    assert aesthetic.DEFAULT_MODEL == "ViT-L-14-quickgelu" and aesthetic.DEFAULT_PRETRAINED == "openai"
    assert aesthetic.DEFAULT_HEAD == "sac+logos+ava1-l14-linearMSE.pth"


def test_missing_head_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(aesthetic.HEAD_ENV, raising=False)
    with pytest.raises(ModelNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth.*SCENEREF_AESTHETIC_HEAD"):
        load_scorer("aesthetic", device="cpu")
    with pytest.raises(ModelNotFoundError, match="head.pth"):
        load_scorer("aesthetic", head=str(tmp_path / "head.pth"), device="cpu")


def test_head_and_model_dims_must_match(tiny_options, aesthetic_head_path):
    options = dict(tiny_options["aesthetic"], head=str(aesthetic_head_path))
    with pytest.raises(ValueError, match="768"):
        load_scorer("aesthetic", **options, device="cpu")


def test_normalisation():
    assert aesthetic.normalise(1.0) == 0.0 and aesthetic.normalise(10.0) == 100.0
    assert aesthetic.normalise(5.5) == pytest.approx(50.0)
    assert aesthetic.normalise(-3.0) == 0.0 and aesthetic.normalise(12.0) == 100.0
