"""The scorer registry is the one catalogue: load_scorer, the settings' defaults, `models fetch`, the
tiny-model builder and the sizing table all read it. A sixth scorer, registered only inside a test,
is loaded, fetched, built and sized without touching any of them."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPModel

import scorers
from cluster import sizing
from pipeline.settings import ScorerWeights, ScoringSettings
from scorers import fetch, registry
from scorers.base import ScoreOutput, Scorer, features, resolve_device, resolve_dtype
from scorers.hub import ImageProcessorPixels, pil_image_processor_kwargs
from scorers.options import ScorerOptions
from scorers.tiny import build_tiny_models, load_shapes

NAME = "clipcosine"
DEFAULT_MODEL, DEFAULT_PROCESSOR = "fake/clip-cosine", "fake/clip-cosine-processor"


class ClipCosine(ImageProcessorPixels, Scorer):
    """A sixth text-image scorer: 100 x the cosine of a transformers CLIP's embeddings. It is all the
    code a new scorer brings; it reuses the CLIP-processor helper the built-in scorers share."""

    name = NAME

    def __init__(self, model=DEFAULT_MODEL, processor=DEFAULT_PROCESSOR, calibration=None, device="auto", dtype="auto",
                 allow_random_weights=False):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = CLIPModel.from_pretrained(model).to(self.device, self.dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.image_processor = AutoImageProcessor.from_pretrained(processor, **pil_image_processor_kwargs())

    def _score(self, images, prompts):
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_emb = features(self.model.get_image_features(pixel_values=self.pixel_batch(images, self._pixels, self._tensor_pixels)))
        text_emb = features(self.model.get_text_features(**text.to(self.device)))
        cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float()).tolist()
        return [ScoreOutput(raw=c, score=100 * max(c, 0.0), truncated=False) for c in cos]


class ClipCosineOptions(ScorerOptions):
    """Its typed settings, in its own module like its class."""

    model: str = DEFAULT_MODEL
    processor: str = DEFAULT_PROCESSOR
    calibration: str | None = None


def count_clipcosine() -> int:
    """The production architecture's parameters, counted on the meta device like the built-in counters."""
    config = CLIPConfig(text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "patch_size": 16, "image_size": 64})
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


SIXTH = registry.ScorerEntry(
    name=NAME, cls=f"{__name__}:ClipCosine", kind=registry.TEXT_IMAGE, deployment="ClipCosine",
    defaults={"model": DEFAULT_MODEL, "processor": DEFAULT_PROCESSOR, "calibration": None},
    options=f"{__name__}:ClipCosineOptions", weight=0.0,
    shape="pickscore",  # a CLIPModel of PickScore's shapes is this scorer's stand-in too
    fetch=(("model", "model"), ("processor", "config"), ("calibration", "file")),
    tiny=registry.TinyRecipe("scorers.tiny:_build_pickscore", {"model": "model", "processor": "processor"}),
    activation_gb=0.125, parameters=f"{__name__}:count_clipcosine",
)


@pytest.fixture
def sixth():
    with registry.registered(SIXTH) as entry:
        yield entry
    assert NAME not in registry.names()


def test_a_sixth_scorer_is_loaded_fetched_built_and_sized_from_its_registry_entry_alone(sixth, tiny_options, images, tmp_path):
    assert registry.get(NAME) is sixth and registry.names(registry.TEXT_IMAGE)[-1] == NAME
    assert sixth.options_model()().model_dump(exclude={"device", "dtype", "allow_random_weights"}) == dict(sixth.defaults)

    # models fetch: the entry's roles, including a file option the generic reading would not know.
    options = {**sixth.defaults, "calibration": str(tmp_path / "calibration.json")}
    work = fetch.plan({NAME: options})
    assert work.repos[DEFAULT_MODEL].roles == {"model"} and work.repos[DEFAULT_PROCESSOR].roles == {"config"}
    assert [(need.scorer, need.option, need.path) for need in work.files] == [(NAME, "calibration", options["calibration"])]

    # The tiny builder: beside the five built-in stand-ins (built already in this folder: reused), the sixth.
    root = Path(tiny_options["pickscore"]["model"]).parents[1]
    built = build_tiny_models(root)
    assert set(built) == {*tiny_options, NAME}
    assert built[NAME] == {"model": str(root / NAME / "model"), "processor": str(root / NAME / "processor")}

    # load_scorer: the entry's class, with the built stand-in.
    scorer = scorers.load_scorer(NAME, **built[NAME], device="cpu", dtype="fp32")
    assert type(scorer) is ClipCosine
    [out] = scorer.score(images[:1], ["a gradient"])
    assert math.isfinite(out.raw) and 0 <= out.score <= 100

    # The sizing table: counted by the entry's counter, its allowance in the need.
    assert NAME in [entry.name for entry in sizing.sized()]
    params = sixth.count_parameters()
    assert params == count_clipcosine() > 0
    assert sizing.need_gb(params, NAME) == pytest.approx(params * 2 / 1e9 + 0.125 + sizing.CUDA_CONTEXT_GB)


def test_before_registration_and_after_removal_nothing_knows_the_sixth_scorer(tiny_options):
    with pytest.raises(ValueError, match=f"unknown scorer '{NAME}': choose one of pickscore, clipscore"):
        scorers.load_scorer(NAME)
    # Without its entry, fetch reads the options generically: the calibration file is not its business.
    assert fetch.plan({NAME: {**SIXTH.defaults, "calibration": "/models/calibration.json"}}).files == []
    with pytest.raises(ValueError, match="no activation allowance|unknown scorer"):
        sizing.need_gb(1, NAME)
    remove = registry.register(SIXTH)
    with pytest.raises(ValueError, match="registered already"):
        registry.register(SIXTH)
    remove()
    assert NAME not in registry.names() and NAME not in build_tiny_models(Path(tiny_options["pickscore"]["model"]).parents[1])


def test_the_catalogue_is_the_five_scorers_in_order_of_kind():
    assert registry.names() == ("pickscore", "clipscore", "vqascore", "aesthetic", "consistency")
    assert scorers.SCORER_NAMES == registry.names(registry.TEXT_IMAGE) == ("pickscore", "clipscore", "vqascore", "aesthetic")
    assert scorers.IMAGE_SCORER_NAMES == registry.names(registry.IMAGE_IMAGE) == ("consistency",)
    assert [e.deployment for e in registry.entries()] == ["PickScore", "CLIPScore", "VQAScore", "Aesthetic", "Consistency"]
    with pytest.raises(ValueError, match="unknown scorer 'pikscore'"):
        registry.get("pikscore")


@pytest.mark.parametrize("name", registry.names())
def test_each_entry_is_what_its_class_its_settings_and_the_sizing_read(name):
    """The defaults are written once: the class's keyword defaults, the settings' option defaults
    and the default weight all come from the entry."""
    entry = registry.get(name)
    cls = entry.load_class()
    assert cls.name == name and issubclass(cls, Scorer)
    parameters = inspect.signature(cls.__init__).parameters
    assert {key: parameters[key].default for key in entry.defaults} == dict(entry.defaults)
    assert set(parameters) - {"self"} == set(entry.defaults) | {"device", "dtype", "allow_random_weights"}
    settings = getattr(ScoringSettings(), name)
    assert type(settings) is entry.options_model()
    assert {key: getattr(settings, key) for key in entry.defaults} == dict(entry.defaults)
    assert getattr(ScorerWeights(), name) == entry.weight
    assert (entry.activation_gb is None) == (entry.kind == registry.IMAGE_IMAGE)  # one GPU set: the text-image four
    assert entry.tiny is not None and entry.shape in load_shapes("tiny") and entry.shape in load_shapes("real")
