"""LoRA adapters of the text decoder: initialise, merge into the base kernels, unmerge.

Adapters live in their own ``"lora"`` collection (see ``layers.Dense``), mirroring the params tree at the
targeted projections: ``{..., "q_proj": {"lora_a": [L, E, r], "lora_b": [L, r, H, D]}}``. The base
params never change during LoRA training; merging folds ``(alpha / r) A B`` into the kernels for export
or adapter-free serving.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from casa_jax.model.config import TextConfig
from casa_jax.model.layers import LORA_COLLECTION, LoraSpec
from casa_jax.model.text_decoder import CausalLM, init_inputs

LoraConfig = LoraSpec  # LoRA's own config: rank, alpha, dropout, targets (kept apart from TextConfig)


def init_lora(config: TextConfig, lora: LoraSpec, rng: jax.Array) -> dict:
    """Fresh adapters (B = 0, so the adapted model starts equal to the base) on ``lora.targets``."""
    if lora.rank <= 0:
        raise ValueError("init_lora: the LoRA rank is 0; set a rank (and targets) first")
    model = CausalLM(config, lora)
    variables = jax.jit(lambda key: {LORA_COLLECTION: model.init(key, *init_inputs())[LORA_COLLECTION]})(rng)
    return nn.unbox(variables[LORA_COLLECTION])


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """(alpha / r) * A @ B shaped like the kernel: a [L, *in, r], b [L, r, *out] -> [L, *in, *out]."""
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank).astype(jnp.float32),
                      b.reshape(layers, rank, -1).astype(jnp.float32))
    return (scale * flat).reshape(a.shape[:-1] + b.shape[2:])


def _fold(params: Mapping, lora: Mapping, scale: float, sign: float) -> dict:
    out = {}
    for name, value in params.items():
        sub = lora.get(name) if isinstance(lora, Mapping) else None
        if isinstance(value, Mapping):
            if sub is not None and "lora_a" in sub:
                kernel = value["kernel"]
                delta = lora_delta(sub["lora_a"], sub["lora_b"], scale)
                out[name] = dict(value, kernel=(kernel.astype(jnp.float32) + sign * delta).astype(kernel.dtype))
            else:
                out[name] = _fold(value, sub or {}, scale, sign)
        else:
            out[name] = value
    return out


def merge_lora(params: Mapping[str, Any], lora: Mapping[str, Any], spec: LoraSpec) -> dict:
    """Base params with every adapter folded into its kernel (for export / adapter-free serving)."""
    return _fold(params, lora, spec.scale, +1.0)


def unmerge_lora(params: Mapping[str, Any], lora: Mapping[str, Any], spec: LoraSpec) -> dict:
    """The inverse of ``merge_lora`` (up to float rounding)."""
    return _fold(params, lora, spec.scale, -1.0)


def count_lora_params(lora: Mapping) -> int:
    return int(sum(x.size for x in jax.tree.leaves(lora)))
