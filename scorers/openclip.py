"""Loading open_clip models from a built-in name + pretrained tag, a checkpoint file, a model-config JSON or dict,
or an `hf-hub:` / `local-dir:` id, through open_clip's own factory."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from .base import ModelNotFoundError, RandomWeightsError
from .hub import hf_home, offline

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass
class OpenClip:
    model: Any
    preprocess: Callable
    tokenizer: Any
    context_length: int
    name: str


def load_open_clip(
    model: str | os.PathLike | dict,
    pretrained: str | os.PathLike | None,
    device: torch.device,
    dtype: torch.dtype,
    allow_random_weights: bool = False,
) -> OpenClip:
    """Build an open_clip model with its preprocessing and tokenizer.

    model: a built-in architecture name ("ViT-B-32-quickgelu"), "hf-hub:org/repo", "local-dir:/path",
    a path to a JSON file in open_clip's model-config format, or such a config as a dict.
    pretrained: a tag of open_clip's pretrained table ("openai"), or a checkpoint file; ignored for hf-hub/local-dir.
    With pretrained=None open_clip builds random weights without complaint, and every score would be noise
    presented as a measurement: refused unless allow_random_weights=True says it is wanted (benchmarks of speed).
    """
    name = _register(model)
    if pretrained is None and not name.startswith(("hf-hub:", "local-dir:")):
        if not allow_random_weights:
            raise RandomWeightsError(
                f"open_clip model {name!r} with pretrained=None would have random weights and give meaningless "
                "scores. Give pretrained= a pretrained tag or a checkpoint file, or set allow_random_weights=True "
                "(allow_random_weights: true in the config) if random weights are what you want."
            )
        warnings.warn(f"open_clip model {name!r} is built with random weights (allow_random_weights=True): "
                      "its scores mean nothing", UserWarning, stacklevel=3)
    if not name.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(name) is None:
        raise ModelNotFoundError(
            f"unknown open_clip architecture {name!r}: give a built-in name (open_clip.list_models()), "
            "a model-config JSON file or dict, 'hf-hub:org/repo' or 'local-dir:/path'"
        )
    checkpoint, preprocess_cfg = _resolve_pretrained(name, pretrained)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            precision=_PRECISION[dtype],
            device=device,
            **{f"image_{key}": value for key, value in preprocess_cfg.items()},
        )
    except (FileNotFoundError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not any(w in str(exc) for w in ("download", "not found", "HF Hub")):
            raise
        raise ModelNotFoundError(f"open_clip model {name!r} could not be loaded: {exc}. {_how(name)}") from exc
    clip.eval()
    tokenizer = open_clip.get_tokenizer(name)
    context_length = getattr(tokenizer, "context_length", None) or clip.context_length
    return OpenClip(clip, preprocess, tokenizer, int(context_length), name)


def _register(model: str | os.PathLike | dict) -> str:
    """Model configs given as a file or dict join open_clip's registry under a name derived from their content."""
    if isinstance(model, dict):
        config = model
    elif str(model).endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ModelNotFoundError(f"open_clip model config file not found: {path}")
        config = json.loads(path.read_text())
    else:
        return str(model)
    if not all(key in config for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    text = json.dumps(config, sort_keys=True)
    name = "sceneref-" + hashlib.sha1(text.encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        folder = Path(tempfile.gettempdir()) / "sceneref-open-clip-configs"
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / f"{name}.json"
        if not file.exists():
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(file)
        open_clip.add_model_config(file)
    return name


def _resolve_pretrained(name: str, pretrained: str | os.PathLike | None) -> tuple[str | None, dict]:
    """Turn a pretrained tag into a local checkpoint file (cache first, network only when not offline).

    open_clip would download on its own, without a local-first step; resolving here keeps offline machines from
    waiting on the network and lets a missing file raise ModelNotFoundError.
    """
    if pretrained is None or name.startswith(("hf-hub:", "local-dir:")):
        return None, {}
    if os.path.isfile(pretrained):
        return str(pretrained), {}
    cfg = open_clip.get_pretrained_cfg(name, str(pretrained))
    if not cfg:
        if os.sep in str(pretrained) or str(pretrained).endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelNotFoundError(f"open_clip checkpoint file not found: {pretrained} (option pretrained=).")
        raise ModelNotFoundError(
            f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {name!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name)})."
        )
    model_quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if bool(cfg.get("quick_gelu", False)) != model_quick_gelu:
        warnings.warn(
            f"{name} with {pretrained!r}: the weights were trained with quick_gelu={cfg.get('quick_gelu', False)} "
            f"but the architecture uses quick_gelu={model_quick_gelu}; every score will be off "
            f"(use the '-quickgelu' architecture for OpenAI weights)",
            UserWarning,
            stacklevel=4,
        )
    checkpoint = _cached_checkpoint(cfg)
    if checkpoint is None and not offline():
        try:
            checkpoint = open_clip.download_pretrained(cfg)
        except Exception as exc:
            raise ModelNotFoundError(f"open_clip weights {name} / {pretrained} could not be downloaded: {exc}. "
                                     f"{_how(name, pretrained)}") from exc
    if not checkpoint:
        raise ModelNotFoundError(f"open_clip weights {name} / {pretrained} not found locally "
                                 f"(HF_HUB_OFFLINE is set or no source). {_how(name, pretrained)}")
    return checkpoint, {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}


def _cached_checkpoint(cfg: dict) -> str | None:
    if cfg.get("file"):
        return cfg["file"]
    if cfg.get("hf_hub"):
        from huggingface_hub import hf_hub_download

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        elif filename.endswith((".bin", ".pth", ".pt")):
            candidates.insert(0, os.path.splitext(filename)[0] + ".safetensors")
        for candidate in candidates:
            try:
                return hf_hub_download(repo, candidate, local_files_only=True)
            except Exception:
                continue
    if cfg.get("url"):
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


def _how(name: str, pretrained=None) -> str:
    return (
        "Provide the weights one of these ways: pass pretrained= a local open_clip checkpoint file "
        "(with model= the architecture name or a model-config JSON); pass model='local-dir:/path' holding "
        "open_clip_config.json and the checkpoint; or on a machine with internet load "
        f"open_clip.create_model({name!r}, pretrained={pretrained!r}) once and copy the Hugging Face cache to "
        f"this machine's HF_HOME (now {hf_home()})."
    )
