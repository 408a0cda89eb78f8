"""Reading and writing Hugging Face weight files: lazy safetensors access, key styles, atomic export.

Only safetensors are read: pickle-based files (``*.bin``, ``*.pt``, ...) can run arbitrary code when
loaded, so they are refused with an explanation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Iterator, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from casa_jax import storage

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
IGNORED_PREFIXES = ("talker.", "token2wav.")  # speech-output halves of Qwen2.5-Omni; not the thinker
ENCODER_PREFIXES = ("visual.", "audio_tower.")


class CheckpointError(ValueError):
    """A Hugging Face directory or tensor set that cannot be converted as asked."""


def canonical_key(key: str) -> str | None:
    """Map any key style to the one transformers writes for a thinker or Qwen2 (``model.*``,
    ``lm_head.*``, ``visual.*``, ``audio_tower.*``). Returns None for keys we deliberately ignore."""
    if key.startswith("thinker."):
        key = key[len("thinker."):]
    elif key.startswith(IGNORED_PREFIXES):
        return None
    if key.startswith("model.language_model."):  # transformers' in-memory name of the thinker's text model
        return "model." + key[len("model.language_model."):]
    for prefix in ENCODER_PREFIXES:
        if key.startswith("model." + prefix):
            return key[len("model."):]
    return key


class SafetensorsDir:
    """Lazy, read-only view of the tensors in a Hugging Face directory, under canonical key names.

    Opening only reads the headers; ``read(key)`` memory-maps and returns one tensor.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: not a directory")
        self.files = self._weight_files()
        self._location: dict[str, tuple[str, str]] = {}  # canonical -> (file, original key)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self.ignored: list[str] = []
        styles: dict[str, list[str]] = {"thinker.": [], "bare": []}
        for path in self.files:
            with _open_safetensors(path) as f:
                for key in f.keys():
                    canon = canonical_key(key)
                    if canon is None:
                        self.ignored.append(key)
                        continue
                    styles["thinker." if key.startswith("thinker.") else "bare"].append(key)
                    if canon in self._location:
                        other = self._location[canon]
                        raise CheckpointError(
                            f"{hf_dir}: tensor {canon!r} appears twice ({other[1]!r} in "
                            f"{os.path.basename(other[0])} and {key!r} in {os.path.basename(path)})")
                    sl = f.get_slice(key)
                    self._location[canon] = (path, key)
                    self._shapes[canon] = tuple(sl.get_shape())
                    self._dtypes[canon] = str(sl.get_dtype())
        if styles["thinker."] and styles["bare"]:
            raise CheckpointError(
                f"{hf_dir}: mixes key styles: {len(styles['thinker.'])} keys start with 'thinker.' "
                f"(e.g. {styles['thinker.'][0]!r}) and {len(styles['bare'])} do not "
                f"(e.g. {styles['bare'][0]!r}); expected one style")
        self.key_style = "thinker." if styles["thinker."] else "bare"
        if self.ignored:
            log.info("%s: ignoring %d talker/token2wav tensors (speech output, not part of the thinker)",
                     hf_dir, len(self.ignored))

    def _weight_files(self) -> list[str]:
        names = sorted(os.listdir(self.hf_dir))
        index_path = os.path.join(self.hf_dir, SAFETENSORS_INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(self.hf_dir, n))]
            if missing:
                raise CheckpointError(f"{index_path} lists shard files that are not in {self.hf_dir}: {missing}")
            return [os.path.join(self.hf_dir, n) for n in files]
        shards = [n for n in names if n.endswith(".safetensors")]
        if shards:
            return [os.path.join(self.hf_dir, n) for n in shards]
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise CheckpointError(
                f"{self.hf_dir}: holds only pickle weight files {pickles}. casa-jax never loads pickle files: "
                "unpickling can execute arbitrary code. Convert them to safetensors first with a tool you "
                "trust (e.g. transformers: from_pretrained(...) then save_pretrained(..., "
                "safe_serialization=True)).")
        raise CheckpointError(f"{self.hf_dir}: no {SINGLE_FILE}, {SAFETENSORS_INDEX} or *.safetensors files")

    def keys(self) -> list[str]:
        return sorted(self._location)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def read(self, key: str) -> np.ndarray:
        path, original = self._location[key]
        with _open_safetensors(path) as f:
            try:
                return f.get_tensor(original)
            except Exception as e:  # safetensors raises its own error type for short reads
                raise CheckpointError(f"{path}: cannot read tensor {original!r} ({e}); the file is truncated or "
                                      "corrupt") from e


def _open_safetensors(path: str):
    """``safe_open`` with a truncated or non-safetensors file reported as a ``CheckpointError`` naming it."""
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise CheckpointError(f"{path}: cannot read as safetensors ({e}); the file is truncated or corrupt") from e


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Fail now, before any long work, if ``path`` cannot become a new output directory: it is a file, it
    exists with content and ``overwrite`` is off, or its nearest existing parent is not writable."""
    path = storage.resolve(path)
    if storage.isfile(path):
        raise CheckpointError(f"{path}: is a file; expected a directory to write into")
    if storage.listdir(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists and is not empty; pass --overwrite to replace it")
    if storage.is_remote(path):
        return  # a bucket has no parent directories to check; a missing bucket fails on the first write
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise CheckpointError(f"{path}: cannot be created ({parent} is not a writable directory)")


@contextlib.contextmanager
def atomic_directory(final_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory beside ``final_dir``; on success rename it into place.

    An exception or a kill leaves ``final_dir`` untouched (only a ``.partial-*`` sibling remains,
    which no reader mistakes for a finished directory).
    """
    final_dir = storage.resolve(final_dir)
    check_output_dir(final_dir, overwrite)
    parent = os.path.dirname(final_dir)
    if jax.process_count() > 1 or storage.is_remote(final_dir):
        with _shared_atomic_directory(final_dir, parent) as tmp:
            yield tmp
        return
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final_dir) + ".partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, final_dir, parent, tmp.rsplit(".partial-", 1)[1])


@contextlib.contextmanager
def _shared_atomic_directory(final_dir: str, parent: str) -> Iterator[str]:
    """``atomic_directory`` for several processes writing one directory (orbax saves need all of them),
    or for a bucket (no ``mkdtemp``): one temporary name agreed through process 0, created and renamed by
    process 0 between barriers. A failed write leaves the ``.partial-*`` sibling, never ``final_dir``."""
    from casa_jax.distributed import barrier, is_writer, shared_token
    token = f"{shared_token():016x}"
    tmp = storage.join(parent, f"{os.path.basename(final_dir)}.partial-{token}")
    if is_writer():
        storage.makedirs(tmp)
    barrier(f"created {tmp}")
    yield tmp
    barrier(f"written {tmp}")
    if is_writer():
        _replace_dir(tmp, final_dir, parent, token)
    barrier(f"renamed {tmp}")


def _replace_dir(tmp: str, final_dir: str, parent: str, token: str) -> None:
    """Rename ``tmp`` to ``final_dir`` (local or in a bucket), moving an existing ``final_dir`` aside to a
    ``.old-<token>`` sibling first and deleting that afterwards."""
    if storage.exists(final_dir):
        old = storage.join(parent, f"{os.path.basename(final_dir)}.old-{token}")
        storage.rename(final_dir, old)
        storage.rename(tmp, final_dir)
        try:
            storage.rmtree(old)
        except OSError as e:  # the new directory is in place; what is left is a stale copy, named as such
            log.warning("%s: could not delete the replaced copy %s (%s)", final_dir, old, e)
    else:
        storage.rename(tmp, final_dir)


def write_safetensors(out_dir: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> None:
    """Write tensors as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``,
    the way transformers does. Holds at most one shard's tensors in memory."""
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    current: dict[str, np.ndarray] = {}
    current_bytes = 0
    total = 0
    tmp_names: list[str] = []

    def flush():
        nonlocal current, current_bytes
        if not current:
            return
        name = f"shard-{len(tmp_names):05d}.tmp"
        save_file(current, os.path.join(out_dir, name), metadata={"format": "pt"})
        tmp_names.append(name)
        shards.append(list(current))
        current, current_bytes = {}, 0

    for key, array in tensors:
        array = np.ascontiguousarray(array)
        if current and current_bytes + array.nbytes > max_shard_bytes:
            flush()
        current[key] = array
        current_bytes += array.nbytes
        total += array.nbytes
    flush()
    if len(tmp_names) == 1:
        os.rename(os.path.join(out_dir, tmp_names[0]), os.path.join(out_dir, SINGLE_FILE))
        return
    n = len(tmp_names)
    for i, (tmp_name, keys) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in keys})
    with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def write_json(path: str, obj: Mapping) -> None:
    """``obj`` as indented JSON at ``path`` (local or in a bucket), replaced atomically."""
    storage.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
