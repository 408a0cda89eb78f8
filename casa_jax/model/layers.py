"""Basic layers with logical axis names on every parameter: dense, embedding, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype
default_kernel_init = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """x @ W (+ b) over the trailing input axes, with logical names for the kernel's in and out axes.

    ``features`` may be a tuple (e.g. ``(heads, head_dim)``); ``in_axes`` contracts that many trailing
    input dims. The kernel is stored ``[*in_dims, *out_dims]`` and cast to ``dtype`` for the matmul.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool = False
    in_axes: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., *in] -> [..., *features]
        in_shape = x.shape[x.ndim - self.in_axes:]
        features = tuple(self.features)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(default_kernel_init, self.kernel_axes),
            in_shape + features, self.param_dtype)
        x = x.astype(self.dtype)
        in_dims = tuple(range(x.ndim - self.in_axes, x.ndim))
        y = jax.lax.dot_general(x, kernel.astype(self.dtype),
                                ((in_dims, tuple(range(self.in_axes))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.kernel_axes[self.in_axes:]),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """Token embedding table ``[vocab, embed]``; ``attend`` reuses it as a tied LM head."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
            (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:  # [B, T] int -> [B, T, E]
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, E] -> [B, T, V]
        return jnp.einsum("bte,ve->btv", x.astype(self.dtype), self.embedding.astype(self.dtype))


class RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalise in fp32, cast back, then scale."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., E] -> [..., E]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, E] -> [B, T, E]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = Dense((self.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Dense((self.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x)
        h = nn.silu(gate) * up
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((x.shape[-1],), ("mlp", "embed"), name="down_proj", **kw)(h)
