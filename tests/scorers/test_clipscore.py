"""CLIP-Score against clipscore.py's formula, computed by hand with an independently built open_clip model."""

import inspect
import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torchvision import transforms

from scorers import ModelNotFoundError, clipscore, load_scorer
from scorers.openclip import _register


def clipscore_reference(model, images, prompts, size):
    """clipscore.py: CLIP preprocessing, 'A photo depicts ' prefix, normalised embeddings, 2.5 * max(cos, 0)."""
    preprocess = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(open_clip.tokenize(["A photo depicts " + p for p in prompts]))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    cos = (img * txt).sum(-1)
    return cos.tolist(), (2.5 * cos.clamp(min=0)).tolist()


def raw_model(options):
    config = json.loads(open(options["model"]).read())
    model = open_clip.CLIP(**config).eval()
    open_clip.load_checkpoint(model, options["pretrained"])
    return model, config


def test_matches_reference_formula(tiny_scorers, tiny_options, images, prompts):
    model, config = raw_model(tiny_options["clipscore"])
    cos, clip_s = clipscore_reference(model, images, prompts, config["vision_cfg"]["image_size"])
    out = tiny_scorers("clipscore").score(images, prompts)
    for o, c, s in zip(out, cos, clip_s):
        assert o.raw == pytest.approx(c, abs=1e-5)
        assert o.score == pytest.approx(100 * min(s, 1.0), abs=1e-3)


def test_local_dir_and_dict_config_load_the_same_model(tiny_scorers, tiny_options, images, prompts):
    folder = tiny_options["clipscore"]["model"].rsplit("/", 1)[0]
    config = json.loads(open(tiny_options["clipscore"]["model"]).read())
    expected = [o.raw for o in tiny_scorers("clipscore").score(images, prompts)]
    for options in ({"model": f"local-dir:{folder}"}, {"model": config, "pretrained": tiny_options["clipscore"]["pretrained"]}):
        scorer = load_scorer("clipscore", **options, device="cpu", dtype="fp32")
        assert [o.raw for o in scorer.score(images, prompts)] == pytest.approx(expected, abs=1e-6)


def test_truncation_flag(tiny_scorers, images, long_prompt, prompts):
    out = tiny_scorers("clipscore").score(images[:2], [long_prompt, prompts[0]])
    assert [o.truncated for o in out] == [True, False]


def test_default_is_quickgelu_openai():
    assert clipscore.DEFAULT_MODEL == "ViT-B-32-quickgelu" and clipscore.DEFAULT_PRETRAINED == "openai"
    defaults = inspect.signature(clipscore.ClipScore).parameters
    assert defaults["model"].default == "ViT-B-32-quickgelu" and defaults["pretrained"].default == "openai"
    assert open_clip.get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True
    assert open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai").get("quick_gelu") is True


def test_tiny_model_uses_quickgelu(tiny_scorers):
    assert isinstance(tiny_scorers("clipscore").clip.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_gelu_architecture_with_openai_weights_warns():
    with pytest.warns(UserWarning, match="quick_gelu"), pytest.raises(ModelNotFoundError):
        load_scorer("clipscore", model="ViT-B-32", pretrained="openai", device="cpu")


def test_missing_weights_offline():
    with pytest.raises(ModelNotFoundError, match="(?s)ViT-B-32-quickgelu.*openai.*HF_HOME"):
        load_scorer("clipscore", device="cpu")


def test_missing_checkpoint_file(tiny_options, tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.safetensors"):
        load_scorer("clipscore", model=tiny_options["clipscore"]["model"], pretrained=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelNotFoundError, match="missing.json"):
        load_scorer("clipscore", model=str(tmp_path / "missing.json"))


def test_unknown_architecture_and_missing_local_dir(tmp_path):
    with pytest.raises(ModelNotFoundError, match="ViT-Nope"):
        load_scorer("clipscore", model="ViT-Nope", device="cpu")
    with pytest.raises(ModelNotFoundError, match="absent"):
        load_scorer("clipscore", model=f"local-dir:{tmp_path / 'absent'}", device="cpu")


def test_config_registration_is_content_addressed(tiny_options):
    config = json.loads(open(tiny_options["clipscore"]["model"]).read())
    assert _register(config) == _register(tiny_options["clipscore"]["model"]) == _register(dict(config))


def test_normalisation():
    assert clipscore.normalise(-0.3) == 0.0
    assert clipscore.normalise(0.2) == pytest.approx(50.0)
    assert clipscore.normalise(0.4) == pytest.approx(100.0) and clipscore.normalise(0.9) == 100.0
