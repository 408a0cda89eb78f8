"""Deterministic train / validation / test splits by record id, with no prompt in two splits.

A record's split is a stable hash bucket of its id. The vendored sets share a few prompts under different
ids (e.g. JailbreakBench reuses AdvBench requests), so a prompt's split is that of the *first* id it has in
the canonical set order (``prompts_io.HARMFUL + BENIGN``): every copy of a prompt lands in one split.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Iterator, Sequence

SPLITS = (("train", 80), ("validation", 10), ("test", 10))  # percent
SPLIT_NAMES = tuple(name for name, _ in SPLITS)


def split_of(record_id: str) -> str:
    """The split of ``record_id``: a stable hash bucket, independent of file order and of other records."""
    bucket = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:4], "big") % 100
    edge = 0
    for name, percent in SPLITS:
        edge += percent
        if bucket < edge:
            return name
    raise AssertionError("split percentages must sum to 100")


def prompt_key(text: str) -> str:
    """The de-duplication key of a prompt: case- and whitespace-insensitive."""
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=1)
def _canonical_ids() -> dict[str, str]:
    from casa_jax.data.prompts_io import BENIGN, HARMFUL, load_prompts
    ids: dict[str, str] = {}
    for name in HARMFUL + BENIGN:
        for record in load_prompts(name):
            ids.setdefault(prompt_key(record["prompt"]), record["id"])
    return ids


def canonical_id(record: dict) -> str:
    """The id that decides ``record``'s split: its prompt's first id among the vendored sets, else its own."""
    return _canonical_ids().get(prompt_key(record["prompt"]), record["id"])


def split_of_record(record: dict) -> str:
    """The split of a ``{"id", "prompt"}`` record (every copy of a prompt gets the same one)."""
    return split_of(canonical_id(record))


def unique_split_records(names: Sequence[str], split: str, keep: Callable[[dict], bool] = lambda r: True,
                         sort_by_id: bool = False) -> Iterator[tuple[str, dict]]:
    """(set name, record) for the records of ``split`` in the named sets, in set order (each set sorted by
    id if asked), skipping records ``keep`` rejects and every later copy of a prompt (``prompt_key``)."""
    from casa_jax.data.prompts_io import load_prompts
    seen: set[str] = set()
    for name in names:
        records = load_prompts(name)
        for record in sorted(records, key=lambda r: r["id"]) if sort_by_id else records:
            key = prompt_key(record["prompt"])
            if key not in seen and keep(record) and split_of_record(record) == split:
                seen.add(key)
                yield name, record
