"""Device mesh and logical-axis rules: how parameters, activations and caches map onto the mesh.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters sharded
ZeRO-3 style) and ``tensor`` (Megatron-style model parallelism over heads and MLP width).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). Unlisted names are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    # KV cache
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def make_mesh(shape: Sequence[int] = (1, -1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with ``Auto`` axis types (Linen's logical constraints need them); one -1 entry takes the
    remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1 entry")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape),
                         devices=devices)


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (e.g. 2 KV heads on tensor=4): those
    dimensions are replicated instead of failing to shard."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        fitted.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fitted)


def param_shardings(module: nn.Module, mesh: Mesh, *init_args, rules=DEFAULT_RULES, **init_kwargs) -> Any:
    """Shardings for ``module``'s params, derived from ``jax.eval_shape`` of its init (no allocation)."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args, **init_kwargs))
    shardings = logical_to_sharding(nn.get_partition_spec(abstract)["params"], mesh, rules)
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s.spec, a.shape, mesh)),
                        shardings, nn.unbox(abstract["params"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
