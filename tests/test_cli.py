"""`sceneref generate --offline`: the whole generation in one process, through the real
scoring path with tiny models built on first use."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from pipeline.cli import main

PROMPT = "Artisan coffee that starts your morning right"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("offline-models")


def run(capsys, monkeypatch, models_dir, *args):
    monkeypatch.setenv("SCENEREF_MODELS_DIR", str(models_dir))
    code = main(["generate", "--offline", *args])
    out, err = capsys.readouterr()
    return code, out, err


def path_of(url: str) -> Path:
    return Path(urlparse(url).path)


def test_offline_generation_json(capsys, monkeypatch, models_dir, tmp_path):
    code, out, err = run(
        capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--duration", "15", "--variations", "2",
        "--iterations", "2", "--threshold", "30", "--output", str(tmp_path), "--keep-traces", "--json",
    )
    assert code == 0, err
    status = json.loads(out)
    assert status["status"] == "completed" and status["progress"] == 100 and status["offline"] is True
    assert status["advanced_image_generation_used"] is True
    assert status["storyboard_plan"]["advanced_image_settings"] == {
        "quality_threshold": 30.0, "num_variations": 2, "max_enhancement_iterations": 2,
    }
    scenes = status["storyboard_plan"]["scenes"]
    assert [s["scene_number"] for s in scenes] == [1, 2, 3, 4]
    for scene in scenes:
        assert path_of(scene["reference_image_url"]).is_file()
        assert 0 <= scene["quality_score"] <= 100
    # Progress lines on stderr, in order, ending at 100.
    percents = [int(line[1:4]) for line in err.splitlines() if line.startswith("[")]
    assert percents == sorted(percents) and percents[-1] == 100
    # Real scores from the four scorers, combined with the guide's weights.
    gid = status["generation_id"]
    quality = json.loads((tmp_path / "reference_image_traces" / gid / "scene_2" / "quality_scores.json").read_text())
    for variation in quality["variations"]:
        scores = {name: s["score"] for name, s in variation["scores"].items()}
        assert set(scores) == {"pickscore", "clipscore", "vqascore", "aesthetic"}
        expected = 0.5 * scores["pickscore"] + 0.25 * scores["clipscore"] + 0.15 * scores["vqascore"] + 0.1 * scores["aesthetic"]
        assert variation["overall"] == pytest.approx(expected, abs=1e-3)
    assert (tmp_path / "sceneref.db").is_file()


def test_user_image_is_scene_one_and_traces_are_cleaned(capsys, monkeypatch, models_dir, tmp_path):
    mine = tmp_path / "mine.jpg"
    Image.new("RGB", (96, 54), (30, 60, 200)).save(mine, format="JPEG", quality=95)
    code, out, err = run(
        capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--duration", "9", "--variations", "2",
        "--iterations", "1", "--output", str(tmp_path / "out"), "--image", str(mine), "--json",
    )
    assert code == 0, err
    status = json.loads(out)
    first = status["storyboard_plan"]["scenes"][0]
    assert first["user_provided"] is True and first["quality_score"] is None
    kept = Image.open(io.BytesIO(path_of(first["reference_image_url"]).read_bytes()))
    assert kept.size == (96, 54)
    assert not (tmp_path / "out" / "reference_image_traces" / status["generation_id"]).exists()


@pytest.mark.parametrize(
    "args,field",
    [
        (["--duration", "61"], "target_duration"),
        (["--variations", "0"], "advanced_image_num_variations"),
        (["--iterations", "9"], "advanced_image_max_enhancement_iterations"),
        (["--threshold", "101"], "advanced_image_quality_threshold"),
    ],
)
def test_bad_values_name_the_field(capsys, monkeypatch, models_dir, tmp_path, args, field):
    code, _, err = run(capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--output", str(tmp_path), *args)
    assert code == 2 and field in err


def test_short_prompt_and_bad_image_are_rejected(capsys, monkeypatch, models_dir, tmp_path):
    code, _, err = run(capsys, monkeypatch, models_dir, "--prompt", "coffee", "--output", str(tmp_path))
    assert code == 2 and "prompt" in err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, _, err = run(capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--output", str(tmp_path), "--image", str(text))
    assert code == 2 and "--image" in err
    assert not (tmp_path / "sceneref.db").exists()  # nothing started


def test_token_command(capsys, monkeypatch):
    import jwt

    monkeypatch.delenv("SCENEREF_JWT_SECRET", raising=False)
    assert main(["token", "--sub", "alice"]) == 2
    assert "SCENEREF_JWT_SECRET" in capsys.readouterr().err
    secret = "k" * 40
    monkeypatch.setenv("SCENEREF_JWT_SECRET", secret)
    assert main(["token", "--sub", "alice", "--ttl", "60"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["exp"] - claims["iat"] == 60


def test_missing_key_and_bad_config_are_clear_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["generate", "--prompt", PROMPT, "--output", str(tmp_path)]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    config = tmp_path / "settings.yaml"
    config.write_text("llm: {provider: telepathy}\n")
    assert main(["generate", "--prompt", PROMPT, "--output", str(tmp_path), "--config", str(config)]) == 2
    assert "llm.provider" in capsys.readouterr().err
