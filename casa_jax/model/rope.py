"""Rotary position embeddings: plain 1-D RoPE and Qwen2.5's multimodal M-RoPE.

M-RoPE feeds three position streams (temporal, height, width) into consecutive chunks of the rotary
frequencies: chunk i of ``mrope_section`` takes stream ``i % 3``. Text-only inputs use three equal
streams, which makes M-RoPE identical to 1-D RoPE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:  # [head_dim // 2] float32
    """1 / theta^(2i / d), computed in float32 exactly as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def stream_of_frequency(head_dim: int, mrope_section: tuple[int, ...] | None) -> np.ndarray:
    """For each of the head_dim // 2 frequencies, which position stream (0, 1, 2) drives it."""
    if mrope_section is None:
        return np.zeros(head_dim // 2, dtype=np.int32)
    return np.concatenate([np.full(n, i % 3, dtype=np.int32) for i, n in enumerate(mrope_section)])


def as_three_streams(positions: jax.Array) -> jax.Array:
    """[B, T] -> [3, B, T] (equal streams); [3, B, T] passes through."""
    if positions.ndim == 2:
        return jnp.broadcast_to(positions[None], (3,) + positions.shape)
    if positions.ndim == 3 and positions.shape[0] == 3:
        return positions
    raise ValueError(f"positions must be [batch, length] or [3, batch, length], got shape {positions.shape}")


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                   mrope_section: tuple[int, ...] | None, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] for positions [B, T] or [3, B, T]."""
    positions = as_three_streams(positions)
    streams = stream_of_frequency(head_dim, mrope_section)
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
    # pick, per frequency, the position stream that drives it: [3, B, T] -> [B, T, head_dim // 2]
    per_freq_pos = jnp.moveaxis(positions[streams], 0, -1).astype(jnp.float32)
    angles = per_freq_pos * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated by cos/sin [B, T, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Text positions that skip padding, as transformers derives them: cumsum(mask) - 1, pads set to 1."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.where(mask == 1, jnp.cumsum(mask, axis=-1) - 1, 1)
