"""Sampling strategies: small frozen dataclasses mapping (logits [B, V], rng) -> token ids [B]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Greedy:
    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
    """Softmax sampling at ``temperature``, optionally restricted to the ``top_k`` most likely tokens."""

    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use Greedy for 0), got {self.temperature}")

    def __call__(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def from_temperature(temperature: float, top_k: int | None = None):
    return Greedy() if temperature == 0 else Temperature(temperature, top_k)
