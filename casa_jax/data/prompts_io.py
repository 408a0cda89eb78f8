"""The vendored prompt datasets (``casa_jax/data/prompts``; sources and licences in its PROVENANCE.md).

They hold harmful *requests* (no responses), kept only to train refusals and to measure attacks.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
HARMFUL = ("harmful_advbench", "harmful_harmbench", "harmful_jbb", "harmful_pyrit_airt")
BENIGN = ("benign_jbb", "benign_mtbench", "benign_freshqa", "benign_writingbench_en", "benign_refusal_scorer",
          "benign_rho_overrefusal", "benign_ifeval")


def read_jsonl_lines(path: str) -> Iterator[tuple[int, object]]:
    """(line number, record) of a JSON Lines file, blank lines skipped; a bad line is an error naming the
    file and line. Errors about a record should quote its line number, not its position."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from e


def read_jsonl(path: str) -> Iterator[dict]:
    """Records of a JSON Lines file (see ``read_jsonl_lines``)."""
    for _, record in read_jsonl_lines(path):
        yield record


def load_prompts(name: str) -> list[dict]:
    """One vendored file by stem, e.g. ``load_prompts("harmful_advbench")``, or a user's JSONL file of
    ``{"prompt"[, "id"]}`` records (ids default to ``<file name>:<line>``)."""
    if name.endswith(".jsonl") and not os.path.isfile(name) and os.sep in name:
        raise ValueError(f"{name}: file not found (a prompt set is a vendored name or a path to a .jsonl file)")
    if name.endswith(".jsonl") and os.path.isfile(name):
        records = []
        for number, record in read_jsonl_lines(name):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{name}:{number}: each record needs a string 'prompt'")
            records.append({**record, "id": str(record.get("id", f"{os.path.basename(name)}:{number}"))})
        return records
    path = os.path.join(PROMPTS_DIR, name + ".jsonl")
    if not os.path.isfile(path):
        known = sorted(n[:-6] for n in os.listdir(PROMPTS_DIR) if n.endswith(".jsonl"))
        raise ValueError(f"no prompt set {name!r}; known: {known} (or a path to a .jsonl file)")
    return list(read_jsonl(path))
