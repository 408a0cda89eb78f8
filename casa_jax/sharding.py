"""Device mesh and logical-axis rules: how parameters, activations and caches map onto the mesh.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters sharded
ZeRO-3 style) and ``tensor`` (Megatron-style model parallelism over heads and MLP width).
"""

from __future__ import annotations

import contextlib
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
    return _fitted(nn.get_partition_spec(abstract)["params"], nn.unbox(abstract["params"]), mesh, rules)


def decoder_shardings(text, mesh: Mesh, rules=DEFAULT_RULES, lora=None) -> dict[str, Any]:
    """{"params": ..., "lora": ...} shardings of a decoder's collections (lora only with a ``LoraSpec``
    of rank > 0)."""
    from casa_jax.model.layers import LORA_COLLECTION, LoraSpec
    from casa_jax.model.text_decoder import CausalLM, init_inputs
    boxed = jax.eval_shape(lambda: CausalLM(text, lora or LoraSpec()).init(jax.random.key(0), *init_inputs()))
    specs = nn.get_partition_spec(boxed)
    return {name: _fitted(specs[name], nn.unbox(boxed[name]), mesh, rules)
            for name in ("params", LORA_COLLECTION) if name in boxed}


def _fitted(logical, abstract, mesh: Mesh, rules) -> Any:
    shardings = logical_to_sharding(logical, mesh, rules)
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s.spec, a.shape, mesh)), shardings, abstract)


def replicated(tree, mesh: Mesh) -> Any:
    """A replicated NamedSharding for every leaf of ``tree``."""
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def place(tree, shardings) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def rules_from_config(pairs: Sequence[Sequence[Any]] | None) -> tuple:
    """A config's ``logical_axis_rules`` (pairs of logical name, mesh axis / tuple / None) as a rules table."""
    if not pairs:
        return DEFAULT_RULES
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"logical_axis_rules entry {pair!r} must be (logical_name, mesh_axes)")
        name, axes = pair
        out.append((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


@contextlib.contextmanager
def rules_context(mesh: Mesh | None, rules=DEFAULT_RULES):
    """The mesh and logical-axis rules under which jitted functions are traced and run, so the model's
    ``model.constraints.constrain`` calls (activations, KV cache) take effect; a no-op without a mesh."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield
