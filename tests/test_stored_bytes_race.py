"""Measuring a local store while retention deletes from it: a key listed and then removed before
it is looked at is simply no longer stored, not an error. (benchmarks/retention.py samples the
stores while the sweep runs; a FileNotFoundError there silently ended its sampling.)"""

from __future__ import annotations

from pipeline.storage.objectstore import LocalObjectStore, stored_bytes


class SweptWhileListed(LocalObjectStore):
    """The interleaving a concurrent sweep produces: the listing is taken, then the sweep
    deletes an object before its size is read."""

    def list(self, prefix: str = "") -> list[str]:
        keys = super().list(prefix)
        (self.root / "gone" / "b.png").unlink(missing_ok=True)
        return keys


def test_objects_deleted_between_listing_and_sizing_are_not_counted(tmp_path):
    store = SweptWhileListed(tmp_path)
    store.put("kept/a.png", b"x" * 300)
    store.put("gone/b.png", b"y" * 500)
    assert stored_bytes(store) == 300
