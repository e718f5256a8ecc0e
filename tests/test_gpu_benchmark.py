"""The GPU scoring benchmark (benchmarks/gpu_scoring.py) in its CPU smoke mode, run as a user
runs it, and the real model shapes it times on a GPU (scorers/shapes/real.json).

The smoke run starts the app twice on local Ray clusters of its own (one per layout, in child
processes of their own session, which it ends), so it is marked `serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCORERS = ("pickscore", "clipscore", "vqascore", "aesthetic")
ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-bench")
    argv = [sys.executable, str(ROOT / "benchmarks/gpu_scoring.py"), "--smoke", "--json", str(out / "report.json"),
            "--work-dir", str(out / "work"), "--models-dir", str(out / "models")]
    process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the benchmark left running
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, output[-6000:]
    return json.loads((out / "report.json").read_text()), output


@pytest.mark.serve
@pytest.mark.timeout(1000)
def test_smoke_reports_both_layouts_against_the_limit(smoke):
    report, output = smoke
    assert report["config"]["device"] == "cpu" and report["config"]["shapes"] == "tiny"
    assert report["build"]["seconds"] >= 0 and report["build"]["bytes"] > 0
    assert all(size > 500_000 for size in report["config"]["image_bytes"])  # provider-sized, photograph-like PNGs
    [run] = report["runs"]
    assert run["dtype"] == "fp32" and run["input_path"] == "pil"
    limit = run["limit"]
    assert limit["images_per_s"] > 0 and limit["bare_images_per_s"] > 0
    assert set(limit["scorers"]) == set(SCORERS)
    assert all(row["finite"] and row["images_per_s"] > 0 for row in limit["scorers"].values())
    assert limit["memory"] == {"available": False, "reason": limit["memory"]["reason"]}
    assert set(run["served"]) == {"separate", "colocated"}
    for layout, served in run["served"].items():
        assert "error" not in served, served
        assert served["variations_per_s"] > 0
        assert served["served_over_limit"] == pytest.approx(served["variations_per_s"] / limit["images_per_s"])
        expected = served["concurrency"] * served["scenes_per_client"] * served["variations"]
        assert served["images"] == expected
        for name in SCORERS:  # every image went through every scorer, in batches that were counted
            batches = served["batches"][name]
            assert batches["images"] == expected and batches["count"] >= 1 and 1 <= batches["mean"] <= batches["max"]
        # On a CPU there are no GPU counters: said so, not zeros passed off as figures.
        assert served["gpu"]["available"] is False and "CPU" in served["gpu"]["reason"]
        assert served["memory"]["available"] is False and "CPU" in served["memory"]["reason"]
        assert "utilization_mean_pct" not in served["gpu"] and "device_used_max_bytes" not in served["memory"]
    assert set(run["served"]["separate"]["memory"]["replicas"]) == {"PickScore", "CLIPScore", "VQAScore", "Aesthetic"}
    assert set(run["served"]["colocated"]["memory"]["replicas"]) == {"Scoring"}
    assert run["served"]["colocated"]["request_batches"]["images"] == run["served"]["colocated"]["images"]
    assert "| fp32 | pil | separate |" in output and "| fp32 | pil | colocated |" in output


def test_real_shapes_are_the_production_architectures():
    """The real shapes count the parameters cluster/sizing.py counts for the production models
    (built on the meta device: no weights, no memory)."""
    import open_clip
    import torch
    import transformers

    from cluster.sizing import AESTHETIC_HEAD_PARAMS, _count, parameter_counts
    from scorers.openclip import _register
    from scorers.tiny import load_shapes, qwen_config_kwargs

    shape = load_shapes("real")
    counts = parameter_counts()
    with torch.device("meta"):
        vqa = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**qwen_config_kwargs(shape["vqascore"])))
        pick = shape["pickscore"]
        clip = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={**pick["text"], "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": pick["projection_dim"]},
            vision_config={**pick["vision"], "image_size": pick["image_size"], "projection_dim": pick["projection_dim"]},
            projection_dim=pick["projection_dim"]))
    assert _count(vqa) == counts["vqascore"]
    assert _count(clip) == counts["pickscore"]
    for name, extra in (("clipscore", 0), ("aesthetic", AESTHETIC_HEAD_PARAMS)):
        model = open_clip.create_model(_register(shape[name]), pretrained=None, device="meta")
        assert _count(model) + extra == counts[name]
    assert shape["vqascore"]["architecture"] == "qwen2_5_vl" and shape["aesthetic"]["embed_dim"] == 768


def test_a_qwen25_vl_shape_builds_in_half_precision_and_scores(tmp_path):
    """The Qwen2.5-VL branch of scorers.tiny (the real VQAScore shape, here made small) saves
    bf16 weights that load through load_scorer and give finite scores; tiny shapes stay fp32."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from scorers import load_scorer
    from scorers.tiny import _build_vqascore, build_tiny_models

    shape = {"architecture": "qwen2_5_vl", "max_pixels": 12544, "mrope_section": [2, 3, 3], "tie_word_embeddings": True,
             "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2},
             "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                        "window_size": 56, "fullatt_block_indexes": [1]}}
    _build_vqascore(tmp_path / "qwen25", shape, torch.bfloat16)
    stored = {t.dtype for f in (tmp_path / "qwen25").glob("*.safetensors") for t in load_file(f).values()}
    assert stored == {torch.bfloat16}
    scorer = load_scorer("vqascore", model=str(tmp_path / "qwen25"), device="cpu", dtype="fp32")
    assert type(scorer.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    outputs = scorer.score([Image.new("RGB", (300, 200), (120, 30, 200))] * 2, ["a cat", "a purple wall"])
    assert all(0 <= out.raw <= 1 for out in outputs)

    options = build_tiny_models(tmp_path / "tiny", "tiny")
    pick = load_file(next(Path(options["pickscore"]["model"]).glob("*.safetensors")))
    assert {t.dtype for t in pick.values() if t.is_floating_point()} == {torch.float32}
