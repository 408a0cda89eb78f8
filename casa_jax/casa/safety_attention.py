"""SafetyAttention: how unsafe does the prompt look? One v_s in (0, 1) per sequence.

The query is a learned projection of the frozen pretrained embedding of the unsafe token; keys (and,
for attention pooling, values) are projections of stop-gradient prompt hidden states. Scores over the
prompt positions (padding and the safety position masked) are aggregated over time into v_s, which
re-weights the two safety-token logits at the safety step. The exact equation is not public; this is
the reconstruction documented in WORKSPACE.md, with its variants selectable in ``CasaConfig``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from casa_jax.casa.config import CasaConfig

EPS = 1e-6


class SafetyAttention(nn.Module):
    config: CasaConfig

    @nn.compact
    def __call__(self, query_embedding: jax.Array, hidden: jax.Array, prompt_mask: jax.Array) -> jax.Array:
        """query_embedding [E]; hidden [B, T, E]; prompt_mask [B, T] bool -> v_s [B] float32."""
        cfg = self.config
        dim = cfg.attention_dim
        init = nn.initializers.normal(stddev=0.02)
        query = jax.lax.stop_gradient(query_embedding.astype(jnp.float32))
        hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))  # never train the prompt states through v_s
        q = nn.Dense(dim, name="query", kernel_init=init)(query)  # [dim]
        k = nn.Dense(dim, name="key", kernel_init=init)(hidden)  # [B, T, dim]
        scores = jnp.einsum("btd,d->bt", k, q) * dim ** -0.5 + self.param("score_bias", nn.initializers.zeros, ())
        mask = prompt_mask.astype(bool)
        count = jnp.maximum(mask.sum(-1), 1)
        if cfg.aggregation == "mean":
            v = jnp.sum(jnp.where(mask, jax.nn.sigmoid(scores), 0.0), -1) / count
        elif cfg.aggregation == "max":
            v = jax.nn.sigmoid(jnp.max(jnp.where(mask, scores, -1e9), -1))
        else:  # attention-pooled values, read out to one logit
            weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
            values = nn.Dense(dim, name="value", kernel_init=init)(hidden)
            pooled = jnp.einsum("bt,btd->bd", weights, values)
            v = jax.nn.sigmoid(nn.Dense(1, name="readout", kernel_init=init)(pooled)[..., 0])
        return jnp.clip(v, EPS, 1 - EPS)


def safety_pair_logits(logits: jax.Array, v_s: jax.Array, safe_id: int, unsafe_id: int, scaling: str) -> jax.Array:
    """logits [B, V] at the safety step, v_s [B] -> the two surviving logits [B, 2] = (safe, unsafe).

    ``log``: l_unsafe + log v_s and l_safe + log(1 - v_s), so p(unsafe) = sigmoid(l_u - l_s + logit(v_s)).
    ``multiplicative``: v_s * l_unsafe and (1 - v_s) * l_safe, as the paper words it.
    """
    safe, unsafe = logits[:, safe_id].astype(jnp.float32), logits[:, unsafe_id].astype(jnp.float32)
    if scaling == "log":
        return jnp.stack([safe + jnp.log1p(-v_s), unsafe + jnp.log(v_s)], axis=-1)
    return jnp.stack([(1 - v_s) * safe, v_s * unsafe], axis=-1)


def safety_step_logits(logits: jax.Array, v_s: jax.Array, safe_id: int, unsafe_id: int, scaling: str) -> jax.Array:
    """Full-vocabulary logits [B, V] in which only the two re-weighted safety tokens survive."""
    pair = safety_pair_logits(logits, v_s, safe_id, unsafe_id, scaling)
    out = jnp.full(logits.shape, -jnp.inf, jnp.float32)
    return out.at[:, safe_id].set(pair[:, 0]).at[:, unsafe_id].set(pair[:, 1])
