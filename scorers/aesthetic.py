"""LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor).

Reference: simple_inference.py. The CLIP ViT-L/14 image embedding (OpenAI weights, QuickGELU) is L2-normalised
and fed, in fp32, to an MLP trained with MSE on SAC + LOGOS + AVA ratings:
Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16) Linear(16,1).

raw   = the head's output, on the AVA 1-10 rating scale (typical photos score 4-7)
score = 100 * clamp((raw - 1) / 9, 0, 1)

The head file sac+logos+ava1-l14-linearMSE.pth was saved from a CUDA tensor state dict; it is loaded with
map_location so it also loads on CPU-only machines.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .base import ModelNotFoundError, ScoreOutput, Scorer, clamp01, resolve_device, resolve_dtype
from .openclip import load_open_clip
from .registry import defaults
from .tensors import CropTransform

DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_HEAD = (defaults("aesthetic")[k] for k in ("model", "pretrained", "head"))
HEAD_ENV = "SCENEREF_AESTHETIC_HEAD"
HEAD_SOURCE = "https://github.com/christophschuhmann/improved-aesthetic-predictor"


def normalise(rating: float) -> float:
    """The AVA 1-10 scale mapped linearly onto 0-100."""
    return 100.0 * clamp01((rating - 1.0) / 9.0)


class AestheticHead(nn.Module):
    """The predictor's MLP, with the reference's layer indices so its state dict loads as is."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def resolve_head_path(head: str | os.PathLike = DEFAULT_HEAD) -> Path:
    """The head file: the given path, or for the default name the file named by $SCENEREF_AESTHETIC_HEAD."""
    path = Path(head)
    if path.is_file():
        return path
    if str(head) == DEFAULT_HEAD and os.environ.get(HEAD_ENV) and Path(os.environ[HEAD_ENV]).is_file():
        return Path(os.environ[HEAD_ENV])
    raise ModelNotFoundError(
        f"aesthetic head not found: {str(head)!r}. Download {DEFAULT_HEAD} from {HEAD_SOURCE} and pass "
        f"head=/path/to/{DEFAULT_HEAD}, or set {HEAD_ENV} to its path."
    )


def load_head(head: str | os.PathLike = DEFAULT_HEAD, device: torch.device | str = "cpu") -> AestheticHead:
    """Load the MLP head (always fp32, as in the reference); its input size comes from the weights."""
    path = resolve_head_path(head)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    module = AestheticHead(int(state["layers.0.weight"].shape[1]))
    module.load_state_dict(state)
    return module.to(device).eval()


class Aesthetic(Scorer):
    name = "aesthetic"

    def __init__(
        self,
        model: str | os.PathLike | dict = DEFAULT_MODEL,
        pretrained: str | os.PathLike | None = DEFAULT_PRETRAINED,
        head: str | os.PathLike = DEFAULT_HEAD,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        allow_random_weights: bool = False,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.head = load_head(head, self.device)
        self.clip = load_open_clip(model, pretrained, self.device, self.dtype, allow_random_weights)
        embed_dim = self.clip.model.visual.output_dim
        if embed_dim != self.head.input_size:
            raise ValueError(f"aesthetic head takes {self.head.input_size}-d embeddings, the CLIP model gives {embed_dim}")

    @cached_property
    def tensor_transform(self) -> CropTransform:
        """The tensor path's preprocessing, read from open_clip's own preprocess transform."""
        return CropTransform.from_open_clip(self.clip.preprocess)

    def _score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreOutput]:
        pixels = self.pixel_batch(images, self.clip.preprocess, self.tensor_transform, join=torch.stack)
        emb = self.clip.model.encode_image(pixels).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        ratings = self.head(emb)[:, 0].tolist()
        return [ScoreOutput(raw=r, score=normalise(r), truncated=False) for r in ratings]
