"""PickScore against the README formula computed by hand from the raw CLIPModel and a hand-written PIL pipeline."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from scorers import pickscore

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP preprocessing with PIL: shortest edge to size (bicubic), centre crop, /255, OpenAI mean/std."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    resized = image.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    crop = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(((crop - OPENAI_MEAN) / OPENAI_STD).transpose(2, 0, 1).astype(np.float32))


def test_uses_pil_image_processor(tiny_scorers, images):
    scorer = tiny_scorers("pickscore")
    assert "Fast" not in type(scorer.image_processor).__name__
    if hasattr(scorer.image_processor, "backend"):
        assert "pil" in str(scorer.image_processor.backend).lower()
    pixels = scorer.image_processor(images=images[:1], return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(pixels, reference_pixels(images[0], 64), atol=1e-5, rtol=0)


def test_matches_reference_formula(tiny_scorers, tiny_options, images, prompts):
    scorer = tiny_scorers("pickscore")
    model = CLIPModel.from_pretrained(tiny_options["pickscore"]["model"]).eval()
    tokenizer = scorer.tokenizer
    with torch.no_grad():
        pixels = torch.stack([reference_pixels(im, 64) for im in images])
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_emb = model.text_projection(model.text_model(**text).pooler_output)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * (text_emb * image_emb).sum(-1)).tolist()
    out = scorer.score(images, prompts)
    reference = tiny_options["pickscore"]["reference"]
    for o, e in zip(out, expected):
        assert o.raw == pytest.approx(e, abs=1e-4)
        assert o.score == pytest.approx(100 / (1 + math.exp(reference - e)), abs=1e-3)
        assert not o.truncated


def test_truncation_flag(tiny_scorers, images, long_prompt, prompts):
    out = tiny_scorers("pickscore").score(images[:2], [long_prompt, prompts[0]])
    assert [o.truncated for o in out] == [True, False]


def test_normalisation():
    assert pickscore.normalise(20.0, 20.0) == pytest.approx(50.0)
    assert pickscore.normalise(21.0, 20.0) == pytest.approx(100 / (1 + math.exp(-1)))
    assert pickscore.normalise(1e6) == pytest.approx(100.0) and pickscore.normalise(-1e6) == pytest.approx(0.0)
    assert pickscore.DEFAULT_REFERENCE == 20.0
