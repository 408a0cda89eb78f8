"""Multi-process JAX: start-up, one writer, barriers and host copies of arrays that span processes.

A pod runs one process per host; tests run several processes on one machine with CPU devices and gloo
collectives. Both start through ``initialize``: on Cloud TPU the coordinator and process ids are
discovered, elsewhere they are given (``--coordinator_address``, ``--num_processes``, ``--process_id``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` with CPU collectives over gloo (so a mesh of CPU devices can span
    processes); call it before any other JAX work. All three arguments None: discovered (Cloud TPU)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def is_writer() -> bool:
    """Whether this process writes the files every process would otherwise write (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def shared_token() -> int:
    """A random 63-bit number drawn by process 0 and the same on every process (e.g. a shared temp name)."""
    token = np.random.default_rng().integers(0, 2**63 - 1, dtype=np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        token = multihost_utils.broadcast_one_to_all(token)
    return int(token)


def to_host(tree: Any) -> Any:
    """NumPy copies of a tree's arrays, whole on every process, however they are sharded (a global array
    spanning processes is gathered with ``process_allgather``; ``np.asarray`` would refuse it)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every process holds it whole already
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)
