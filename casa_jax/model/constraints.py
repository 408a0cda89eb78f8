"""Sharding constraints by logical axis names that never fail on an odd shape.

``constrain(x, names)`` maps logical names to mesh axes by the active ``nn.logical_axis_rules`` and lays
``x`` out that way under the active mesh (``sharding.rules_context``); a mesh axis that does not divide
its dimension (3 prompts on 2 data shards, 2 KV heads on tensor=4) is dropped for that dimension, so
the array is replicated there instead of the trace failing. Without a mesh or rules it returns ``x``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import PartitionSpec


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return x
    axes = nn.logical_to_mesh_axes(tuple(names))
    fitted = []
    for dim, ax in zip(x.shape, tuple(axes) + (None,) * (x.ndim - len(axes))):
        group = (ax,) if isinstance(ax, str) else tuple(ax or ())
        size = int(np.prod([mesh.shape[a] for a in group])) if group else 1
        fitted.append(ax if group and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*fitted))
