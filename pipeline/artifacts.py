"""Artifact store: where every image a generation receives is kept, under keys like
`{generation_id}/scene_2/variation_3.png`. The stores themselves live in pipeline/objectstore.py
(a directory, or S3-compatible object storage for clusters, chosen by URL); these names stay so
existing imports keep working."""

from __future__ import annotations

from pipeline.objectstore import (
    ArtifactNotFound,
    LocalObjectStore,
    ObjectStore,
    ObjectStoreError,
    as_store,
    check_key,
    is_url,
    open_store,
    share,
    stored_bytes,
)

ArtifactStore = ObjectStore
LocalArtifactStore = LocalObjectStore

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "LocalArtifactStore",
    "LocalObjectStore",
    "ObjectStore",
    "ObjectStoreError",
    "as_store",
    "check_key",
    "is_url",
    "open_store",
    "share",
    "stored_bytes",
]
