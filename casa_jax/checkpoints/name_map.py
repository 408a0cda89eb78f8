"""Declarative map between Hugging Face tensor names and our parameter paths, with its transforms.

Each ``Rule`` names one JAX parameter, the Hugging Face key (``{layer}`` for per-layer tensors, which
are stacked along a leading ``layers`` axis), and the two pure reshapes between the layouts. Torch's
``nn.Linear`` stores ``[out, in]``; our kernels are ``[in, ...out]`` with heads split out.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from casa_jax.model.config import TextConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # path in the params tree
    hf_key: str  # may contain "{layer}"
    to_jax: Transform  # one HF tensor -> one (per-layer) JAX array
    to_hf: Transform  # inverse of to_jax
    hf_shape: tuple[int, ...]  # expected shape of the HF tensor

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_key


def _identity(x):
    return x


def _linear(out_shape: tuple[int, ...]) -> tuple[Transform, Transform]:
    """HF [prod(out), in] <-> JAX [in, *out]."""
    def to_jax(w):
        return w.T.reshape((w.shape[1],) + out_shape)

    def to_hf(k):
        return k.reshape(k.shape[0], -1).T
    return to_jax, to_hf


def _linear_in(in_shape: tuple[int, ...]) -> tuple[Transform, Transform]:
    """HF [out, prod(in)] <-> JAX [*in, out] (the attention output projection)."""
    def to_jax(w):
        return w.T.reshape(in_shape + (w.shape[0],))

    def to_hf(k):
        return k.reshape(-1, k.shape[-1]).T
    return to_jax, to_hf


def _reshape(shape: tuple[int, ...], flat: tuple[int, ...]) -> tuple[Transform, Transform]:
    return (lambda b: b.reshape(shape)), (lambda b: b.reshape(flat))


def text_rules(cfg: TextConfig) -> list[Rule]:
    """Rules for the Qwen2.5 decoder, in canonical HF names (``model.*``, ``lm_head.*``)."""
    e, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    lay = "model.layers.{layer}."
    rules = [
        Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight", _identity, _identity, (v, e)),
        Rule(("norm", "scale"), "model.norm.weight", _identity, _identity, (e,)),
        Rule(("layers", "input_layernorm", "scale"), lay + "input_layernorm.weight", _identity, _identity, (e,)),
        Rule(("layers", "post_attention_layernorm", "scale"), lay + "post_attention_layernorm.weight",
             _identity, _identity, (e,)),
        Rule(("layers", "self_attn", "q_proj", "kernel"), lay + "self_attn.q_proj.weight", *_linear((h, d)), (h * d, e)),
        Rule(("layers", "self_attn", "k_proj", "kernel"), lay + "self_attn.k_proj.weight", *_linear((kvh, d)), (kvh * d, e)),
        Rule(("layers", "self_attn", "v_proj", "kernel"), lay + "self_attn.v_proj.weight", *_linear((kvh, d)), (kvh * d, e)),
        Rule(("layers", "self_attn", "o_proj", "kernel"), lay + "self_attn.o_proj.weight", *_linear_in((h, d)), (e, h * d)),
        Rule(("layers", "mlp", "gate_proj", "kernel"), lay + "mlp.gate_proj.weight", *_linear((i,)), (i, e)),
        Rule(("layers", "mlp", "up_proj", "kernel"), lay + "mlp.up_proj.weight", *_linear((i,)), (i, e)),
        Rule(("layers", "mlp", "down_proj", "kernel"), lay + "mlp.down_proj.weight", *_linear((e,)), (e, i)),
    ]
    if cfg.attention_bias:
        rules += [
            Rule(("layers", "self_attn", "q_proj", "bias"), lay + "self_attn.q_proj.bias", *_reshape((h, d), (h * d,)), (h * d,)),
            Rule(("layers", "self_attn", "k_proj", "bias"), lay + "self_attn.k_proj.bias", *_reshape((kvh, d), (kvh * d,)), (kvh * d,)),
            Rule(("layers", "self_attn", "v_proj", "bias"), lay + "self_attn.v_proj.bias", *_reshape((kvh, d), (kvh * d,)), (kvh * d,)),
        ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", *_linear((v,)), (v, e)))
    return rules


def expected_hf_shapes(rules: list[Rule], num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every concrete HF key the rules need, with its shape."""
    out = {}
    for rule in rules:
        if rule.per_layer:
            for layer in range(num_layers):
                out[rule.hf_key.format(layer=layer)] = rule.hf_shape
        else:
            out[rule.hf_key] = rule.hf_shape
    return out
