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
    # --json: nothing but the JSON (no progress display, on either stream).
    assert not [line for line in err.splitlines() if line.startswith("[")] and "loading scorers" not in err
    # Real scores from the four scorers, combined with the guide's weights.
    gid = status["generation_id"]
    quality = json.loads((tmp_path / "reference_image_traces" / gid / "scene_2" / "quality_scores.json").read_text())
    for variation in quality["variations"]:
        scores = {name: s["score"] for name, s in variation["scores"].items()}
        assert set(scores) == {"pickscore", "clipscore", "vqascore", "aesthetic"}
        expected = 0.5 * scores["pickscore"] + 0.25 * scores["clipscore"] + 0.15 * scores["vqascore"] + 0.1 * scores["aesthetic"]
        assert variation["overall"] == pytest.approx(expected, abs=1e-3)
        # The consistency model runs here too (reported; weight 0 keeps the formula above).
        assert 0 <= variation["consistency"]["score"] <= 100
    assert all(0 <= scene["consistency_score"] <= 100 for scene in scenes[1:])
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


# --- jobs: the stored user image, resume, Ctrl-C ---------------------------------------------

from pipeline.jobs.store import JobStore  # noqa: E402

REQUEST = {
    "prompt": PROMPT, "target_duration": 9, "advanced_image_num_variations": 2,
    "advanced_image_max_enhancement_iterations": 1,
}


def test_user_image_is_stored_before_the_run_and_named_on_the_job(capsys, monkeypatch, models_dir, tmp_path):
    mine = tmp_path / "mine.png"
    Image.new("RGB", (64, 36), (200, 60, 30)).save(mine, format="PNG")
    code, out, err = run(
        capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--duration", "9", "--variations", "2",
        "--iterations", "1", "--output", str(tmp_path / "out"), "--image", str(mine), "--json",
    )
    assert code == 0, err
    gid = json.loads(out)["generation_id"]
    store = JobStore(f"sqlite:///{tmp_path / 'out' / 'sceneref.db'}")
    record = store.get(gid)
    assert record.reference_key == f"{gid}/scene_1/user_reference.png"
    assert store.scenes(gid)[0].reference_image_key == record.reference_key
    assert record.lease_holder is None and record.lease_token == 1
    store.close()


def test_resume_runs_a_failed_job_from_its_next_scene(capsys, monkeypatch, models_dir, tmp_path):
    monkeypatch.setenv("SCENEREF_MODELS_DIR", str(models_dir))
    store = JobStore(f"sqlite:///{tmp_path / 'sceneref.db'}")
    store.create("gen-1", "alice", REQUEST, offline=True)
    store.finish(store.claim("earlier-run", 30), "failed", error="image API 503 (a transient error)")
    store.create("gen-held", "alice", REQUEST, offline=True)
    store.claim("a-live-replica", 30, generation_id="gen-held")

    assert main(["resume", "gen-1", "--output", str(tmp_path), "--json", "--quiet"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "completed" and status["error"] is None
    assert [s["scene_number"] for s in status["storyboard_plan"]["scenes"]] == [1, 2, 3]
    record = store.get("gen-1")
    assert (record.owner, record.lease_token, record.lease_holder) == ("alice", 2, None)

    assert main(["resume", "gen-1", "--output", str(tmp_path)]) == 0  # completed: just shows it
    assert "completed" in capsys.readouterr().out
    assert main(["resume", "gen-held", "--output", str(tmp_path)]) == 1
    assert "held by a-live-replica" in capsys.readouterr().err
    assert main(["resume", "missing", "--output", str(tmp_path)]) == 2
    store.close()


def test_ctrl_c_ends_the_generation_cancelled(models_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "SCENEREF_MODELS_DIR": str(models_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "generate", "--offline", "--prompt", PROMPT, "--duration", "30",
         "--variations", "2", "--iterations", "2", "--output", str(tmp_path), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    database = tmp_path / "sceneref.db"
    try:
        deadline = time.monotonic() + 240
        store = None
        while time.monotonic() < deadline and process.poll() is None:
            if database.exists():
                store = store or JobStore(f"sqlite:///{database}")
                if store.count_unfinished() and store.unfinished()[0].status == "running":
                    break
            time.sleep(0.05)
        assert store is not None and process.poll() is None, "the generation never started"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    [gid] = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("generation ")]
    record = store.get(gid)
    assert (record.status, record.lease_holder, record.cancel_requested) == ("cancelled", None, True)
    assert f"sceneref resume {gid}" in out
    store.close()


def test_large_user_image_is_downscaled_like_an_upload(capsys, monkeypatch, models_dir, tmp_path):
    """The CLI's --image goes through the same intake and limits as an HTTP upload."""
    big = tmp_path / "wide.png"
    Image.new("RGB", (4096, 1024), (200, 80, 20)).save(big, format="PNG")
    code, out, err = run(
        capsys, monkeypatch, models_dir, "--prompt", PROMPT, "--duration", "9", "--variations", "2",
        "--iterations", "1", "--output", str(tmp_path / "out"), "--image", str(big), "--json",
    )
    assert code == 0, err
    first = json.loads(out)["storyboard_plan"]["scenes"][0]
    kept = Image.open(io.BytesIO(path_of(first["reference_image_url"]).read_bytes()))
    assert kept.size == (2048, 512)
