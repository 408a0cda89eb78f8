"""Where every training array lives on the mesh: frozen params and LoRA by their logical axis names,
the safety head replicated, batches split over the data-parallel axes.

Shardings come from the arrays' logical names (``nn.get_partition_spec`` of an abstract init) mapped by
the rules table; ``fit_spec`` replicates a dimension an axis does not divide. On a pod each process
contributes its slice of the batch and ``jax.make_array_from_process_local_data`` assembles the
global array.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from casa_jax.model.config import TextConfig
from casa_jax.model.layers import LORA_COLLECTION
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.sharding import DEFAULT_RULES, fit_spec, logical_to_sharding

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over


def _fitted(logical, abstract, mesh: Mesh, rules) -> Any:
    shardings = logical_to_sharding(logical, mesh, rules)
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s.spec, a.shape, mesh)), shardings, abstract)


def decoder_shardings(text: TextConfig, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, Any]:
    """{"params": ..., "lora": ...} shardings of the decoder's collections (lora only when lora_rank > 0)."""
    boxed = jax.eval_shape(lambda: CausalLM(text).init(jax.random.key(0), *init_inputs()))
    specs = nn.get_partition_spec(boxed)
    return {name: _fitted(specs[name], nn.unbox(boxed[name]), mesh, rules)
            for name in ("params", LORA_COLLECTION) if name in boxed}


def replicated(tree, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over the data-parallel axes; everything else replicated (leading dim only)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (NumPy pytree) -> global jax.Arrays split over the data axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


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
