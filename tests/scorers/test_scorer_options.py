"""Typed scorer options: misspelt keys and random weights are refused when the config is read,
every config the project ships still validates, and the scorers themselves refuse random
open_clip weights unless asked for them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.settings import SCORER_NAMES, PipelineSettings, ScoringSettings
from scorers import RandomWeightsError, load_scorer

REPO = Path(__file__).resolve().parents[2]


def test_a_misspelt_option_is_refused_naming_the_field():
    """Before: the options were a plain dict, so `pretrainde` passed and the scorer failed (or
    silently used its default) only inside a replica."""
    with pytest.raises(ValidationError) as caught:
        ScoringSettings.model_validate({"clipscore": {"model": "ViT-B-32-quickgelu", "pretrainde": "openai"}})
    assert "clipscore.pretrainde" in str(caught.value) and "Extra inputs are not permitted" in str(caught.value)
    with pytest.raises(ValidationError, match="vqascore.answer"):
        ScoringSettings.model_validate({"vqascore": {"answer": ""}})
    with pytest.raises(ValidationError, match="unknown dtype 'f16'"):
        ScoringSettings.model_validate({"pickscore": {"dtype": "f16"}})


@pytest.mark.parametrize("name", ["clipscore", "aesthetic"])
def test_random_open_clip_weights_are_refused_in_the_config_unless_asked_for(name):
    """Before: `pretrained: null` built an untrained model with a log line and the service
    reported its noise as scores."""
    with pytest.raises(ValidationError, match=f"{name}\n.*pretrained is null.*allow_random_weights: true"):
        ScoringSettings.model_validate({name: {"pretrained": None}})
    allowed = ScoringSettings.model_validate({name: {"pretrained": None, "allow_random_weights": True}})
    assert allowed.options_for(name)["pretrained"] is None and allowed.options_for(name)["allow_random_weights"]
    # A hf-hub:/local-dir: model carries its own weights: nothing to allow.
    ScoringSettings.model_validate({name: {"model": "local-dir:/models/clip", "pretrained": None}})


@pytest.mark.parametrize("name", ["clipscore", "aesthetic"])
def test_the_scorer_itself_refuses_random_weights_unless_asked_for(name, tiny_options):
    options = {**tiny_options[name], "pretrained": None}
    with pytest.raises(RandomWeightsError, match="allow_random_weights"):
        load_scorer(name, **options, device="cpu")
    with pytest.warns(UserWarning, match="random weights"):
        scorer = load_scorer(name, **options, allow_random_weights=True, device="cpu")
    assert scorer.clip is not None


def test_options_for_passes_only_what_the_config_sets_over_the_shared_device():
    scoring = ScoringSettings.model_validate(
        {"device": "cpu", "dtype": "float32", "aesthetic": {"head": "/models/head.pth", "dtype": "fp16"}}
    )
    assert scoring.options_for("pickscore") == {"device": "cpu", "dtype": "float32"}
    assert scoring.options_for("aesthetic") == {"head": "/models/head.pth", "device": "cpu", "dtype": "fp16"}


def test_every_shipped_config_and_the_tiny_models_validate(tiny_options):
    for path in sorted(REPO.glob("serve_config*.yaml")):
        for app in yaml.safe_load(path.read_text())["applications"]:
            scoring = app["args"].get("pipeline", {}).get("scoring", {})
            ScoringSettings.model_validate(scoring)  # raises on any config the project ships
    production = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    assert ScoringSettings.model_validate(production["pipeline"]["scoring"]).options_for("clipscore")["pretrained"] == "openai"
    # The offline demo's models are saved checkpoints: valid options, no allow_random_weights.
    scoring = ScoringSettings.model_validate(tiny_options)
    for name in SCORER_NAMES:
        assert scoring.options_for(name) == {**tiny_options[name], "device": "auto", "dtype": "auto"}
    PipelineSettings.offline()


def test_the_settings_defaults_are_the_scorers_own():
    """Model ids are settings; the scorer classes keep the same defaults for library use."""
    from scorers.aesthetic import Aesthetic
    from scorers.clipscore import ClipScore
    from scorers.pickscore import PickScore
    from scorers.vqascore import VQAScore

    classes = {"pickscore": PickScore, "clipscore": ClipScore, "vqascore": VQAScore, "aesthetic": Aesthetic}
    for name, cls in classes.items():
        fields = type(getattr(ScoringSettings(), name)).model_fields
        parameters = inspect.signature(cls.__init__).parameters
        assert set(fields) == set(parameters) - {"self"}, name
        for field, info in fields.items():
            if field not in ("device", "dtype"):
                assert info.default == parameters[field].default, (name, field)


def test_the_settings_know_the_scorers_dtypes():
    from pipeline.settings import DTYPES
    from scorers.base import _DTYPES

    assert set(DTYPES) == set(_DTYPES) | {"auto"}


def _without_a_norm_weight(folder: Path, target: Path) -> Path:
    """A copy of a saved transformers model whose checkpoint lacks one layer-norm weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, target)
    [checkpoint] = target.glob("*.safetensors")
    state = load_file(checkpoint)
    dropped = sorted(key for key in state if key.endswith("norm.weight"))[-1]
    save_file({key: value for key, value in state.items() if key != dropped}, str(checkpoint), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("name", ["pickscore", "vqascore"])
def test_an_incomplete_checkpoint_is_refused_unless_asked_for(name, tiny_options, tmp_path):
    """Before: from_pretrained filled the missing weight at random with only a log line."""
    folder = Path(tiny_options[name]["model"])
    options = {**tiny_options[name], "model": str(_without_a_norm_weight(folder, tmp_path / name))}
    if name == "vqascore":
        options["processor"] = str(folder)
    with pytest.raises(RandomWeightsError, match="lacks 1 of the model.s weights .*allow_random_weights"):
        load_scorer(name, **options, device="cpu")
    scorer = load_scorer(name, **options, allow_random_weights=True, device="cpu")
    assert scorer.model is not None
