"""`sceneref models fetch` against a stand-in hub (tests/fakehub.py) through huggingface_hub's own download code.

The hub holds tiny models built with the real classes (scorers.tiny) under hub-like repo names, plus files the
loaders never read (other weight formats, a processor repo's weights) that must not be fetched. After a fetch, a
fresh process with HF_HUB_OFFLINE=1 loads every scorer through scorers.load_scorer from the cache and scores an
image, without a single request to the hub: what a replica does at start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from scorers.tiny import build_tiny_models
from tests.fakehub import GATED, FakeHub

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("ViT-B-32-quickgelu", "openai", "timm/vit_base_patch32_clip_224.openai")  # open_clip's own registry
TOKEN = "hf_test_token_for_the_gated_repo"
FOUR = [arg for name in ("pickscore", "clipscore", "vqascore", "aesthetic") for arg in ("--scorer", name)]


def _copy(source: Path, target: Path, extra: dict[str, bytes] = {}) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("COMPLETE"))
    for name, data in extra.items():
        (target / name).write_bytes(data)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    models = build_tiny_models(tmp_path_factory.mktemp("tiny"))
    root = tmp_path_factory.mktemp("hub")
    pick = Path(models["pickscore"]["model"])
    unused = b"weights the loaders never read" * 10
    _copy(pick, root / "fake/tiny-pickscore", {"pytorch_model.bin": unused, "flax_model.msgpack": unused, "README.md": b"# card"})
    _copy(Path(models["pickscore"]["processor"]), root / "fake/tiny-clip-processor",
          {"open_clip_pytorch_model.bin": unused, "model.safetensors": unused, "config.json": (pick / "config.json").read_bytes()})
    _copy(Path(models["vqascore"]["model"]), root / "fake/tiny-vqa", {"README.md": b"# card"})
    for name, repo in (("clipscore", "fake/tiny-openclip"), ("aesthetic", "fake/tiny-aesthetic-clip")):
        folder = Path(models[name]["pretrained"]).parent
        (root / repo).mkdir(parents=True)
        for file in ("open_clip_config.json", "open_clip_model.safetensors"):
            shutil.copy(folder / file, root / repo / file)
        (root / repo / "open_clip_pytorch_model.bin").write_bytes(unused)
    builtin = root / BUILTIN[2]
    builtin.mkdir(parents=True)  # a stand-in for the real 600 MB checkpoint: only its place in the cache is checked
    (builtin / "open_clip_model.safetensors").write_bytes(b"stand-in for ViT-B-32 openai weights")
    (builtin / "open_clip_pytorch_model.bin").write_bytes(unused)
    (root / "fake/heads").mkdir(parents=True)
    shutil.copy(models["aesthetic"]["head"], root / "fake/heads/aesthetic_head.pth")
    (root / "fake/heads/broken.pth").write_bytes(b"<html>not a head</html>")
    _copy(pick, root / "fake/gated-model")
    (root / "fake/gated-model" / GATED).write_text(TOKEN)
    with FakeHub(root) as server:
        yield server


def _scoring(head: Path) -> dict:
    return {
        "pickscore": {"model": "fake/tiny-pickscore", "processor": "fake/tiny-clip-processor", "reference": 0.0},
        "clipscore": {"model": "hf-hub:fake/tiny-openclip"},
        "vqascore": {"model": "fake/tiny-vqa"},
        "aesthetic": {"model": "hf-hub:fake/tiny-aesthetic-clip", "head": str(head)},
    }


def _config(path: Path, *apps: dict) -> Path:
    """A Serve config whose applications have these scoring settings."""
    document = {"applications": [{"name": f"app{i}", "import_path": "deployments.app:build_app",
                                  "args": {"pipeline": {"scoring": scoring}}} for i, scoring in enumerate(apps)]}
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """This process as a fresh shell with the hub reachable: the test run sets HF_HUB_OFFLINE=1, and
    huggingface_hub reads it once, at import."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub.clear()
    return tmp_path / "hf" / "hub"


def _snapshot(cache: Path, repo: str) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = (folder / "refs" / "main").read_text()
    return folder / "snapshots" / commit


def test_fetch_through_the_cli_then_replicas_load_offline_with_no_request(hub, tmp_path):
    home = tmp_path / "hf"
    head = tmp_path / "models" / "aesthetic_head.pth"
    # a second application, the same but for CLIP-Score by open_clip's registry (name + pretrained tag)
    builtin = {**_scoring(head), "clipscore": {"model": BUILTIN[0], "pretrained": BUILTIN[1]}}
    config = _config(tmp_path / "serve.yaml", _scoring(head), builtin)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    hub.clear()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "models", "fetch", "--config", str(config), *FOUR,
         "--aesthetic-head-url", f"{hub.url}/fake/heads/resolve/main/aesthetic_head.pth"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cache = home / "hub"
    assert sorted(p.name for p in _snapshot(cache, "fake/tiny-pickscore").iterdir()) == ["config.json", "model.safetensors"]
    processor = {p.name for p in _snapshot(cache, "fake/tiny-clip-processor").iterdir()}
    assert {"tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json"} <= processor
    assert not processor & {"model.safetensors", "open_clip_pytorch_model.bin"}  # a processor's weights are not read
    assert sorted(p.name for p in _snapshot(cache, "fake/tiny-openclip").iterdir()) == [
        "open_clip_config.json", "open_clip_model.safetensors"]
    assert [p.name for p in _snapshot(cache, BUILTIN[2]).iterdir()] == ["open_clip_model.safetensors"]
    assert (_snapshot(cache, "fake/tiny-vqa") / "model.safetensors").is_file()
    assert "README.md" not in {p.name for p in _snapshot(cache, "fake/tiny-vqa").iterdir()}
    assert head.read_bytes() == (hub.root / "fake/heads/aesthetic_head.pth").read_bytes()
    assert "[pickscore] fake/tiny-pickscore @ " in done.stdout and "fetched 2 files" in done.stdout
    sent = 0
    for path in hub.downloads():  # /{org}/{name}/resolve/{revision}/{file}
        org, name, _, _, file = path.strip("/").split("/", 4)
        sent += (hub.root / org / name / file).stat().st_size
    assert done.stdout.strip().splitlines()[-1] == f"fetched {_size(sent)} into {cache}"

    hub.clear()  # a replica: offline, the hub still reachable, and not one request may reach it
    env["HF_HUB_OFFLINE"] = "1"
    loaded = subprocess.run([sys.executable, "-c", REPLICA, json.dumps(_scoring(head))], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert set(result["scores"]) == {"pickscore", "clipscore", "vqascore", "aesthetic"}
    assert all(0.0 <= score <= 100.0 for score in result["scores"].values())
    assert result["builtin"] == str(_snapshot(cache, BUILTIN[2]) / "open_clip_model.safetensors")
    assert hub.requests == []


REPLICA = """
import json, sys
from PIL import Image
import scorers
from scorers.openclip import _resolve_pretrained
image = Image.new("RGB", (96, 64), (200, 40, 30))
scores = {}
for name, options in json.loads(sys.argv[1]).items():
    [out] = scorers.load_scorer(name, device="cpu", dtype="fp32", **options).score([image], ["a red square"])
    scores[name] = out.score
builtin = _resolve_pretrained("ViT-B-32-quickgelu", "openai")[0]  # the loader's own cache lookup, offline
print(json.dumps({"scores": scores, "builtin": builtin}))
"""


def _size(n: int) -> str:
    from scorers.fetch import size

    return size(n)


def test_second_run_fetches_nothing(hub, online, tmp_path, capsys):
    head = tmp_path / "aesthetic_head.pth"
    shutil.copy(hub.root / "fake/heads/aesthetic_head.pth", head)
    config = _config(tmp_path / "serve.yaml", _scoring(head))
    assert cli.main(["models", "fetch", "--config", str(config), *FOUR]) == 0
    first = capsys.readouterr().out
    assert hub.downloads() and "fetched 0 B" not in first
    hub.clear()
    assert cli.main(["models", "fetch", "--config", str(config), *FOUR]) == 0
    second = capsys.readouterr().out
    assert hub.downloads() == []
    assert "fetched 0 files, 0 B" in second and second.strip().splitlines()[-1] == f"fetched 0 B into {online}"
    assert f"head {head}: present" in second


def test_dry_run_lists_files_and_sizes_without_fetching(hub, online, tmp_path, capsys):
    config = _config(tmp_path / "serve.yaml", _scoring(tmp_path / "head.pth"))
    code = cli.main(["models", "fetch", "--config", str(config), "--dry-run", "--scorer", "pickscore", "--scorer", "vqascore",
                     "--aesthetic-head-url", f"{hub.url}/fake/heads/resolve/main/aesthetic_head.pth"])
    out = capsys.readouterr().out
    assert code == 0
    assert hub.downloads() == [] and not list(online.rglob("*.safetensors"))
    size = (hub.root / "fake/tiny-pickscore/model.safetensors").stat().st_size
    assert f"    model.safetensors  {_size(size)}" in out
    assert "[pickscore] fake/tiny-pickscore @ " in out and "would fetch 2 files" in out
    assert "fake/tiny-vqa" in out and "aesthetic" not in out and "tiny-openclip" not in out
    assert out.strip().splitlines()[-1].startswith("would fetch ")


def test_missing_repo_is_a_clear_error_naming_it(hub, online, tmp_path, capsys):
    config = _config(tmp_path / "serve.yaml", {
        "vqascore": {"model": "fake/no-such-model"}, "pickscore": {"model": "fake/tiny-pickscore",
                                                                  "processor": "fake/tiny-clip-processor"}})
    code = cli.main(["models", "fetch", "--config", str(config), "--scorer", "vqascore", "--scorer", "pickscore"])
    captured = capsys.readouterr()
    assert code == 1
    assert "fake/no-such-model not found on" in captured.err and "check the id" in captured.err
    assert "HF_TOKEN" in captured.err and "HF_ENDPOINT" in captured.err
    assert "[pickscore] fake/tiny-pickscore" in captured.out  # the other repos are still fetched
    assert "1 source(s) failed" in captured.out


def test_gated_repo_needs_hf_token(hub, online, tmp_path, capsys, monkeypatch):
    config = _config(tmp_path / "serve.yaml", {
        "pickscore": {"model": "fake/gated-model", "processor": "fake/tiny-clip-processor"}})
    argv = ["models", "fetch", "--config", str(config), "--scorer", "pickscore"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "fake/gated-model is gated" in err and "HF_TOKEN" in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(argv) == 0
    assert (_snapshot(online, "fake/gated-model") / "model.safetensors").is_file()


def test_missing_local_head_and_a_bad_download_are_errors(hub, online, tmp_path, capsys):
    head = tmp_path / "models" / "head.pth"
    config = _config(tmp_path / "serve.yaml", _scoring(head))
    argv = ["models", "fetch", "--config", str(config), "--scorer", "aesthetic"]
    assert cli.main(argv) == 1
    assert f"head {head} does not exist" in capsys.readouterr().err
    assert cli.main(argv + ["--aesthetic-head-url", f"{hub.url}/fake/heads/resolve/main/broken.pth"]) == 1
    assert "could not download head" in capsys.readouterr().err
    assert not head.exists() and list(head.parent.iterdir()) == []  # no partial file left behind


def test_refuses_to_run_offline(online, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["models", "fetch", "--dry-run"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_plan_of_the_production_config():
    """serve_config.yaml's scorers resolve to the repos and files their loaders read (no network)."""
    from scorers import fetch

    [scoring] = cli.scoring_from_config(ROOT / "serve_config.yaml")
    work = fetch.plan([(name, getattr(scoring, name).model_dump()) for name in ("pickscore", "clipscore", "vqascore", "aesthetic")])
    roles = {repo: need.roles for repo, need in work.repos.items()}
    assert roles == {
        "yuvalkirstain/PickScore_v1": {"model"},
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": {"config"},
        "timm/vit_base_patch32_clip_224.openai": {"open_clip:open_clip_pytorch_model.bin"},
        "Qwen/Qwen2.5-VL-3B-Instruct": {"model", "config"},
        "timm/vit_large_patch14_clip_224.openai": {"open_clip:open_clip_pytorch_model.bin"},
    }
    assert [(f.scorer, f.option) for f in work.files] == [("aesthetic", "head")]
    siglip = fetch.plan({"clipscore": {"model": "ViT-B-16-SigLIP", "pretrained": "webli"}})
    assert siglip.repos["timm/ViT-B-16-SigLIP"].roles == {"open_clip:open_clip_pytorch_model.bin", "config"}  # + its tokenizer
    listing = {"config.json": 1, "model.safetensors": 2, "pytorch_model.bin": 2, "model.fp16.safetensors": 1,
               "tokenizer.json": 1, "onnx/model.onnx": 1, "open_clip_pytorch_model.bin": 2, "README.md": 1}
    assert fetch.select_files("r", {"model"}, listing) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert fetch.select_files("r", {"config"}, listing) == ["config.json", "tokenizer.json"]
    assert fetch.select_files("r", {"open_clip:open_clip_pytorch_model.bin"}, listing) == ["open_clip_pytorch_model.bin"]
    with pytest.raises(fetch.FetchError, match="no transformers weights"):
        fetch.select_files("r", {"model"}, {"config.json": 1})
