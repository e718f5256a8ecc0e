"""What the offline agents and images share: a hash that is the same in every process, so the
offline providers are deterministic across replicas and runs."""

from __future__ import annotations

import hashlib


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")

