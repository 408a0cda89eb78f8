"""SafetyAttention: how unsafe does the prompt look? One v_s in (0, 1) per sequence.

The query is a learned projection of the frozen pretrained embedding of the unsafe token; keys (and,
for attention pooling, values) are projections of stop-gradient prompt hidden states. Scores over the
prompt positions (padding and the safety position masked) are aggregated over time into v_s, which
re-weights the two safety-token logits at the safety step. The exact equation is not public; this is
the reconstruction documented in WORKSPACE.md, with its variants selectable in ``CasaConfig``.

The head returns v_s in log-odds, ``z = log v_s - log(1 - v_s)``, computed from the scores with
``log_sigmoid`` / logsumexp and never clipped, so the loss keeps a gradient however sure the head is
(a clipped probability has none once it saturates). ``v_s = sigmoid(z)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from casa_jax.casa.config import CasaConfig


class SafetyAttention(nn.Module):
    config: CasaConfig

    @nn.compact
    def __call__(self, query_embedding: jax.Array, hidden: jax.Array, prompt_mask: jax.Array) -> jax.Array:
        """query_embedding [E]; hidden [B, T, E]; prompt_mask [B, T] bool -> v_s as log-odds [B] float32."""
        cfg = self.config
        dim = cfg.attention_dim
        init = nn.initializers.normal(stddev=0.02)
        query = jax.lax.stop_gradient(query_embedding.astype(jnp.float32))
        hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))  # never train the prompt states through v_s
        q = nn.Dense(dim, name="query", kernel_init=init)(query)  # [dim]
        k = nn.Dense(dim, name="key", kernel_init=init)(hidden)  # [B, T, dim]
        scores = jnp.einsum("btd,d->bt", k, q) * dim ** -0.5 + self.param("score_bias", nn.initializers.zeros, ())
        mask = prompt_mask.astype(bool)
        if not cfg.use_safety_attention:  # the ablation: the safety token alone, v_s = 1/2 (z = 0)
            return jnp.zeros(hidden.shape[:1], jnp.float32)
        log_count = jnp.log(jnp.maximum(mask.sum(-1), 1).astype(jnp.float32))
        if cfg.aggregation == "mean":  # v = mean_t sigmoid(s_t), in log space on both sides
            log_v = _masked_logsumexp(jax.nn.log_sigmoid(scores), mask) - log_count
            log_1mv = _masked_logsumexp(jax.nn.log_sigmoid(-scores), mask) - log_count
            return log_v - log_1mv
        if cfg.aggregation == "max":  # v = sigmoid(max_t s_t)
            return jnp.max(jnp.where(mask, scores, -1e9), -1)
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)  # attention-pooled values -> one logit
        values = nn.Dense(dim, name="value", kernel_init=init)(hidden)
        pooled = jnp.einsum("bt,btd->bd", weights, values)
        return nn.Dense(1, name="readout", kernel_init=init)(pooled)[..., 0]


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:  # [B, T] -> [B]
    return jax.nn.logsumexp(jnp.where(mask, x, -1e30), axis=-1)  # finite fill: no NaN gradient at masked slots


def v_s_from_logit(z: jax.Array) -> jax.Array:
    """v_s in (0, 1) from the head's log-odds."""
    return jax.nn.sigmoid(z)


def safety_pair_logits(logits: jax.Array, v_logit: jax.Array, safe_id: int, unsafe_id: int, scaling: str) -> jax.Array:
    """logits [B, V] at the safety step, v_s in log-odds [B] -> the two surviving logits [B, 2] = (safe, unsafe).

    ``log``: l_unsafe + log v_s and l_safe + log(1 - v_s) (as ``log_sigmoid(+-z)``), so
    p(unsafe) = sigmoid(l_u - l_s + z). ``multiplicative``: v_s * l_unsafe and (1 - v_s) * l_safe, as the
    paper words it.
    """
    safe, unsafe = logits[:, safe_id].astype(jnp.float32), logits[:, unsafe_id].astype(jnp.float32)
    if scaling == "log":
        return jnp.stack([safe + jax.nn.log_sigmoid(-v_logit), unsafe + jax.nn.log_sigmoid(v_logit)], axis=-1)
    v_s = v_s_from_logit(v_logit)
    return jnp.stack([(1 - v_s) * safe, v_s * unsafe], axis=-1)


def safety_step_logits(logits: jax.Array, v_logit: jax.Array, safe_id: int, unsafe_id: int, scaling: str) -> jax.Array:
    """Full-vocabulary logits [B, V] in which only the two re-weighted safety tokens survive."""
    pair = safety_pair_logits(logits, v_logit, safe_id, unsafe_id, scaling)
    out = jnp.full(logits.shape, -jnp.inf, jnp.float32)
    return out.at[:, safe_id].set(pair[:, 0]).at[:, unsafe_id].set(pair[:, 1])
