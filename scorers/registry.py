"""The scorer catalogue, written once as data: every scorer's name, class, kind, default options and
what the tools around it need (fetch roles, tiny-model recipe, sizing allowance).

Everything that lists the scorers reads this module instead of keeping its own copy: `load_scorer`,
the settings' options and weights (scorers.options, pipeline.settings), `models fetch`
(scorers.fetch), the tiny-model builder (scorers.tiny) and the GPU sizing table (cluster.sizing).
Adding a scorer means one `ScorerEntry` here and the scorer's own module; nothing else.

The deployment side (deployments/) reads the same entries: `entries()` in order, `get(name)`;
per entry `deployment` is the Serve deployment's name, `kind` tells a text-image scorer (one
prompt per image) from an image-image one (one reference image per image), `options_model()` the
typed options and `weight` the default selection weight. `names(kind)` lists one kind.

Classes and helpers are named by import path ("module:attribute") so that reading the catalogue
imports no model library; `resolve()` imports one when it is used.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping

TEXT_IMAGE = "text-image"  # score(images, prompts)
IMAGE_IMAGE = "image-image"  # score(images, references)
Kind = Literal["text-image", "image-image"]


def resolve(path: str) -> Any:
    """The object an import path "package.module:attribute" names."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class TinyRecipe:
    """How scorers.tiny builds a random-weight stand-in and which load_scorer options point into it.

    build: "module:function" called as build(directory, shape, dtype) with this scorer's section of a
    shapes file; files: option -> path inside the built folder ("." is the folder itself);
    from_shape: options copied from the shape section (PickScore's `reference`)."""

    build: str
    files: Mapping[str, str]
    from_shape: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScorerEntry:
    """One scorer. `defaults` are the class's keyword defaults besides device, dtype and
    allow_random_weights, the one place the default model ids are written."""

    name: str
    cls: str  # "module:Class", a scorers.base.Scorer
    kind: Kind
    deployment: str  # the Serve deployment's name
    defaults: Mapping[str, Any]
    options: str  # "module:Model", the pydantic model of its settings (scorers.options)
    weight: float = 0.0  # default weight in selection
    shape: str | None = None  # its section in scorers/shapes/*.json (real.json: the production architecture)
    fetch: tuple[tuple[str, str], ...] | None = None  # (option, role) pairs for scorers.fetch; None: read generically
    tiny: TinyRecipe | None = None
    activation_gb: float | None = None  # sizing allowance at the production batch size; None: not sized
    parameters: str | None = None  # "module:function" counting the production architecture's parameters

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        if self.shape is None:
            object.__setattr__(self, "shape", self.name)

    def load_class(self) -> type:
        return resolve(self.cls)

    def options_model(self) -> type:
        return resolve(self.options)

    def count_parameters(self) -> int:
        if self.parameters is None:
            raise ValueError(f"scorer {self.name!r} names no parameter counter")
        return resolve(self.parameters)()


_ENTRIES: dict[str, ScorerEntry] = {}


def register(entry: ScorerEntry) -> Callable[[], None]:
    """Add a scorer; returns the function that removes it again (for tests and plugins)."""
    if entry.name in _ENTRIES:
        raise ValueError(f"scorer {entry.name!r} is registered already")
    _ENTRIES[entry.name] = entry
    return lambda: _ENTRIES.pop(entry.name, None)


@contextmanager
def registered(entry: ScorerEntry) -> Iterator[ScorerEntry]:
    remove = register(entry)
    try:
        yield entry
    finally:
        remove()


def entries(kind: Kind | None = None) -> tuple[ScorerEntry, ...]:
    """The scorers in catalogue order, all or of one kind."""
    return tuple(e for e in _ENTRIES.values() if kind is None or e.kind == kind)


def names(kind: Kind | None = None) -> tuple[str, ...]:
    return tuple(e.name for e in entries(kind))


def get(name: str) -> ScorerEntry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}: choose one of {', '.join(_ENTRIES)}") from None


def defaults(name: str) -> Mapping[str, Any]:
    return get(name).defaults


_OPEN_CLIP_TINY = {"model": "open_clip_model_config.json", "pretrained": "open_clip_model.safetensors"}

for _entry in (
    ScorerEntry(
        name="pickscore", cls="scorers.pickscore:PickScore", kind=TEXT_IMAGE, deployment="PickScore",
        defaults={"model": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                  "reference": 20.0},
        options="scorers.options:PickScoreOptions", weight=0.50,
        fetch=(("model", "model"), ("processor", "config")),
        tiny=TinyRecipe("scorers.tiny:_build_pickscore", {"model": "model", "processor": "processor"}, ("reference",)),
        activation_gb=0.5, parameters="scorers.sizes:count_pickscore",
    ),
    ScorerEntry(
        name="clipscore", cls="scorers.clipscore:ClipScore", kind=TEXT_IMAGE, deployment="CLIPScore",
        defaults={"model": "ViT-B-32-quickgelu", "pretrained": "openai"},
        options="scorers.options:ClipScoreOptions", weight=0.25,
        fetch=(("model", "open_clip"),),
        tiny=TinyRecipe("scorers.tiny:_build_clipscore", _OPEN_CLIP_TINY),
        activation_gb=0.25, parameters="scorers.sizes:count_clipscore",
    ),
    ScorerEntry(
        name="vqascore", cls="scorers.vqascore:VQAScore", kind=TEXT_IMAGE, deployment="VQAScore",
        defaults={"model": "Qwen/Qwen2.5-VL-3B-Instruct", "processor": None,
                  "question": 'Does this figure show "{}"? Please answer yes or no.', "answer": "Yes"},
        options="scorers.options:VQAScoreOptions", weight=0.15,
        fetch=(("model", "model"), ("processor", "config")),
        tiny=TinyRecipe("scorers.tiny:_build_vqascore", {"model": "."}),
        activation_gb=3.0, parameters="scorers.sizes:count_vqascore",
    ),
    ScorerEntry(
        name="aesthetic", cls="scorers.aesthetic:Aesthetic", kind=TEXT_IMAGE, deployment="Aesthetic",
        defaults={"model": "ViT-L-14-quickgelu", "pretrained": "openai", "head": "sac+logos+ava1-l14-linearMSE.pth"},
        options="scorers.options:AestheticOptions", weight=0.10,
        fetch=(("model", "open_clip"), ("head", "file")),
        tiny=TinyRecipe("scorers.tiny:_build_aesthetic", {**_OPEN_CLIP_TINY, "head": "aesthetic_head.pth"}),
        activation_gb=0.5, parameters="scorers.sizes:count_aesthetic",
    ),
    # Image against reference image: reported always, weighted in selection only when its weight is set.
    ScorerEntry(
        name="consistency", cls="scorers.consistency:Consistency", kind=IMAGE_IMAGE, deployment="Consistency",
        defaults={"model": "facebook/dinov2-base", "processor": None},
        options="scorers.options:ConsistencyOptions", weight=0.0,
        tiny=TinyRecipe("scorers.tiny:_build_consistency", {"model": "."}),
    ),
):
    register(_entry)
del _entry

__all__ = [
    "IMAGE_IMAGE", "TEXT_IMAGE", "ScorerEntry", "TinyRecipe", "defaults", "entries", "get", "names", "register",
    "registered", "resolve",
]
