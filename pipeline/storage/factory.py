"""The store for a configured location, chosen by URL: a directory or S3-compatible storage.

Apart from the protocol and the local store (`objectstore.py`) so that the S3 store, which
imports them, is never imported back by them."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.settings import S3Settings
from pipeline.storage.objectstore import LocalObjectStore, ObjectStore, ObjectStoreError, is_url

_cache: dict[tuple[str, str], ObjectStore] = {}
_cache_lock = threading.Lock()


def open_store(url: str | Path, s3: S3Settings | None = None) -> ObjectStore:
    """The store for a configured location: a Path, a plain path string or `file:///abs/path`
    gives a LocalObjectStore; `s3://bucket/prefix` an S3ObjectStore (endpoint and credentials
    from `s3`, else the environment). S3 stores are shared per (URL, settings): a boto3 client
    is thread-safe and costly to build, and checking the bucket is a round trip."""
    if isinstance(url, Path) or not is_url(url):
        return LocalObjectStore(url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ObjectStoreError(f"{url}: a file URL names this machine's files: file:///abs/path")
        return LocalObjectStore(unquote(parsed.path))
    if parsed.scheme != "s3":
        raise ObjectStoreError(f"unsupported store URL {url!r}: use a path, file:///abs/path or s3://bucket/prefix")
    from pipeline.storage.s3 import S3ObjectStore  # boto3 is only imported where S3 is configured

    s3 = s3 or S3Settings()
    cache_key = (url, s3.model_dump_json())
    with _cache_lock:
        store = _cache.get(cache_key)
        if store is None:
            store = _cache[cache_key] = S3ObjectStore(parsed.netloc, parsed.path, s3)
        return store


def as_store(store_or_root: ObjectStore | str | Path, s3: S3Settings | None = None) -> ObjectStore:
    """Callers may hand over a store or a location (the settings' path or URL)."""
    if isinstance(store_or_root, (str, Path)):
        return open_store(store_or_root, s3)
    return store_or_root
