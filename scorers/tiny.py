"""Tiny random-weight models with the real classes, saved the way real ones are stored.

The offline demo and the tests load them through load_scorer and the same loading code as real ids:
transformers save_pretrained directories (PickScore's CLIPModel and processor, a Qwen2-VL model and processor,
a DINOv2 model with its image processor for the consistency scorer)
and open_clip model-config JSON + checkpoint files (CLIP-Score, Aesthetic with a matching tiny head).
Their numbers mean nothing; their tokenizers and preprocessing are the real ones. Their sizes come from the
shape files in shapes/: `tiny` (the offline demo, the tests), `bench` (ViT-B-32-sized towers and a small
Qwen2-VL, large enough that compute dominates a serving benchmark) and `real` (the production models'
architectures, Qwen2.5-VL-3B included, for timing on a GPU: benchmarks/gpu_scoring.py). Real shapes are
built in half precision (`dtype`), since a 3B model in fp32 costs 12 GB of disk and minutes to write.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from . import registry

COMPLETE = "COMPLETE"
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2-VL's chat template reduced to text and images: a default system turn, then the user's parts in order.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPES_DIR = Path(__file__).parent / "shapes"


def load_shapes(shapes: str) -> dict:
    """Model shapes live in small JSON files beside this module (shapes/tiny.json, shapes/bench.json)."""
    path = SHAPES_DIR / f"{shapes}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
        raise ValueError(f"unknown model shapes {shapes!r}: choose one of {known}")
    return json.loads(path.read_text())


def build_tiny_models(root: Path, shapes: str = "tiny", dtype: str | torch.dtype | None = None) -> dict[str, dict]:
    """Build (once; later calls reuse them) the random-weight models of `shapes` under root, one per
    registered scorer with a tiny recipe (scorers.registry), and return their load_scorer options.

    `dtype` (fp16, bf16) builds and saves the weights in that precision; None keeps fp32. The
    scorers cast to their own dtype when they load, so one half-precision copy serves fp16 and bf16 runs.
    Safe to call twice and from concurrent processes: each model is built in a temporary folder and moved
    into place whole.
    """
    shape = load_shapes(shapes)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    precision = _dtype(dtype)
    return {entry.name: _build_entry(root, entry, shape, precision) for entry in registry.entries() if entry.tiny}


def _build_entry(root: Path, entry: registry.ScorerEntry, shapes: dict, dtype: torch.dtype) -> dict:
    """One registered scorer's stand-in, built by its recipe (scorers.registry.TinyRecipe), and the
    load_scorer options that point into it."""
    recipe = entry.tiny
    if entry.shape not in shapes:
        raise ValueError(f"the model shapes have no {entry.shape!r} section for scorer {entry.name!r}")
    shape = shapes[entry.shape]
    build = registry.resolve(recipe.build)
    folder = _once(root / entry.name, lambda d: build(d, shape, dtype))
    options = {option: str(folder if path == "." else folder / path) for option, path in recipe.files.items()}
    return {**options, **{key: shape[key] for key in recipe.from_shape}}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    from .base import resolve_dtype

    return resolve_dtype(dtype, torch.device("cpu"))


@contextmanager
def _built_in(dtype: torch.dtype):
    """Modules constructed inside are made (and randomly initialised) in `dtype`: a 3B model never
    exists in fp32, which would need 15 GB of memory on the way to a half-precision file."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _once(target: Path, build: Callable[[Path], None]) -> Path:
    if (target / COMPLETE).exists():
        return target
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(work)
        (work / COMPLETE).write_text("built by scorers.tiny\n")
        if target.exists() and not (target / COMPLETE).exists():
            shutil.rmtree(target, ignore_errors=True)  # a build interrupted before this function existed
        try:
            os.rename(work, target)
        except OSError:
            if not (target / COMPLETE).exists():  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def build_clip_tokenizer(directory: Path):
    """transformers CLIPTokenizer made offline from the BPE merges open_clip ships: the same ids as open_clip's."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
    )
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _build_pickscore(directory: Path, shape: dict, dtype: torch.dtype = torch.float32) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_clip_tokenizer(directory / "processor")
    size = shape["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory / "processor"
    )
    config = CLIPConfig(
        text_config={
            **shape["text"], "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "projection_dim": shape["projection_dim"], "hidden_act": "gelu",
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**shape["vision"], "image_size": size, "projection_dim": shape["projection_dim"], "hidden_act": "gelu"},
        projection_dim=shape["projection_dim"],
    )
    torch.manual_seed(0)
    with _built_in(dtype):
        model = CLIPModel(config).eval()
    model.save_pretrained(directory / "model")


def _build_open_clip(directory: Path, config: dict, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """A model-config JSON beside its checkpoint; open_clip_config.json also makes the folder a 'local-dir:' model."""
    import open_clip
    from safetensors.torch import save_file

    from .openclip import _register

    (directory / "open_clip_model_config.json").write_text(json.dumps(config, indent=2))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(_register(config), pretrained=None)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))


def _build_clipscore(directory: Path, config: dict, dtype: torch.dtype = torch.float32) -> None:
    _build_open_clip(directory, config, seed=1, dtype=dtype)


def _build_aesthetic(directory: Path, config: dict, dtype: torch.dtype = torch.float32) -> None:
    from .aesthetic import AestheticHead

    _build_open_clip(directory, config, seed=2, dtype=dtype)
    torch.manual_seed(3)
    head = AestheticHead(config["embed_dim"])
    with torch.no_grad():  # centre the random head on the AVA scale so demo scores spread around the middle
        head.layers[-1].bias.fill_(5.0)
    torch.save(head.state_dict(), directory / "aesthetic_head.pth")


def _build_qwen_tokenizer():
    """A byte-level BPE with Qwen's special tokens and a chat template; "Yes" and "No" are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        'Does this figure show "a red bicycle leaning on a brick wall at sunset"? Please answer yes or no.',
        "Yes", "No", "Yes No yes no", "system You are a helpful assistant. user assistant",
        "cinematic wide shot of a city street, soft light, a person walking with a dog in the rain",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
    )
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) == 1
    return tokenizer


def _build_vqascore(directory: Path, shape: dict, dtype: torch.dtype = torch.float32) -> None:
    """A Qwen2-VL (the default) or, with `"architecture": "qwen2_5_vl"`, a Qwen2.5-VL model and its
    processor. Both use Qwen2-VL's image processor; the shape may set the real vocabulary size
    (its embedding and output layer are part of the model's cost), the tokenizer stays the tiny one."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    family = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[shape.get("architecture", "qwen2_vl")]
    tokenizer = _build_qwen_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=shape.get("min_pixels", 28 * 28 * 4), max_pixels=shape["max_pixels"])
    parts = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": QWEN_CHAT_TEMPLATE}
    try:
        from transformers import Qwen2VLVideoProcessor  # required by the processor from transformers 5

        parts["video_processor"] = Qwen2VLVideoProcessor()
    except ImportError:
        pass
    getattr(transformers, f"{family}Processor")(**parts).save_pretrained(directory)
    config = getattr(transformers, f"{family}Config")(**qwen_config_kwargs(shape, tokenizer))
    torch.manual_seed(4)
    with _built_in(dtype):
        model = getattr(transformers, f"{family}ForConditionalGeneration")(config).eval()
    model.save_pretrained(directory)


def qwen_config_kwargs(shape: dict, tokenizer=None) -> dict:
    """The keyword arguments of the Qwen config class for a vqascore shape (also used to count the
    real shape's parameters on the meta device, without building anything)."""
    tokenizer = tokenizer or _build_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    sections = shape["mrope_section"]
    theta = shape.get("rope_theta", 10000.0)
    kwargs = {
        "text_config": {
            "vocab_size": len(tokenizer), **shape["text"], "max_position_embeddings": shape.get("max_position_embeddings", 4096),
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, "mrope_section": sections},
            "rope_scaling": {"type": "mrope", "mrope_section": sections},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        "vision_config": {**shape["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    if "tie_word_embeddings" in shape:
        kwargs["tie_word_embeddings"] = kwargs["text_config"]["tie_word_embeddings"] = shape["tie_word_embeddings"]
    return kwargs


def _build_consistency(directory: Path, shape: dict, dtype: torch.dtype = torch.float32) -> None:
    """A Dinov2Model and a BitImageProcessor (DINOv2's own processor class) in one folder, as the
    Hugging Face DINOv2 repositories store them."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    crop = shape["crop_size"]
    BitImageProcessor(
        size={"shortest_edge": shape["resize"]}, crop_size={"height": crop, "width": crop},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3, do_convert_rgb=True,
    ).save_pretrained(directory)
    torch.manual_seed(5)
    with _built_in(dtype):
        model = Dinov2Model(Dinov2Config(**shape["model"], image_size=crop)).eval()
    model.save_pretrained(directory)
