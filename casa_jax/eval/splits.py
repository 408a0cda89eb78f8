"""Deterministic train / validation / test splits by record id (no prompt in two splits)."""

from __future__ import annotations

import hashlib

SPLITS = (("train", 80), ("validation", 10), ("test", 10))  # percent


def split_of(record_id: str) -> str:
    """The split of ``record_id``: a stable hash bucket, independent of file order and of other records."""
    bucket = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:4], "big") % 100
    edge = 0
    for name, percent in SPLITS:
        edge += percent
        if bucket < edge:
            return name
    raise AssertionError("split percentages must sum to 100")
