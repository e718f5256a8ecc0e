"""Finding weights: local files first, the network only when allowed, and errors that say how to provide them."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from .base import ModelNotFoundError, RandomWeightsError
from .tensors import CropTransform

_TRUE = {"1", "true", "yes", "on"}
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set: never touch the network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hf_home() -> str:
    return os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))


def how_to_provide(source: str, option: str) -> str:
    return (
        f"Provide it one of these ways: pass {option}= a local directory saved with save_pretrained(); "
        f"or on a machine with internet run `hf download {source}` and copy the cache to this machine's HF_HOME "
        f"(now {hf_home()}); with HF_HUB_OFFLINE=1 only local files are used."
    )


def from_pretrained(loader: Callable[..., Any], source: str | os.PathLike, what: str, option: str, **kwargs: Any) -> Any:
    """loader(source, local_files_only=True), then, unless offline or source is a local path, with the network."""
    source = str(source)
    try:
        return loader(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        error = exc
    if not offline() and not Path(source).exists():
        try:
            return loader(source, **kwargs)
        except (OSError, ValueError) as exc:
            error = exc
    where = "local directory" if Path(source).exists() else "Hugging Face id"
    raise ModelNotFoundError(
        f"{what} not found: {where} {source!r} ({type(error).__name__}: {error}). {how_to_provide(source, option)}"
    ) from error


def pil_image_processor_kwargs() -> dict[str, Any]:
    """Ask for the PIL image processors the references ran on (transformers 5 defaults to torchvision ones)."""
    return {"backend": "pil"} if TRANSFORMERS_5 else {"use_fast": False}


def trained_model(loader: Callable[..., Any], source: str | os.PathLike, what: str, allow_random_weights: bool) -> Any:
    """A transformers model whose every weight came from its checkpoint.

    from_pretrained initialises any weight its checkpoint lacks at random and only logs it (a checkpoint of
    another architecture, a truncated file), and the scores would be noise presented as measurements: that is
    refused unless allow_random_weights=True says it is wanted.
    """
    model, info = from_pretrained(loader, source, what, "model", output_loading_info=True)
    missing = sorted(set(info.get("missing_keys") or ()) | {str(k[0]) if isinstance(k, tuple) else str(k)
                                                           for k in info.get("mismatched_keys") or ()})
    if missing and not allow_random_weights:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RandomWeightsError(
            f"{what} {str(source)!r}: the checkpoint lacks {len(missing)} of the model's weights ({shown}), which would be random "
            "and make every score meaningless. Give a complete checkpoint for this architecture, or set "
            "allow_random_weights=True (allow_random_weights: true in the config) if random weights are wanted."
        )
    return model


class ImageProcessorPixels:
    """The pixel functions of a scorer whose images go through a transformers image processor
    (`self.image_processor`, a PIL one): PickScore and Consistency share them, so both paths
    (PIL and tensor) preprocess exactly alike in both."""

    image_processor: Any

    def _pixels(self, image) -> torch.Tensor:
        return self.image_processor(images=[image], return_tensors="pt").pixel_values

    @cached_property
    def tensor_transform(self) -> CropTransform:
        """The tensor path's preprocessing, from the same image processor the PIL path uses."""
        return CropTransform.from_hf(self.image_processor)

    def _tensor_pixels(self, image: torch.Tensor) -> torch.Tensor:
        return self.tensor_transform(image).unsqueeze(0)
