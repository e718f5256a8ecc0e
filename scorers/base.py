"""What every scorer shares: the result type, the errors, device/dtype choice and the batch contract."""

from __future__ import annotations

import abc
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence, TypeVar

import torch
from PIL import Image

from .images import to_rgb

CLIP_CONTEXT_LENGTH = 77
T = TypeVar("T")


@dataclass(frozen=True)
class ScoreOutput:
    """One image's score.

    raw: the reference implementation's number (see each scorer for its scale).
    score: raw mapped onto 0-100 by the scorer's documented normalisation.
    truncated: the prompt was longer than the text encoder takes (77 CLIP tokens) and was cut.
    """

    raw: float
    score: float
    truncated: bool


class ModelNotFoundError(RuntimeError):
    """Weights or configs that could not be found locally (and not downloaded)."""


class RandomWeightsError(ModelNotFoundError):
    """No trained weights were named, so the model would be built with random ones and every score would be
    noise presented as a measurement."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, gpu_auto: torch.dtype = torch.float16) -> torch.dtype:
    """"auto" is half precision (gpu_auto) on a GPU and fp32 on a CPU, where half precision is slow or unsupported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return gpu_auto if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use 'auto', 'fp32', 'fp16' or 'bf16'") from None


def clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def features(output) -> torch.Tensor:
    """Embeddings from transformers' get_*_features: a tensor before v5, an output object (.pooler_output) from v5."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="scorers-preprocess")


def map_images(fn: Callable[[Image.Image], T], images: Sequence[Image.Image]) -> list[T]:
    """fn over images in worker threads (PIL resizes release the GIL).

    On a GPU the forward pass of a small model takes milliseconds while PIL preprocessing takes a few per image,
    so preprocessing one image after another would dominate a batch.
    """
    if len(images) < 2 or (os.cpu_count() or 1) < 2:
        return [fn(image) for image in images]
    return list(_pool().map(fn, images))


class Scorer(abc.ABC):
    """A quality model. score() is synchronous and CPU/GPU heavy: call it from a worker thread.

    The caller chooses batch sizes; a batch gives the same numbers as one image at a time.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[ScoreOutput]:
        """Score images[i] against prompts[i]; images of any mode are converted to RGB (or rejected: ImageError)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        if not images:
            return []
        rgb = [to_rgb(image) for image in images]
        with torch.inference_mode():
            return self._score(rgb, [str(p) for p in prompts])

    @abc.abstractmethod
    def _score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreOutput]:
        """Score RGB images, inside inference mode."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device} {self.dtype}>"
