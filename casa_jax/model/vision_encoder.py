"""Qwen2.5-Omni vision encoder in Flax: patch embedding, 2-D RoPE, window attention, patch merger.

Numerically equal to transformers' ``Qwen2_5OmniVisionEncoder``. The data-dependent bookkeeping
(window order, segments, positions) arrives precomputed in a ``VisionLayout`` so every array here has
a static, bucketed shape: one compilation serves every mix of image sizes in a bucket. Windows sit in
fixed-size slots, so window attention costs O(N * window) rather than O(N^2); full-attention blocks
attend within each frame under a dense mask.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from casa_jax.model.attention import block_attention, masked_softmax
from casa_jax.model.encoder_config import VisionConfig
from casa_jax.model.layers import Dense, RMSNorm, gelu_exact
from casa_jax.model.vision_layout import PAD_SEGMENT, window_capacity

PATCH_AXES = ("vision_patch", "embed")


def vision_rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [N, 2] (h, w) -> cos, sin [N, head_dim]: half the frequencies per axis, rotate-half layout."""
    quarter = jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2)
    inv_freq = 1.0 / (theta ** quarter)  # [head_dim // 4]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim // 4]
    freqs = freqs.reshape(positions.shape[0], -1)  # [N, head_dim // 2]: h frequencies, then w
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:  # x [N, H, D]; cos/sin [N, D]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def _attend(q, k, v, mask):  # q/k/v [..., N, H, D]; mask [..., N, N] bool -> [..., N, H, D]
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    probs = masked_softmax(scores, mask[..., None, :, :]).astype(q.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


def full_attention(q, k, v, frame_segment):
    """Attention within each frame (all slots of a frame see each other): dense [N, N] under a mask."""
    return _attend(q, k, v, frame_segment[:, None] == frame_segment[None, :])


def window_attention(q, k, v, frame_segment, slot_size):
    """Attention within each window slot: [N / slot, slot, slot] blocks, padding keys masked, heads ahead
    of the slots for the batched dots (``block_attention``)."""
    n, h, d = q.shape
    blocks = lambda a: jnp.swapaxes(a.reshape(n // slot_size, slot_size, h, d), 1, 2)  # noqa: E731 [W, H, slot, D]
    valid = (frame_segment != PAD_SEGMENT).reshape(n // slot_size, slot_size)
    out = block_attention(blocks(q * d ** -0.5), blocks(k), blocks(v), valid)
    return jnp.swapaxes(out, 1, 2).reshape(n, h, d)


class VisionAttention(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, frame_segment, is_full):  # x [N, C]; is_full: [] bool
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), use_bias=True)
        heads = (cfg.num_heads, cfg.head_dim)
        q = Dense(heads, ("embed", "q_heads", "head_dim"), name="q", **kw)(x)
        k = Dense(heads, ("embed", "q_heads", "head_dim"), name="k", **kw)(x)
        v = Dense(heads, ("embed", "q_heads", "head_dim"), name="v", **kw)(x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        slot = window_capacity(cfg) * cfg.merge_unit
        out = jax.lax.cond(is_full, full_attention, functools.partial(window_attention, slot_size=slot),
                           q, k, v, frame_segment)
        return Dense((x.shape[-1],), ("q_heads", "head_dim", "embed"), in_axes=2, name="proj", **kw)(out)


class VisionMLP(nn.Module):
    """SwiGLU with biases (the vision tower's MLP)."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), use_bias=True)
        gate = Dense((cfg.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense((cfg.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x)
        return Dense((x.shape[-1],), ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class VisionBlock(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x, cos, sin, frame_segment, is_full):  # x [N, C]; is_full: scanned per block
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = x + VisionAttention(cfg, name="attn")(RMSNorm(cfg.rms_norm_eps, name="norm1", **kw)(x), cos, sin,
                                                  frame_segment, is_full)
        x = x + VisionMLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="norm2", **kw)(x))
        return x, None


class PatchMerger(nn.Module):
    """RMSNorm, then each group of ``merge_unit`` consecutive patches -> one decoder-width token."""

    config: VisionConfig

    @nn.compact
    def __call__(self, x):  # [N, C] -> [N / unit, out_hidden_size]
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = RMSNorm(cfg.rms_norm_eps, name="ln_q", **kw)(x)
        wide = cfg.hidden_size * cfg.merge_unit
        x = x.reshape(-1, wide)
        x = Dense((wide,), ("embed", "mlp"), use_bias=True, name="fc1", **kw)(x)
        x = gelu_exact(x)
        return Dense((cfg.out_hidden_size,), ("mlp", "embed"), use_bias=True, name="fc2", **kw)(x)


class VisionEncoder(nn.Module):
    """pixel_values [N_pad, patch_dim] + ``VisionLayout.arrays()`` -> tokens [N_pad / unit, out_hidden_size].

    Rows past the layout's real patches are padding; their output tokens are garbage-free but meaningless.
    """

    config: VisionConfig

    @nn.compact
    def __call__(self, pixel_values, patch_order, positions, frame_segment, restore_order):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # The 3-D convolution has stride == kernel, so it is one matmul over flattened patches.
        x = Dense((cfg.hidden_size,), PATCH_AXES, name="patch_embed", dtype=dtype,
                  param_dtype=param_dtype)(pixel_values)
        x = jnp.take(x, patch_order, axis=0)  # window order
        cos, sin = vision_rotary(positions, cfg.head_dim, cfg.rope_theta)
        is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])
        blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(cfg, name="blocks")(x, cos, sin, frame_segment, is_full)
        tokens = PatchMerger(cfg, name="merger")(x)
        return jnp.take(tokens, restore_order, axis=0)
