"""Loading a diffusers pipeline the one way, for real models and the tiny test one alike.

A Hugging Face id is first resolved to its folder in the HF cache (downloaded only when the
hub may be reached), then every model is loaded from that folder with
`DiffusionPipeline.from_pretrained`; text-to-image and image-to-image pipelines share the same
modules through `from_pipe`, so a replica holds one copy of the weights.

Neither diffusers nor transformers fails on a checkpoint that lacks some of a model's weights:
both initialise the gaps at random and only log it, and the images would be noise presented as
a model's work. `check_weights` compares each module with its checkpoint and refuses such a
pipeline unless `allow_random_weights` says it is wanted, as the scorers do (scorers.hub).
diffusers is imported inside the functions: processes that only read the settings (the
ingress) never pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scorers.base import DTYPES, ModelNotFoundError, RandomWeightsError
from scorers.hub import how_to_provide, offline

if TYPE_CHECKING:
    from pipeline.providers.diffusers.settings import DiffusionSettings

def pick_device(setting: str) -> str:
    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(setting: str, device: str) -> torch.dtype:
    """`auto`: float16 on a GPU (half the memory, the dtype these models are published in),
    float32 on CPU (where half precision is slow or unsupported)."""
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return DTYPES[setting]  # the one dtype table (scorers.base)


def resolve_model_dir(settings: "DiffusionSettings") -> Path:
    """The folder that holds the pipeline: a local directory as is, a hub id from the HF cache
    (or downloaded, unless HF_HUB_OFFLINE is set)."""
    from diffusers import DiffusionPipeline

    source = settings.model
    if Path(source).is_dir():
        return Path(source)
    options = {"revision": settings.revision, "variant": settings.variant}
    try:
        return Path(DiffusionPipeline.download(source, local_files_only=True, **options))
    except Exception as exc:  # huggingface_hub and diffusers raise several kinds for "not there"
        error = exc
    if not offline():
        try:
            return Path(DiffusionPipeline.download(source, **options))
        except Exception as exc:
            error = exc
    raise ModelNotFoundError(
        f"diffusion model not found: {source!r} ({type(error).__name__}: {error}). {how_to_provide(source, 'model')}"
    ) from error


def checkpoint_keys(folder: Path) -> set[str]:
    """Tensor names stored in a component's weight files (all variants and shards together;
    variants hold the same names). Safetensors headers only; .bin files memory-mapped."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            keys.update(weights.keys())
    if not keys:
        for path in folder.glob("*.bin"):
            keys.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())
    return keys


def missing_weights(module: torch.nn.Module, stored: set[str]) -> list[str]:
    """State-dict entries with no stored tensor. Tied weights (one Parameter under two names, as
    T5's shared embedding) count as stored when any of their names is."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names_by_tensor.setdefault(id(tensor), []).append(name)
    return sorted(names[0] for names in names_by_tensor.values() if not any(n in stored for n in names))


def check_weights(pipeline, folder: Path, allow_random_weights: bool) -> None:
    gaps: list[str] = []
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            gaps += [f"{name}/{key}" for key in missing_weights(component, checkpoint_keys(folder / name))]
    if gaps and not allow_random_weights:
        shown = ", ".join(gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        raise RandomWeightsError(
            f"diffusion model {str(folder)!r}: its checkpoint lacks {len(gaps)} weights ({shown}), which would be "
            "random and make every image noise. Give a complete checkpoint, or set allow_random_weights: true "
            "if random weights are wanted."
        )


def set_scheduler(pipeline, name: str) -> None:
    """Replace the pipeline's scheduler with `name` (a class in diffusers.schedulers), built from
    the model's own scheduler config; a scheduler the model cannot use is refused, not tried."""
    import diffusers.schedulers as schedulers

    cls = getattr(schedulers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, schedulers.SchedulerMixin)):
        raise ValueError(f"scheduler {name!r} is not a scheduler class in diffusers.schedulers")
    compatible = {c.__name__ for c in pipeline.scheduler.compatibles} | {type(pipeline.scheduler).__name__}
    if name not in compatible:
        raise ValueError(f"scheduler {name!r} does not fit this model; it accepts: {', '.join(sorted(compatible))}")
    pipeline.scheduler = cls.from_config(pipeline.scheduler.config)


def load_pipelines(settings: "DiffusionSettings"):
    """(text2img, img2img or None, folder, device, dtype): one set of modules, two pipelines."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline

    folder = resolve_model_dir(settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    # With accelerate, weights missing from a checkpoint stay on the meta device (unusable);
    # only when they are allowed are they initialised at random instead.
    base = DiffusionPipeline.from_pretrained(
        str(folder), dtype=dtype, variant=settings.variant, local_files_only=True,
        low_cpu_mem_usage=not settings.allow_random_weights,
    )
    check_weights(base, folder, settings.allow_random_weights)
    if settings.scheduler:
        set_scheduler(base, settings.scheduler)
    base.to(device)
    text2img = AutoPipelineForText2Image.from_pipe(base)
    try:
        img2img = AutoPipelineForImage2Image.from_pipe(base)
    except ValueError:  # a family with no image-to-image pipeline: chained scenes fail, named
        img2img = None
    for pipeline in (text2img, img2img):
        if pipeline is not None:
            pipeline.set_progress_bar_config(disable=True)
    return text2img, img2img, folder, device, dtype
