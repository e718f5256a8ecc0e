"""Parameter counts of the production scorers' architectures, built on PyTorch's meta device (shapes
only: no weights, no memory, no download). Their registry entries name these counters; the GPU
sizing table (cluster.sizing) reads them from there.

The sizes are the published ones, written here independently of scorers/shapes/real.json, so
that a test comparing the two catches a real shape that drifted from the production model.
"""

from __future__ import annotations

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


def count_clipscore() -> int:
    return count_open_clip("ViT-B-32-quickgelu")


def count_vqascore() -> int:
    return count_qwen25_vl_3b()


def count_aesthetic() -> int:
    return count_open_clip("ViT-L-14-quickgelu") + AESTHETIC_HEAD_PARAMS
