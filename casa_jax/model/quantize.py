"""Weight-only decoder layer formats: int8 (symmetric, one scale per output channel) and bfloat16.

A decode step reads every weight once per token, so on a CPU it is bound by memory bandwidth; int8
kernels are a quarter of the fp32 bytes, bf16 ones half (and run on the CPU's bf16 units where it has
them: AMX, avx512_bf16). ``quantize_int8`` / ``quantize_bf16`` move the scanned layers' Dense kernels out
of the params tree into the ``"quant"`` collection (``layers.Dense`` reads them from there), so a
quantized tree cannot silently be used as a float one. int8 keeps the embedding and LM head in float; bf16
holds the LM head in bf16 too. Norms and biases stay in float; LoRA adapters are added in float on top.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.layers import FUSED_KERNELS

# Dense layers in ``params["layers"]`` and how many leading kernel axes (after the layer axis) they contract.
QUANTIZED_LAYERS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                    "down_proj": 1}


def _quantize_kernel(kernel: jax.Array, in_axes: int) -> tuple[jax.Array, jax.Array]:
    """kernel [L, *in, *out] -> (int8 [L, *out, *in], scale [L, *out] float32), max |w| per output channel
    mapped to 127. Stored output-major: each output's weights are contiguous, the layout XLA's CPU
    matrix-vector product reads fastest (2.9x the fp32 [in, out] product at batch 1 on an AVX2 EPYC)."""
    reduce = tuple(range(1, 1 + in_axes))
    kernel = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(kernel), axis=reduce) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(kernel / jnp.expand_dims(scale, reduce)), -127, 127).astype(jnp.int8)
    out_axes = tuple(range(1 + in_axes, kernel.ndim))
    return jnp.transpose(q, (0,) + out_axes + reduce), scale


def _bf16_kernel(kernel: jax.Array, in_axes: int) -> dict:
    """kernel [L, *in, *out] -> {"kernel": bfloat16 [L, *out, *in]} (output-major, as int8's)."""
    out_axes = tuple(range(1 + in_axes, kernel.ndim))
    return {"kernel": jnp.transpose(kernel, (0,) + out_axes + tuple(range(1, 1 + in_axes))).astype(jnp.bfloat16)}


def _dequantize_kernel(q: jax.Array, scale: jax.Array | None, in_axes: int) -> jax.Array:
    """(int8 [L, *out, *in], scale [L, *out]) or (bf16 [L, *out, *in], None) -> float32 [L, *in, *out]."""
    n_out = q.ndim - 1 - in_axes
    w = q.astype(jnp.float32)
    if scale is not None:
        w = w * jnp.expand_dims(scale, tuple(range(1 + n_out, q.ndim)))
    return jnp.transpose(w, (0,) + tuple(range(1 + n_out, q.ndim)) + tuple(range(1, 1 + n_out)))


def quantize_int8(params: dict) -> tuple[dict, dict]:
    """Decoder params -> (params without the layers' Dense kernels, the ``"quant"`` collection):
    ``model_variables(params, lora, quant)`` then runs the int8 model."""
    def to_int8(kernel, in_axes):
        q, scale = _quantize_kernel(kernel, in_axes)
        return {"kernel": q, "scale": scale}
    return _move_kernels(params, to_int8, "quantize_int8")


def quantize_bf16(params: dict) -> tuple[dict, dict]:
    """As ``quantize_int8``, with the layers' Dense kernels as bfloat16 (``layers.bf16_dot``), q/k/v and
    gate/up each joined into one kernel (``layers.FUSED_KERNELS``: fewer, larger products), and the LM
    head too: an untied ``lm_head`` kernel moves to ``"quant"``; a tied one gets a bf16 copy of the
    embedding table (``quant["embed_tokens"]["attend"]``), which the float table still serves for lookups."""
    kept, quant = _move_kernels(params, _bf16_kernel, "quantize_bf16")
    quant = dict(quant, layers=_fuse(quant["layers"]))
    if "lm_head" in kept:
        kernel = kept["lm_head"]["kernel"]  # [E, V]
        kept = dict(kept, lm_head={k: v for k, v in kept["lm_head"].items() if k != "kernel"})
        quant["lm_head"] = {"kernel": kernel.T.astype(jnp.bfloat16)}
    else:
        quant["embed_tokens"] = {"attend": kept["embed_tokens"]["embedding"].astype(jnp.bfloat16)}
    return kept, quant


QUANTIZERS = {"int8": quantize_int8, "bf16": quantize_bf16}  # the weight formats besides float, by name


def _fuse(layers: dict) -> dict:
    """Stacked bf16 kernels [L, *out, E] of the layers in ``FUSED_KERNELS`` -> one [L, sum(out), E] kernel
    per block, in the listed order (a block missing one of its layers is left unfused)."""
    layers = dict(layers)
    for block, (name, parts) in FUSED_KERNELS.items():
        sub = dict(layers.get(block, {}))
        if not all("kernel" in sub.get(part, {}) for part in parts):
            continue
        kernels = [sub.pop(part)["kernel"] for part in parts]
        sub[name] = jnp.concatenate([k.reshape(k.shape[0], -1, k.shape[-1]) for k in kernels], axis=1)
        layers[block] = sub
    return layers


def _unfuse(layers: dict, text) -> dict:
    """``_fuse`` undone: {layer: {"kernel": bf16 [L, *out, E]}}, with the shapes ``text`` (TextConfig) gives."""
    if not any(name in layers.get(block, {}) for block, (name, _) in FUSED_KERNELS.items()):
        return layers
    if text is None:
        raise ValueError("dequantize: these bf16 kernels are fused (q/k/v, gate/up); pass text= (the TextConfig) "
                         "to split them")
    head_dim = text.resolved_head_dim
    shapes = {"q_proj": (text.num_attention_heads, head_dim), "k_proj": (text.num_key_value_heads, head_dim),
              "v_proj": (text.num_key_value_heads, head_dim), "gate_proj": (text.intermediate_size,),
              "up_proj": (text.intermediate_size,)}
    layers = dict(layers)
    for block, (name, parts) in FUSED_KERNELS.items():
        sub = dict(layers.get(block, {}))
        if name not in sub:
            continue
        fused, start = sub.pop(name), 0
        for part in parts:
            size = int(np.prod(shapes[part]))
            piece = fused[:, start:start + size]
            sub[part] = {"kernel": piece.reshape((fused.shape[0],) + shapes[part] + (fused.shape[-1],))}
            start += size
        layers[block] = sub
    return layers


def _move_kernels(params: dict, convert, caller: str) -> tuple[dict, dict]:
    layers = params.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{caller}: expected decoder params with a scanned 'layers' subtree")
    kept, quant = _split(layers, convert)
    if not quant:
        raise ValueError(f"{caller}: no Dense kernels found under params['layers'] "
                         f"(expected layers named {sorted(QUANTIZED_LAYERS)})")
    return dict(params, layers=kept), {"layers": quant}


def _split(tree: dict, convert) -> tuple[dict, dict]:
    kept, quant = {}, {}
    for name, sub in tree.items():
        if not isinstance(sub, dict):
            kept[name] = sub
        elif name in QUANTIZED_LAYERS and "kernel" in sub:
            kept[name] = {k: v for k, v in sub.items() if k != "kernel"}
            quant[name] = convert(sub["kernel"], QUANTIZED_LAYERS[name])
        else:
            kept[name], inner = _split(sub, convert)
            if inner:
                quant[name] = inner
    return kept, quant


def dequantize(params: dict, quant: dict, text=None) -> dict:
    """The float params an int8 or bf16 model computes with (kernels = q * scale, or the bf16 kernels
    widened; a tied head keeps the float table): for tests and quality checks. ``text`` (the TextConfig)
    splits bf16's fused q/k/v and gate/up kernels."""
    def merge(kept: Any, q: Any, name: str | None = None):
        if not isinstance(q, dict):
            return kept
        if "kernel" in q and name in QUANTIZED_LAYERS:
            return dict(kept, kernel=_dequantize_kernel(q["kernel"], q.get("scale"), QUANTIZED_LAYERS[name]))
        if name == "lm_head" and "kernel" in q:  # bf16 [V, E]
            return dict(kept, kernel=q["kernel"].astype(jnp.float32).T)
        if name == "embed_tokens":  # the tied head's bf16 copy: the float table is still in params
            return kept
        return {k: merge(v, q.get(k), k) if k in q else v for k, v in kept.items()}
    if "layers" in quant:
        quant = dict(quant, layers=_unfuse(quant["layers"], text))
    return merge(params, quant)


def weight_bytes(*trees) -> int:
    """Bytes of every array in ``trees`` (what one decode step reads)."""
    return sum(x.nbytes for tree in trees if tree is not None for x in jax.tree.leaves(tree))


def decode_bytes(params: dict, quant: dict | None = None) -> int:
    """Weight bytes one decode step reads: every array, except a float embedding table whose LM head
    runs from a bf16 copy (``quantize_bf16``): the lookup reads only the step's rows of it."""
    total = weight_bytes(params, quant)
    if quant and "attend" in quant.get("embed_tokens", {}):
        total -= params["embed_tokens"]["embedding"].nbytes
    return total
