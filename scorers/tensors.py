"""The tensor input path (scoring throughput): scorer preprocessing on the scorer's device.

On a GPU the models take milliseconds per batch and the host's PIL work (resize of a 1536x1024
image, per scorer) becomes the cap, so a uint8 RGB (3, H, W) tensor (from
`scorers.images.decode_tensor`) is moved to the scorer's device once and resized, cropped and
normalised there. Each transform takes its parameters from the scorer's own loaded processor
(transformers image processors, open_clip's preprocess transform), so the output has the PIL
path's shape, crop and normalisation; only the resampling arithmetic differs.

Resampling: torchvision's antialiased resize with the same filter (PIL's bicubic is the
a = -0.5 kernel torch uses when antialias=True), computed in float32 and rounded to the uint8
grid, as PIL's uint8 resize rounds. float32 on every device on purpose: torch's CPU has a
separate uint8 kernel that a GPU does not run, so measuring the float path on a CPU gives the
deviation a GPU will show. Measured deviations: docs/scoring.md, "Input path".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .images import _check_size

# PIL resample codes (what transformers' processors store) with a torch equivalent under
# antialias=True. NEAREST and LANCZOS have none that matches PIL.
_RESAMPLE = {2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}


def check_tensor(image: Any) -> torch.Tensor:
    """A scorer input tensor: uint8, (3, H, W), on a real device, within the scorer-input size
    limits (the same as a PIL image's). Anything else is a caller's mistake: ValueError."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"expected a PIL image or a uint8 RGB tensor, got {type(image).__name__}")
    if image.device.type == "meta":
        raise ValueError("image tensor is on the 'meta' device: it has no pixels to score")
    if image.dtype != torch.uint8:
        raise ValueError(f"image tensor must be uint8 RGB (0-255), got {image.dtype}: decode with scorers.images.decode_tensor")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must have shape (3, H, W), got {tuple(image.shape)}")
    _check_size((int(image.shape[2]), int(image.shape[1])))
    return image


def resize_uint8(image: torch.Tensor, height: int, width: int, interpolation: InterpolationMode) -> torch.Tensor:
    """Antialiased resize of a (3, H, W) uint8 tensor, returned as float32 values on the uint8
    grid. Two separable passes, width first, each rounded and clamped to 0-255, as PIL's uint8
    resize does: one 2-D pass keeps the bicubic overshoot at edges between passes and drifts up
    to 8 levels from PIL on upscaled images, the two passes stay within about one level."""
    pixels = image.float()
    in_height, in_width = image.shape[-2:]
    if width != in_width:
        pixels = F.resize(pixels, [in_height, width], interpolation=interpolation, antialias=True).round_().clamp_(0, 255)
    if height != in_height:
        pixels = F.resize(pixels, [height, width], interpolation=interpolation, antialias=True).round_().clamp_(0, 255)
    return pixels


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `shortest`, the other int(shortest * long / short):
    the rule of torchvision's Resize(int) and transformers' get_resize_output_image_size."""
    if width <= height:
        return int(shortest * height / width), shortest
    return shortest, int(shortest * width / height)


def _normaliser(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


@dataclass(frozen=True)
class CropTransform:
    """Resize (shortest edge or exact size), centre crop, rescale, normalise: the CLIP, DINOv2
    and open_clip recipe. `crop_rounding` is where the crop starts when the margin is odd:
    "floor" for transformers' processors, "round" for torchvision's CenterCrop (open_clip)."""

    size: int | tuple[int, int]
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    crop_rounding: str = "floor"

    @classmethod
    def from_hf(cls, processor: Any) -> "CropTransform":
        """From a transformers CLIP/BiT image processor (PickScore, consistency)."""
        if not (processor.do_resize and processor.do_rescale and processor.do_normalize):
            raise ValueError("tensor input path: the image processor must resize, rescale and normalise")
        size = processor.size
        if size.get("shortest_edge"):
            target: int | tuple[int, int] = int(size["shortest_edge"])
        elif size.get("height") and size.get("width"):
            target = (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(f"tensor input path: image processor size {dict(size)} is not supported")
        crop = None
        if processor.do_center_crop:
            crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
        return cls(target, crop, tuple(processor.image_mean), tuple(processor.image_std),
                   float(processor.rescale_factor), _interpolation(processor.resample), "floor")

    @classmethod
    def from_open_clip(cls, preprocess: Any) -> "CropTransform":
        """From open_clip's preprocess Compose (Resize, CenterCrop, RGB, ToTensor, Normalize)."""
        from torchvision import transforms as T

        size = crop = mean = std = None
        interpolation = InterpolationMode.BICUBIC
        for step in getattr(preprocess, "transforms", [preprocess]):
            kind = type(step).__name__
            if isinstance(step, T.Resize):
                if step.max_size is not None:
                    raise ValueError("tensor input path: open_clip Resize with max_size is not supported")
                size = step.size if isinstance(step.size, int) else tuple(step.size)
                size = size[0] if isinstance(size, tuple) and len(size) == 1 else size
                interpolation = step.interpolation
            elif isinstance(step, T.CenterCrop):
                crop = tuple(int(v) for v in step.size)
            elif isinstance(step, T.Normalize):
                mean, std = tuple(step.mean), tuple(step.std)
            elif kind in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") or getattr(step, "__name__", "") == "_convert_to_rgb":
                continue
            else:
                raise ValueError(f"tensor input path: open_clip preprocess step {step!r} has no tensor equivalent here")
        if size is None or mean is None:
            raise ValueError("tensor input path: open_clip preprocess without Resize or Normalize is not supported")
        if interpolation not in _RESAMPLE.values():
            raise ValueError(f"tensor input path: {interpolation} has no antialiased match for PIL's filter")
        return cls(size, crop, mean, std, 1 / 255, interpolation, "round")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 on any device -> (3, h, w) float32 on that device."""
        height, width = image.shape[-2:]
        if isinstance(self.size, int):
            out_h, out_w = shortest_edge_size(height, width, self.size)
        else:
            out_h, out_w = self.size
        pixels = resize_uint8(image, out_h, out_w, self.interpolation)
        if self.crop is not None:
            pixels = self._centre_crop(pixels)
        mean, std = _normaliser(self.mean, self.std, pixels.device)
        return (pixels * self.scale - mean) / std

    def _centre_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        crop_h, crop_w = self.crop
        height, width = pixels.shape[-2:]
        if crop_h > height or crop_w > width:
            raise ValueError(f"tensor input path: crop {crop_h}x{crop_w} is larger than the resized {height}x{width}")
        if self.crop_rounding == "round":
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
        else:
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return pixels[..., top:top + crop_h, left:left + crop_w]


@dataclass(frozen=True)
class PatchTransform:
    """Qwen2-VL's recipe: smart_resize to multiples of patch x merge within [min, max] pixels,
    rescale, normalise, then the flat patch layout its vision tower takes (each patch repeated
    over the temporal patch size, merge-size blocks kept together)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255
    interpolation: InterpolationMode = InterpolationMode.BICUBIC

    @classmethod
    def from_hf(cls, processor: Any) -> "PatchTransform":
        size = processor.size
        return cls(int(processor.patch_size), int(processor.merge_size), int(processor.temporal_patch_size),
                   int(size["shortest_edge"]), int(size["longest_edge"]), tuple(processor.image_mean),
                   tuple(processor.image_std), float(processor.rescale_factor), _interpolation(processor.resample))

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(3, H, W) uint8 -> (patches (grid_h * grid_w, C * T * P * P) float32, (1, grid_h, grid_w))."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        height, width = image.shape[-2:]
        out_h, out_w = smart_resize(int(height), int(width), factor=self.patch_size * self.merge_size,
                                    min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        pixels = resize_uint8(image, out_h, out_w, self.interpolation)
        mean, std = _normaliser(self.mean, self.std, pixels.device)
        pixels = (pixels * self.scale - mean) / std
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        channels = pixels.shape[0]
        grid_h, grid_w = out_h // p, out_w // p
        blocks = pixels.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
        patches = blocks.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
        return patches.reshape(grid_h * grid_w, channels * t * p * p), (1, grid_h, grid_w)


def _interpolation(resample: Any) -> InterpolationMode:
    if isinstance(resample, InterpolationMode):
        return resample
    try:
        return _RESAMPLE[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"tensor input path: PIL resample {resample!r} has no antialiased torch match "
                         "(bilinear and bicubic do); use input_path 'pil'") from None
