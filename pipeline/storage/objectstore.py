"""Object stores for artifacts and trace files: the protocol, its errors and key rules, and the
local store. `pipeline.storage.factory.open_store` chooses a store by URL.

A plain path or `file:///abs/path` is a directory on this node (one machine); `s3://bucket/prefix`
is S3-compatible object storage (a cluster: every replica on every node sees the same objects).
Both speak the same small protocol, so nothing above this module knows which one it has.

Keys are relative, slash-separated names (`{generation_id}/scene_2/variation_3.png`); a prefix
is folder-like: `gen1` covers `gen1/...`, never `gen10/...`, so removing one generation can
never touch another whose id merely starts the same way.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TMP = ".tmp-"


class ArtifactNotFound(KeyError):
    """No object under that key (a KeyError, so `except KeyError` callers keep working)."""


class ObjectStoreError(RuntimeError):
    """The store cannot be used as configured; the message says what to set."""

    retryable = False


class ObjectStoreUnavailable(ObjectStoreError):
    """The store worked and now does not answer (connection refused or timed out, a 5xx): an
    outage, not a configuration error. Transient (`retryable`): waiting, then trying the same
    call again, is the cure; runners do so for `S3Settings.outage_wait_s`."""

    retryable = True


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def link(self, src_key: str, dst_key: str) -> None: ...
    def ping(self) -> None: ...


def check_key(key: str) -> str:
    """Keys are relative, slash-separated names: no `..`, no absolute paths, no hidden names
    (the local store's temporary files start with a dot, so they can never be named)."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """'' (the whole store) or a key; a trailing slash is accepted and dropped."""
    prefix = prefix.rstrip("/")
    return check_key(prefix) if prefix else ""


def is_url(value: str | Path) -> bool:
    """True for `scheme://...` (s3://, file://); False for paths, which a Path never is.
    Use it to decide whether a configured location may be made absolute as a path."""
    return isinstance(value, str) and bool(_URL.match(value))


class LocalObjectStore:
    """A directory. Writes go to a temporary file that is renamed over the key, so a crash
    never leaves a half-written object behind a valid key, and a reader (or a hard link to the
    key) always sees either the old bytes or the new ones, never a mix."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def url(self) -> str:
        return self.root.absolute().as_uri()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def ping(self) -> None:
        """Raise ObjectStoreUnavailable unless the directory exists (made on first use) and can
        be written: a missing mount must answer like an S3 server that is down."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreUnavailable(f"{self.url}: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectStoreUnavailable(f"{self.url}: the directory cannot be written")

    def put(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return key

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if base.is_file():
            return [prefix]
        keys = []
        for folder, _, names in os.walk(base):
            rel = Path(folder).relative_to(self.root).as_posix()
            keys.extend(name if rel == "." else f"{rel}/{name}" for name in names if not name.startswith(_TMP))
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        prefix = check_prefix(prefix)
        if not prefix:
            raise ValueError("refusing to delete the whole store: give a prefix")
        keys = self.list(prefix)
        for key in keys:
            _unlink(self.root / key)
        _prune(self.root / prefix)
        return len(keys)

    def link(self, src_key: str, dst_key: str) -> None:
        """A hard link: one copy of the bytes under two keys. Safe because no write ever
        changes a file in place (put renames a new file over the key). Copies where the
        filesystem has no hard links."""
        dst = self.path(dst_key)
        if not self.exists(src_key):
            raise ArtifactNotFound(src_key)
        if not hard_link(self.path(src_key), dst):
            self.put(dst_key, self.get(src_key))

    def stored_bytes(self, prefix: str = "", seen: set | None = None) -> int:
        """Bytes on disk under prefix, each hard-linked file counted once (across stores too,
        when they share `seen`)."""
        seen = set() if seen is None else seen
        total = 0
        for key in self.list(prefix):
            try:
                stat = (self.root / key).stat()
            except FileNotFoundError:  # deleted since it was listed (a sweep running): not stored
                continue
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
        return total

    def folders(self) -> list[str]:
        """The top-level names (one per generation), without listing their objects: what
        retention's orphan sweep walks."""
        try:
            return sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith("."))
        except FileNotFoundError:
            return []

    def newest(self, prefix: str) -> datetime | None:
        """When anything under the prefix was last written (its folders too: one just made for a
        write in progress counts); None when nothing is there."""
        times = []
        for folder, _, names in os.walk(self.root / check_prefix(prefix)):
            for name in ["", *names]:
                try:
                    times.append(os.stat(os.path.join(folder, name)).st_mtime)
                except FileNotFoundError:  # removed since it was listed
                    pass
        return datetime.fromtimestamp(max(times), timezone.utc) if times else None


def hard_link(src: Path, dst: Path) -> bool:
    """Make dst a hard link to src, replacing dst atomically. False where the filesystem
    cannot (different filesystems, no hard-link support): the caller copies instead."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f"{_TMP}{uuid.uuid4().hex}"
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES):
            return False
        if exc.errno == errno.ENOENT:
            raise ArtifactNotFound(str(src)) from None
        raise
    try:
        os.replace(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise
    return True


def share(src: ObjectStore, src_key: str, dst: ObjectStore, dst_key: str) -> bool:
    """Name src's object under dst_key in dst without a second copy of its bytes, where the
    two stores allow it (local stores on one filesystem). False: nothing was done."""
    if isinstance(src, LocalObjectStore) and isinstance(dst, LocalObjectStore):
        return hard_link(src.path(src_key), dst.path(dst_key))
    return False


def stored_bytes(*stores: ObjectStore, prefix: str = "") -> int:
    """Bytes the stores hold under prefix; a file hard-linked into several local stores counts
    once. This is what retention and the `traces.keep` figures measure."""
    seen: set = set()
    return sum(store.stored_bytes(prefix, seen) for store in stores)


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _prune(path: Path) -> None:
    """Remove the now-empty folders under path, path included. Folders above it stay: a
    concurrent put may be creating a sibling key in them."""
    if path.is_dir():
        for folder, _, _ in sorted(os.walk(path), key=lambda item: -len(item[0])):
            try:
                os.rmdir(folder)
            except OSError:
                pass
