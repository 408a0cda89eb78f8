"""An explicit key/value cache pytree for prefill and one-token decode steps.

All sequences in a batch share one write index (prompts are padded to a common length, left or right);
``valid`` marks which slots hold real tokens so padding is never attended to.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

# Logical axis names of the cache arrays, mapped to mesh axes by the sharding rules.
CACHE_AXES = ("cache_layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")


@flax.struct.dataclass
class KVCache:
    keys: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    values: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    valid: jax.Array  # [batch, max_length] bool: slot holds a real (non-padding) token
    index: jax.Array  # [] int32: number of slots written so far (same for every row)

    def constrained(self) -> "KVCache":
        """The cache with its logical sharding (``CACHE_AXES``) as constraints: under a mesh and the rules
        (``sharding.rules_context``) keys/values are laid out as the rules say; elsewhere a no-op."""
        from casa_jax.model.constraints import constrain
        return KVCache(keys=constrain(self.keys, CACHE_AXES),
                       values=constrain(self.values, CACHE_AXES),
                       valid=constrain(self.valid, CACHE_AXES[1:3]), index=self.index)

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def zeros(cls, *, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32)).constrained()

    @classmethod
    def for_config(cls, config, batch: int, max_length: int, dtype=None) -> "KVCache":
        """An empty cache sized for a ``TextConfig``."""
        return cls.zeros(num_layers=config.num_hidden_layers, batch=batch, max_length=max_length,
                         num_kv_heads=config.num_key_value_heads, head_dim=config.resolved_head_dim,
                         dtype=dtype or jnp.dtype(config.dtype))
