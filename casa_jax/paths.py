"""Path guards shared by the commands that write: an output must never be, contain or lie inside one of
its own inputs (a careless ``--overwrite`` would otherwise delete what it was asked to read)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from casa_jax.storage import is_remote


def _real(path: str) -> str:
    """A local path with links resolved, or a bucket URL without a trailing ``/``."""
    if is_remote(path):
        return str(path).rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def overlaps(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other (after resolving links)."""
    a, b = _real(a), _real(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def refuse_overlap(outputs: Mapping[str, str | None], inputs: Mapping[str, str | None], error=ValueError) -> None:
    """Raise ``error`` naming both flags when an output path equals, contains or lies inside an input path.
    Keys are the names users know (e.g. ``"--export_hf_dir"``); None values are skipped."""
    for out_name, out in outputs.items():
        for in_name, src in inputs.items():
            if out and src and overlaps(out, src):
                how = ("is" if _real(out) == _real(src) else
                       "contains" if _real(src).startswith(_real(out).rstrip(os.sep) + os.sep) else "lies inside")
                raise error(f"{out_name}={out} {how} {in_name}={src}: writing there could destroy the input; "
                            f"choose an output outside it")
