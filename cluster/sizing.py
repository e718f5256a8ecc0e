"""GPU memory of the four scorers and the GPU fractions that fit common cards (docs/deploy.md).

    python -m cluster.sizing     # builds each architecture on the meta device (no weights, no
                                 # memory, no network), counts parameters, prints the tables

Estimates, not measurements: weights = parameters x 2 bytes (fp16/bf16), plus an activation
allowance per replica at the production batch size (ACTIVATION_GB, reasoned in docs/deploy.md),
plus one CUDA context per replica process (each Serve replica is its own process). Ray's GPU
fractions are bookkeeping, not memory limits, so a fraction is chosen as memory need / card.
"""

from __future__ import annotations

import math
import sys

CARDS_GB = (24, 48, 80)
CUDA_CONTEXT_GB = 0.5
# Transient activations at serve_config.yaml's max_batch_size (docs/deploy.md says how).
ACTIVATION_GB = {"pickscore": 0.5, "clipscore": 0.25, "vqascore": 3.0, "aesthetic": 0.5}
# LAION aesthetic head (sac+logos+ava1-l14-linearMSE.pth): an MLP 768-1024-128-64-16-1.
AESTHETIC_HEAD_PARAMS = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1


def _count(module) -> int:
    return sum({id(p): p.numel() for p in module.parameters()}.values())  # tied weights once


def count_open_clip(name: str) -> int:
    import open_clip

    return _count(open_clip.create_model(name, pretrained=None, device="meta"))


def count_pickscore() -> int:
    """yuvalkirstain/PickScore_v1 is a transformers CLIPModel of the CLIP ViT-H-14 shape."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         vocab_size=49408, max_position_embeddings=77, projection_dim=1024),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           patch_size=14, image_size=224, projection_dim=1024),
        projection_dim=1024,
    )
    with torch.device("meta"):
        return _count(CLIPModel(config))


def count_qwen25_vl_3b() -> int:
    """Qwen/Qwen2.5-VL-3B-Instruct's published config.json sizes, built with the real class."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=True,
        vocab_size=151936,
    )
    with torch.device("meta"):
        return _count(Qwen2_5_VLForConditionalGeneration(config))


def parameter_counts() -> dict[str, int]:
    return {
        "pickscore": count_pickscore(),
        "clipscore": count_open_clip("ViT-B-32-quickgelu"),
        "vqascore": count_qwen25_vl_3b(),
        "aesthetic": count_open_clip("ViT-L-14-quickgelu") + AESTHETIC_HEAD_PARAMS,
    }


def need_gb(params: int, scorer: str) -> float:
    return params * 2 / 1e9 + ACTIVATION_GB[scorer] + CUDA_CONTEXT_GB


def fractions_for(needs: dict[str, float], card_gb: float) -> tuple[dict[str, float], int]:
    """Each scorer's num_gpus (its need / the card, rounded up to 0.01) and how many full sets
    of the four fit one card."""
    fractions = {name: math.ceil(need / card_gb * 100) / 100 for name, need in needs.items()}
    return fractions, int(1 // sum(fractions.values()))


def main() -> int:
    counts = parameter_counts()
    needs = {name: need_gb(n, name) for name, n in counts.items()}
    print("| scorer | parameters | weights fp16/bf16 | + activations | + CUDA context | need |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n in counts.items():
        print(f"| {name} | {n:,} | {n * 2 / 1e9:.2f} GB | {ACTIVATION_GB[name]} GB | {CUDA_CONTEXT_GB} GB | {needs[name]:.2f} GB |")
    print(f"| all four | | | | | {sum(needs.values()):.2f} GB |\n")
    print("| card | " + " | ".join(counts) + " | sets per card |")
    print("|---|" + "---:|" * (len(counts) + 1))
    for card in CARDS_GB:
        fractions, sets = fractions_for(needs, card)
        print(f"| {card} GB | " + " | ".join(f"{fractions[n]:.2f}" for n in counts) + f" | {sets} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
