"""Tiny random-weight models with the real classes, saved the way real ones are stored.

The offline demo and the tests load them through load_scorer and the same loading code as real ids:
transformers save_pretrained directories (PickScore's CLIPModel and processor, a Qwen2-VL model and processor,
a DINOv2 model with its image processor for the consistency scorer)
and open_clip model-config JSON + checkpoint files (CLIP-Score, Aesthetic with a matching tiny head).
Their numbers mean nothing; their tokenizers and preprocessing are the real ones. Their sizes come from the
shape files in shapes/: `tiny` (the offline demo, the tests) and `bench` (ViT-B-32-sized towers and a small
Qwen2-VL, large enough that compute dominates a serving benchmark).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

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


def build_tiny_models(root: Path, shapes: str = "tiny") -> dict[str, dict]:
    """Build (once; later calls reuse them) the four random-weight models of `shapes` under root and
    return their load_scorer options.

    Safe to call twice and from concurrent processes: each model is built in a temporary folder and moved
    into place whole.
    """
    shape = load_shapes(shapes)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pick = _once(root / "pickscore", lambda d: _build_pickscore(d, shape["pickscore"]))
    clip = _once(root / "clipscore", lambda d: _build_open_clip(d, shape["clipscore"], seed=1))
    vqa = _once(root / "vqascore", lambda d: _build_vqascore(d, shape["vqascore"]))
    aes = _once(root / "aesthetic", lambda d: _build_aesthetic(d, shape["aesthetic"]))
    con = _once(root / "consistency", lambda d: _build_consistency(d, shape["consistency"]))
    return {
        "pickscore": {
            "model": str(pick / "model"), "processor": str(pick / "processor"), "reference": shape["pickscore"]["reference"],
        },
        "clipscore": {"model": str(clip / "open_clip_model_config.json"), "pretrained": str(clip / "open_clip_model.safetensors")},
        "vqascore": {"model": str(vqa)},
        "aesthetic": {
            "model": str(aes / "open_clip_model_config.json"),
            "pretrained": str(aes / "open_clip_model.safetensors"),
            "head": str(aes / "aesthetic_head.pth"),
        },
        "consistency": {"model": str(con)},
    }


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


def _build_pickscore(directory: Path, shape: dict) -> None:
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
    CLIPModel(config).eval().save_pretrained(directory / "model")


def _build_open_clip(directory: Path, config: dict, seed: int) -> None:
    """A model-config JSON beside its checkpoint; open_clip_config.json also makes the folder a 'local-dir:' model."""
    import open_clip
    from safetensors.torch import save_file

    from .openclip import _register

    (directory / "open_clip_model_config.json").write_text(json.dumps(config, indent=2))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}, indent=2))
    torch.manual_seed(seed)
    model = open_clip.create_model(_register(config), pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))


def _build_aesthetic(directory: Path, config: dict) -> None:
    from .aesthetic import AestheticHead

    _build_open_clip(directory, config, seed=2)
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


def _build_vqascore(directory: Path, shape: dict) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    tokenizer = _build_qwen_tokenizer()
    parts = {"image_processor": Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=shape["max_pixels"]),
             "tokenizer": tokenizer, "chat_template": QWEN_CHAT_TEMPLATE}
    try:
        from transformers import Qwen2VLVideoProcessor  # required by the processor from transformers 5

        parts["video_processor"] = Qwen2VLVideoProcessor()
    except ImportError:
        pass
    Qwen2VLProcessor(**parts).save_pretrained(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            **shape["text"], "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": shape["mrope_section"]},
            "rope_scaling": {"type": "mrope", "mrope_section": shape["mrope_section"]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={**shape["vision"], "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(4)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(directory)


def _build_consistency(directory: Path, shape: dict) -> None:
    """A Dinov2Model and a BitImageProcessor (DINOv2's own processor class) in one folder, as the
    Hugging Face DINOv2 repositories store them."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    crop = shape["crop_size"]
    BitImageProcessor(
        size={"shortest_edge": shape["resize"]}, crop_size={"height": crop, "width": crop},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3, do_convert_rgb=True,
    ).save_pretrained(directory)
    torch.manual_seed(5)
    Dinov2Model(Dinov2Config(**shape["model"], image_size=crop)).eval().save_pretrained(directory)
