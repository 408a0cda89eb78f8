"""One workdir, one writer, one record: an exclusive lock held for a training run's lifetime, and the check
that a resumed run has the settings its checkpoints were trained with.

The lock is ``fcntl.flock`` on ``<workdir>/.lock``: the kernel drops it when the process dies (SIGKILL
included), so a stale lock never blocks a restart. It works on local disks (and NFS with flock support).
A ``gs://`` bucket has no such lock: there the launcher must start one trainer per workdir (the lock
is skipped with a warning). Everything else works on both, through ``casa_jax.storage``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os

from casa_jax import storage
from casa_jax.model.config import ConfigError
from casa_jax.storage import write_text_atomic

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"  # the final, servable model
CHECKPOINTS_DIR = "checkpoints"  # resumable training states (orbax CheckpointManager)


class WorkdirLock:
    """Context manager: hold ``<workdir>/.lock`` exclusively, or fail at once naming the holder."""

    def __init__(self, workdir: str):
        self.path = storage.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        if storage.is_remote(self.path):
            log.warning("%s is in a bucket, which has no lock: start one trainer per workdir",
                        os.path.dirname(self.path))
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{os.path.dirname(self.path)} is in use by another training run (process {holder}); "
                              "one workdir has one writer: wait for it, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every setting that differs (lists and tuples alike)."""
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def has_trained_state(workdir: str) -> bool:
    """Whether ``workdir`` holds resumable states (``checkpoints/``) or a final model (``checkpoint/``)."""
    return storage.isdir(storage.join(workdir, CHECKPOINT_DIR)) or bool(storage.listdir(storage.join(workdir, CHECKPOINTS_DIR)))


def check_resume(workdir: str, config_json: str, allow_changes: bool) -> dict[str, tuple]:
    """Refuse to continue a workdir's checkpoints under other settings than they were trained with, naming
    the keys, unless ``allow_changes``; returns the changes (empty for a fresh or identical run)."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.isfile(path) or not has_trained_state(workdir):
        return {}  # nothing was trained under the old record: it is simply replaced
    changes = config_changes(json.loads(storage.read_text(path)), json.loads(config_json))
    if changes and not allow_changes:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
        more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
        raise ConfigError(f"{workdir} holds a run with other settings ({shown}{more}); resume with the same "
                          "config, use a new --workdir, or pass --allow_config_change to continue under the new ones")
    return changes


def write_config(workdir: str, config_json: str, changes: dict, step: int) -> None:
    """Write ``config.json`` atomically; a changed config keeps the previous one as ``config.step_<N>.json``."""
    path = storage.join(workdir, CONFIG_FILE)
    if changes and storage.isfile(path):
        write_text_atomic(storage.join(workdir, f"config.step_{step}.json"), storage.read_text(path))
    write_text_atomic(path, config_json)
