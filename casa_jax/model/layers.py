"""Basic layers with logical axis names on every parameter: dense (with optional LoRA), embedding,
RMSNorm, SwiGLU MLP, and the exact GELU of the encoders."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.constraints import constrain

Dtype = jnp.dtype
default_kernel_init = nn.initializers.normal(stddev=0.02)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), through erf as PyTorch's ``gelu`` computes it. Equal to
    ``jax.nn.gelu(x, approximate=False)`` to float32 rounding and about 6x faster on CPU, where the erfc
    form XLA lowers that to evaluates two rational approximations, divisions and an exp per element."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


LORA_COLLECTION = "lora"
QUANT_COLLECTION = "quant"  # int8 kernels + scales, or bf16 kernels (``model.quantize``), instead of params'


def model_variables(params, lora=None, quant=None) -> dict:
    """The variables dict a decoder applies: ``{"params": ...}``, plus the LoRA collection and the int8
    weights (``model.quantize.quantize_int8``) when given."""
    variables = {"params": params}
    if lora is not None:
        variables[LORA_COLLECTION] = lora
    if quant is not None:
        variables[QUANT_COLLECTION] = quant
    return variables


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the Dense layers whose names are in ``targets``: W x + (alpha / rank) B A x.

    Not part of the architecture (``TextConfig``): a decoder takes it beside its config
    (``CausalLM(config, lora=...)``), and a trained checkpoint stores it on its own. Rank 0: no adapters."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        from casa_jax.model.config import ConfigError
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(f"LoRA targets {unknown} are not decoder projections; choose from {LORA_TARGETS}")
        if int(self.rank) < 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA: rank={self.rank} must be >= 0 and dropout={self.dropout} in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d) -> "LoraSpec":
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(d["targets"]))

    def for_layer(self, name: str) -> dict:
        """Dense keyword arguments for the layer called ``name`` (empty when it gets no adapter)."""
        if self.rank <= 0 or name not in self.targets:
            return {}
        return dict(lora_rank=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout)


# Fused bf16 kernels (``quantize.quantize_bf16``): block -> (variable name, the Dense layers it joins, in order)
FUSED_KERNELS = {"self_attn": ("qkv_kernel", ("q_proj", "k_proj", "v_proj")),
                 "mlp": ("gate_up_kernel", ("gate_proj", "up_proj"))}
BF16_MIN_ROWS = 4  # XLA's CPU bf16 dot with one row falls back to a loop ~7x slower; 4 rows measured fastest


def bf16_dot(x: jax.Array, kernel: jax.Array, in_axes: int) -> jax.Array:
    """x [..., *in] @ a bfloat16 kernel [*out, *in] -> float32 [..., *out]: x rounded to bf16, products
    accumulated in float32 (the CPU's native bf16 dot: AMX / avx512_bf16). Fewer than ``BF16_MIN_ROWS``
    rows are zero-padded to it first: on XLA's CPU backend the one-row product takes a slow path (105 vs
    13 ms for SmolLM2's 210 layer products on a 2-core Intel Xeon with AMX; 2 rows: 15 ms)."""
    lead, in_shape = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:]
    n_out = kernel.ndim - in_axes
    rows = x.reshape((-1,) + in_shape).astype(jnp.bfloat16)
    n = rows.shape[0]
    if n < BF16_MIN_ROWS:
        rows = jnp.pad(rows, ((0, BF16_MIN_ROWS - n),) + ((0, 0),) * in_axes)
    y = jax.lax.dot_general(rows, kernel, ((tuple(range(1, 1 + in_axes)), tuple(range(n_out, kernel.ndim))),
                                           ((), ())), preferred_element_type=jnp.float32)
    return y[:n].reshape(lead + kernel.shape[:n_out])


def fused_products(module: nn.Module, block: str, x: jax.Array, features: dict) -> dict:
    """The base products of the Dense layers ``FUSED_KERNELS[block]`` joins, which all read ``x`` [..., in],
    from its one fused bf16 kernel in ``module``'s ``"quant"`` (``quantize.quantize_bf16``; [sum of outputs,
    in], in ``FUSED_KERNELS`` order): {layer: [..., *features[layer]]}; {} when there is no such kernel. One
    product instead of two or three halves the small-matrix calls of a CPU decode step."""
    name, layers = FUSED_KERNELS[block]
    if not module.has_variable(QUANT_COLLECTION, name):
        return {}
    y = bf16_dot(x, module.get_variable(QUANT_COLLECTION, name), 1)
    out, start = {}, 0
    for layer in layers:
        size = int(np.prod(features[layer]))
        out[layer] = y[..., start:start + size].reshape(y.shape[:-1] + tuple(features[layer]))
        start += size
    return out


class Dense(nn.Module):
    """x @ W (+ b) over the trailing input axes, with logical names for the kernel's in and out axes.

    ``features`` may be a tuple (e.g. ``(heads, head_dim)``); ``in_axes`` contracts that many trailing
    input dims. The kernel is stored ``[*in_dims, *out_dims]`` and cast to ``dtype`` for the matmul.

    Under a ``"quant"`` collection holding this layer's ``kernel`` (int8, stored ``[*out_dims, *in_dims]``)
    and ``scale`` [*out_dims], the kernel is read from there instead of params: x @ W = (x @ q) * scale,
    per output channel, so the decode reads a quarter of the weight bytes. A ``"quant"`` kernel without a
    scale is bfloat16 ``[*out_dims, *in_dims]`` (half the bytes), multiplied by ``bf16_dot``.

    With ``lora_rank > 0`` the layer owns a LoRA pair in the separate ``"lora"`` collection
    (``lora_a [*in_dims, r]``, normal init; ``lora_b [r, *out_dims]``, zero init, so training starts
    from the base model). Applied without that collection, the layer is the plain base layer: the same
    module serves as the frozen reference. Dropout on the adapter input needs a ``"dropout"`` rng.
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool = False
    in_axes: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, base: jax.Array | None = None) -> jax.Array:  # [..., *in] -> [..., *features]
        """``base`` [..., *features]: x @ W already computed by a fused product (``fused_products``); only
        the bias and the LoRA adapter are added to it."""
        in_shape = x.shape[x.ndim - self.in_axes:]
        features = tuple(self.features)
        x = x.astype(self.dtype)
        in_dims = tuple(range(x.ndim - self.in_axes, x.ndim))
        if base is not None:
            y = base.astype(self.dtype)
        elif self.has_variable(QUANT_COLLECTION, "kernel") and self.has_variable(QUANT_COLLECTION, "scale"):
            q = self.get_variable(QUANT_COLLECTION, "kernel")  # int8 [*out, *in]: contract its trailing dims
            y = jax.lax.dot_general(x, q.astype(self.dtype),
                                    ((in_dims, tuple(range(len(features), q.ndim))), ((), ())))
            y = y * self.get_variable(QUANT_COLLECTION, "scale").astype(self.dtype)
        elif self.has_variable(QUANT_COLLECTION, "kernel"):  # bfloat16 [*out, *in]
            y = bf16_dot(x, self.get_variable(QUANT_COLLECTION, "kernel"), self.in_axes).astype(self.dtype)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(default_kernel_init, self.kernel_axes),
                in_shape + features, self.param_dtype)
            y = jax.lax.dot_general(x, kernel.astype(self.dtype),
                                    ((in_dims, tuple(range(self.in_axes))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   self.kernel_axes[self.in_axes:]),
                              features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora_rank > 0 and (self.is_initializing() or self.has_variable(LORA_COLLECTION, "lora_a")):
            y = y + self._lora(x, in_shape, features, in_dims)
        return y

    def _lora(self, x, in_shape, features, in_dims):
        r = self.lora_rank
        in_names, out_names = self.kernel_axes[:self.in_axes], self.kernel_axes[self.in_axes:]
        fan_in = int(np.prod(in_shape))
        a = self.variable(LORA_COLLECTION, "lora_a", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=fan_in ** -0.5), in_names + ("lora_rank",)),
            self.make_rng("params") if self.is_initializing() else None, in_shape + (r,), self.param_dtype).value
        b = self.variable(LORA_COLLECTION, "lora_b", nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("lora_rank",) + out_names),
            None, (r,) + features, self.param_dtype).value
        if self.lora_dropout > 0 and self.has_rng("dropout"):
            x = nn.Dropout(self.lora_dropout, deterministic=False)(x, rng=self.make_rng("dropout"))
        down = jax.lax.dot_general(x, a.astype(self.dtype), ((in_dims, tuple(range(self.in_axes))), ((), ())))
        return lora_up(down * jnp.asarray(self.lora_alpha / r, self.dtype), b.astype(self.dtype))


@jax.custom_vjp
def lora_up(down: jax.Array, b: jax.Array) -> jax.Array:  # [..., r], [r, *out] -> [..., *out]
    """The adapter's up-projection, ``down @ b``, with a backward pass that takes ``b``'s gradient as
    ``down^T @ g``. Autodiff's own rule computes it as ``g^T @ down``, and XLA's CPU compiler then
    transposes the large cotangent ``g`` [tokens, out] in memory for every adapted layer (a fifth of a
    LoRA training step in the train-step benchmark); here only the small ``down`` [tokens, r] is."""
    return jnp.tensordot(down, b, axes=1)


def _lora_up_fwd(down, b):
    return lora_up(down, b), (down, b)


def _lora_up_bwd(saved, g):  # g [..., *out]
    down, b = saved
    lead = down.ndim - 1
    d_down = jax.lax.dot_general(g, b, ((tuple(range(lead, g.ndim)), tuple(range(1, b.ndim))), ((), ())))
    d_b = jax.lax.dot_general(down, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
    return d_down.astype(down.dtype), d_b.astype(b.dtype)


lora_up.defvjp(_lora_up_fwd, _lora_up_bwd)


class Embed(nn.Module):
    """Token embedding table ``[vocab, embed]``; ``attend`` reuses it as a tied LM head (from a bfloat16
    copy ``[vocab, embed]`` in the ``"quant"`` collection when there is one)."""

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
        if self.has_variable(QUANT_COLLECTION, "attend"):  # a bf16 copy of the table (``quantize_bf16``)
            return bf16_dot(x, self.get_variable(QUANT_COLLECTION, "attend"), 1).astype(self.dtype)
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
    lora: LoraSpec = LoraSpec()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, E] -> [B, T, E]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        base = fused_products(self, "mlp", x, {"gate_proj": (self.intermediate_size,),
                                               "up_proj": (self.intermediate_size,)})
        gate = Dense((self.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw,
                     **self.lora.for_layer("gate_proj"))(x, base.get("gate_proj"))
        up = Dense((self.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw,
                   **self.lora.for_layer("up_proj"))(x, base.get("up_proj"))
        h = nn.silu(gate) * up
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense((x.shape[-1],), ("mlp", "embed"), name="down_proj", **kw, **self.lora.for_layer("down_proj"))(h)
