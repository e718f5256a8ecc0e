"""What every scorer shares: the result type, the errors, device/dtype choice and the batch contract."""

from __future__ import annotations

import abc
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence, TypeVar, Union

import torch
from PIL import Image

from .images import to_rgb
from .tensors import check_tensor

CLIP_CONTEXT_LENGTH = 77
T = TypeVar("T")
ImageInput = Union[Image.Image, torch.Tensor]
"""A PIL image (any mode; the reference path) or a uint8 RGB (3, H, W) tensor on any device (the
tensor path, preprocessed on the scorer's device: scorers.tensors)."""


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


# The one table of dtype names: the scorers resolve them, the settings validate against them.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = ("auto", *DTYPES)  # what a config may write: "auto" or a name of the table
_DTYPES = DTYPES


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, gpu_auto: torch.dtype = torch.float16) -> torch.dtype:
    """"auto" is half precision (gpu_auto) on a GPU and fp32 on a CPU, where half precision is slow or unsupported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return gpu_auto if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype.lower()]
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


def as_input(image: ImageInput) -> ImageInput:
    """A checked scorer input: tensors must be uint8 (3, H, W) (ValueError otherwise), PIL images
    become RGB through to_rgb exactly as before the tensor path existed."""
    if isinstance(image, torch.Tensor):
        return check_tensor(image)
    return to_rgb(image)


def has_tensors(images: Sequence[ImageInput]) -> bool:
    return any(isinstance(image, torch.Tensor) for image in images)


class Scorer(abc.ABC):
    """A quality model. score() is synchronous and CPU/GPU heavy: call it from a worker thread.

    The caller chooses batch sizes; a batch gives the same numbers as one image at a time.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def score(self, images: Sequence[ImageInput], prompts: Sequence[str]) -> list[ScoreOutput]:
        """Score images[i] against prompts[i]. PIL images of any mode are converted to RGB (or
        rejected: ImageError) and preprocessed as the reference does; uint8 RGB (3, H, W) tensors
        are moved to this scorer's device and preprocessed there (scorers.tensors); a batch may mix both."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        if not images:
            return []
        rgb = [as_input(image) for image in images]
        with torch.inference_mode():
            return self._score(rgb, [str(p) for p in prompts])

    @abc.abstractmethod
    def _score(self, images: list[ImageInput], prompts: list[str]) -> list[ScoreOutput]:
        """Score RGB images (PIL, or checked uint8 tensors), inside inference mode."""

    def pixel_batch(
        self,
        images: list[ImageInput],
        pil_pixels: Callable[[Image.Image], torch.Tensor],
        tensor_pixels: Callable[[torch.Tensor], torch.Tensor],
        join: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat,
    ) -> torch.Tensor:
        """The model's pixel batch on this scorer's device and dtype. All-PIL batches take exactly
        the reference code (preprocessed in threads, joined on the CPU, then moved); tensors are
        moved to the device first (non_blocking) and preprocessed there by tensor_pixels."""
        if not has_tensors(images):
            return join(map_images(pil_pixels, images)).to(self.device, self.dtype)
        parts: list[torch.Tensor | None] = [None] * len(images)
        pil = [i for i, image in enumerate(images) if not isinstance(image, torch.Tensor)]
        for i, pixels in zip(pil, map_images(pil_pixels, [images[i] for i in pil])):
            parts[i] = pixels.to(self.device)
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                parts[i] = tensor_pixels(image.to(self.device, non_blocking=True))
        return join(parts).to(self.device, self.dtype)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.device} {self.dtype}>"
