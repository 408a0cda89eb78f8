"""Where training batches and train states live on the mesh (parameter placement is ``casa_jax.sharding``):
batches split over the data-parallel axes, optimizer state beside the parameter it mirrors.

Shardings come from the arrays' logical names (``nn.get_partition_spec`` of an abstract init) mapped by
the rules table; ``fit_spec`` replicates a dimension an axis does not divide. On a pod each process
contributes its slice of the batch and ``jax.make_array_from_process_local_data`` assembles the
global array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the data-parallel axes; everything else replicated (leading dim only)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (NumPy pytree) -> global jax.Arrays split over the data axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(abstract_state, trainable_shardings, mesh: Mesh) -> Any:
    """Shardings for a train state: every optimizer-state leaf that mirrors a parameter (Adam's mu, nu,
    ...) gets that parameter's sharding; counters and other scalars are replicated."""
    by_path = {_dict_keys(path): sh for path, sh in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}
    longest = max((len(k) for k in by_path), default=0)
    rep = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _dict_keys(path)
        for n in range(min(len(keys), longest), 0, -1):
            sh = by_path.get(keys[-n:])
            if sh is not None and len(sh.spec) <= len(getattr(leaf, "shape", ())):
                return sh
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_state)
