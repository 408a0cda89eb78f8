"""Files on a local disk or in a bucket (``gs://...``) through one interface, ``etils.epath``, the file
API orbax itself uses: a workdir or checkpoint on Cloud Storage survives the spot VM that wrote it.

Plain ``open()`` / ``os.path`` know local paths only; every path a command reads or writes goes
through here. On a bucket an object appears whole when its write finishes, so a small file is
replaced atomically by writing it directly; on a local disk through a renamed ``.partial`` sibling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_remote(path: str) -> bool:
    """Whether ``path`` names a bucket object (``gs://``, ``s3://``, ...) rather than a local file."""
    return "://" in str(path)


def resolve(path: str) -> str:
    """An absolute local path (``~`` expanded), or the URL without a trailing ``/``."""
    return str(path).rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(path: str, *parts: str) -> str:
    return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isfile(path: str) -> bool:
    return epath.Path(path).is_file()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: str) -> list[str]:
    """Entry names in ``path`` ([] if it does not exist)."""
    p = epath.Path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` so a reader sees the old text or the new, never half a file."""
    if is_remote(path):
        epath.Path(path).write_text(text, encoding="utf-8")  # an object becomes visible only once complete
        return
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def rmtree(path: str) -> None:
    p = epath.Path(path)
    if p.exists():
        p.rmtree()


def rename(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (a directory too; on a bucket, object by object)."""
    epath.Path(src).rename(dst)


def upload_dir(local: str, dst: str) -> None:
    """Copy the local directory ``local``'s files (and folders) into ``dst``, local or in a bucket, replacing
    files of the same name: the inverse of ``local_dir``, for libraries that write local files only."""
    makedirs(dst)
    for name in sorted(os.listdir(local)):
        src = os.path.join(local, name)
        if os.path.isdir(src):
            upload_dir(src, join(dst, name))
        else:
            epath.Path(src).copy(epath.Path(dst) / name, overwrite=True)


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local directory to write ``path``'s files into: ``path`` itself when local; else a temporary one,
    uploaded into ``path`` when the block succeeds, and removed either way."""
    if not is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="casa-jax-")
    try:
        yield tmp
        upload_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """``path`` itself when local; else a temporary local copy of the directory (for libraries that read
    local files only, e.g. tokenizers), removed afterwards."""
    if not is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="casa-jax-")
    try:
        for child in epath.Path(path).iterdir():
            if child.is_file():
                child.copy(epath.Path(tmp) / child.name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
