"""Images per second of each scorer beside a bare forward pass of the same model on ready tensors.

Full-size architectures with random weights (no downloads): transformers CLIP ViT-H/14 for PickScore, open_clip
ViT-B-32-quickgelu for CLIP-Score, ViT-L-14-quickgelu + the aesthetic head, and a Qwen2-VL-2B-sized VLM for
VQAScore (with the tiny offline tokenizer: the vocabulary size is the real one, the token ids are not).
The scorer's time covers everything score() does (RGB conversion, preprocessing, tokenisation, forward, formula);
the bare forward is the limit this hardware allows; "input prep" is the time to make the bare forward's ready
tensors from the images and prompts (the scorer's overhead, measured alone). Ratios are bare/scorer, from
wall-clock time and from process CPU time (which other processes on a shared machine disturb less). Timings do not depend on the weights' values.

    python benchmarks/scorers.py --device cpu --dtype fp32 --batches 1,4,16 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from scorers.base import resolve_device, resolve_dtype  # noqa: E402

SIZE = (512, 288)
HEAD = Path(os.environ.get("SCENEREF_AESTHETIC_HEAD", Path(__file__).resolve().parents[2] / "shared/data/aesthetic/sac+logos+ava1-l14-linearMSE.pth"))


def pictures(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)) for _ in range(n)]


def prompts(n: int) -> list[str]:
    return [f"a cinematic wide shot of scene {i}, a lighthouse on a cliff at dusk, warm rim light" for i in range(n)]


def _open_clip(name: str, device, dtype):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from scorers.openclip import _PRECISION, OpenClip

    model = open_clip.create_model(name, pretrained=None, precision=_PRECISION[dtype], device=device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClip(model, preprocess, tokenizer, tokenizer.context_length, name)


def build_clipscore(device, dtype, work: Path):
    from scorers.clipscore import ClipScore

    scorer = ClipScore.__new__(ClipScore)
    scorer.device, scorer.dtype = device, dtype
    scorer.clip = _open_clip("ViT-B-32-quickgelu", device, dtype)

    def bare(images, texts):
        pixels = torch.stack([scorer.clip.preprocess(im) for im in images]).to(device, dtype)
        tokens = scorer.clip.tokenizer(["A photo depicts " + t for t in texts]).to(device)
        return lambda: (scorer.clip.model.encode_image(pixels), scorer.clip.model.encode_text(tokens))

    return scorer, bare, "open_clip ViT-B-32-quickgelu (151M params)"


def build_aesthetic(device, dtype, work: Path):
    from scorers.aesthetic import Aesthetic, AestheticHead, load_head

    scorer = Aesthetic.__new__(Aesthetic)
    scorer.device, scorer.dtype = device, dtype
    scorer.clip = _open_clip("ViT-L-14-quickgelu", device, dtype)
    scorer.head = load_head(HEAD, device) if HEAD.is_file() else AestheticHead(768).to(device).eval()

    def bare(images, texts):
        pixels = torch.stack([scorer.clip.preprocess(im) for im in images]).to(device, dtype)
        return lambda: scorer.head(scorer.clip.model.encode_image(pixels).float())

    return scorer, bare, "open_clip ViT-L-14-quickgelu image tower + LAION head"


def build_pickscore(device, dtype, work: Path):
    from transformers import AutoImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel

    from scorers.hub import pil_image_processor_kwargs
    from scorers.pickscore import PickScore
    from scorers.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(work / "clip-tokenizer")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(work / "clip-ip")
    config = CLIPConfig(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K = PickScore_v1's architecture
        text_config={"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                     "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                       "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
        projection_dim=1024,
    )
    scorer = PickScore.__new__(PickScore)
    scorer.device, scorer.dtype, scorer.reference, scorer.max_tokens = device, dtype, 20.0, 77
    scorer.model = CLIPModel(config).to(device, dtype).eval()
    scorer.tokenizer = tokenizer
    scorer.image_processor = AutoImageProcessor.from_pretrained(work / "clip-ip", **pil_image_processor_kwargs())

    def bare(images, texts):
        pixels = scorer.image_processor(images=images, return_tensors="pt").pixel_values.to(device, dtype)
        text = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return lambda: (scorer.model.get_image_features(pixel_values=pixels), scorer.model.get_text_features(**text))

    return scorer, bare, "transformers CLIPModel, ViT-H/14 config (986M params)"


def build_vqascore(device, dtype, work: Path):
    from transformers import (AutoImageProcessor, AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    from scorers.hub import pil_image_processor_kwargs
    from scorers.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, _build_qwen_tokenizer
    from scorers.vqascore import QUESTION, VQAScore

    tokenizer = _build_qwen_tokenizer()
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(work / "qwen")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(  # Qwen/Qwen2-VL-2B-Instruct's sizes
        text_config={"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        vision_config={"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    scorer = VQAScore.__new__(VQAScore)
    scorer.device, scorer.dtype, scorer.question = device, dtype, QUESTION
    scorer.model = Qwen2VLForConditionalGeneration(config).to(device, dtype).eval()
    image_processor = AutoImageProcessor.from_pretrained(work / "qwen", **pil_image_processor_kwargs())
    scorer.processor = AutoProcessor.from_pretrained(work / "qwen", image_processor=image_processor)
    scorer.processor.tokenizer.padding_side = "left"
    scorer.answer_id = tokenizer.convert_tokens_to_ids("Yes")

    def bare(images, texts):
        inputs = scorer.processor(text=[scorer.prompt_text(t) for t in texts], images=images, padding=True,
                                  return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return lambda: scorer.model(**inputs, logits_to_keep=1, use_cache=False)

    params = sum(p.numel() for p in scorer.model.parameters()) / 1e9
    return scorer, bare, f"Qwen2-VL-2B-sized Qwen2VLForConditionalGeneration ({params:.2f}B params)"


BUILDERS = {"pickscore": build_pickscore, "clipscore": build_clipscore, "vqascore": build_vqascore, "aesthetic": build_aesthetic}


def _seconds(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def timed_pair(full, forward, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Best (wall, CPU) seconds of each over repeats runs, alternating the two so that load from other processes
    hits both. CPU time does not count time spent descheduled, so its ratio holds up on a shared machine."""
    runs = [(_seconds(full), _seconds(forward)) for _ in range(repeats)]
    best = lambda i: (min(r[i][0] for r in runs), min(r[i][1] for r in runs))  # noqa: E731
    return best(0), best(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--scorers", default="pickscore,clipscore,vqascore,aesthetic")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batches = [int(b) for b in args.batches.split(",")]
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout.split(":")[-1].strip()
    print(f"# {platform.node()} | {cpu or platform.processor()} | {torch.get_num_threads()} threads | "
          f"device {device} | {dtype} | torch {torch.__version__} | images {SIZE[0]}x{SIZE[1]} | repeats {args.repeats}")
    print("| scorer | model | batch | scorer img/s | bare forward img/s | ratio | ratio, CPU time | input prep CPU ms |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.scorers.split(","):
            scorer, bare, label = BUILDERS[name](device, dtype, Path(tmp))
            scorer.score(pictures(1), prompts(1))  # warm-up
            for batch in batches:
                images, texts = pictures(batch), prompts(batch)
                start = time.process_time()
                forward_fn = bare(images, texts)
                prep = time.process_time() - start
                full, forward = timed_pair(lambda: scorer.score(images, texts), forward_fn, args.repeats)
                print(f"| {name} | {label} | {batch} | {batch / full[0]:.2f} | {batch / forward[0]:.2f} "
                      f"| {forward[0] / full[0]:.2f} | {forward[1] / full[1]:.2f} | {1000 * prep:.0f} |", flush=True)
            del scorer


if __name__ == "__main__":
    main()
