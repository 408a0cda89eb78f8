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
from casa_jax.model.encoder_config import AudioConfig, VisionConfig

Transform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # path in the params tree
    hf_key: str  # may contain "{layer}"
    to_jax: Transform  # one HF tensor -> one (per-layer) JAX array
    to_hf: Transform  # inverse of to_jax
    hf_shape: tuple[int, ...]  # expected shape of the HF tensor
    num_layers: int = 0  # how many "{layer}" tensors are stacked (0 for single tensors)

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
    return _stacked(rules, cfg.num_hidden_layers)


def _stacked(rules: list[Rule], num_layers: int) -> list[Rule]:
    return [dataclasses.replace(r, num_layers=num_layers) if r.per_layer else r for r in rules]


def _conv_transpose(shape_hf: tuple[int, ...]) -> tuple[Transform, Transform]:
    """Torch Conv1d [out, in, k] <-> Flax Conv [k, in, out]."""
    return (lambda w: w.transpose(2, 1, 0)), (lambda k: k.transpose(2, 1, 0))


def _patch_embed(shape_hf: tuple[int, ...]) -> tuple[Transform, Transform]:
    """Torch Conv3d [E, C, T, P, P] (stride = kernel) <-> one matmul kernel [C*T*P*P, E]."""
    return (lambda w: w.reshape(w.shape[0], -1).T), (lambda k: k.T.reshape(shape_hf))


def _bias(path: tuple[str, ...], key: str, n: int) -> Rule:
    return Rule(path, key, _identity, _identity, (n,))


def vision_rules(cfg: VisionConfig) -> list[Rule]:
    """``visual.*`` tensors <-> the ``VisionEncoder`` params under ``("visual", ...)``."""
    c, i, h, d, out = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.out_hidden_size
    wide = c * cfg.merge_unit
    blk, path = "visual.blocks.{layer}.", ("visual", "blocks")
    patch_hf = (c, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    rules = [Rule(("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", *_patch_embed(patch_hf),
                  patch_hf)]
    for norm in ("norm1", "norm2"):
        rules.append(Rule(path + (norm, "scale"), blk + norm + ".weight", _identity, _identity, (c,)))
    for name in ("q", "k", "v"):
        rules.append(Rule(path + ("attn", name, "kernel"), blk + f"attn.{name}.weight", *_linear((h, d)), (c, c)))
        rules.append(Rule(path + ("attn", name, "bias"), blk + f"attn.{name}.bias", *_reshape((h, d), (c,)), (c,)))
    rules.append(Rule(path + ("attn", "proj", "kernel"), blk + "attn.proj.weight", *_linear_in((h, d)), (c, c)))
    rules.append(_bias(path + ("attn", "proj", "bias"), blk + "attn.proj.bias", c))
    for name, (n_out, n_in) in (("gate_proj", (i, c)), ("up_proj", (i, c)), ("down_proj", (c, i))):
        rules.append(Rule(path + ("mlp", name, "kernel"), blk + f"mlp.{name}.weight", *_linear((n_out,)),
                          (n_out, n_in)))
        rules.append(_bias(path + ("mlp", name, "bias"), blk + f"mlp.{name}.bias", n_out))
    merger = ("visual", "merger")
    rules += [
        Rule(merger + ("ln_q", "scale"), "visual.merger.ln_q.weight", _identity, _identity, (c,)),
        Rule(merger + ("fc1", "kernel"), "visual.merger.mlp.0.weight", *_linear((wide,)), (wide, wide)),
        _bias(merger + ("fc1", "bias"), "visual.merger.mlp.0.bias", wide),
        Rule(merger + ("fc2", "kernel"), "visual.merger.mlp.2.weight", *_linear((out,)), (out, wide)),
        _bias(merger + ("fc2", "bias"), "visual.merger.mlp.2.bias", out),
    ]
    return _stacked(rules, cfg.depth)


def audio_rules(cfg: AudioConfig) -> list[Rule]:
    """``audio_tower.*`` tensors <-> the ``AudioEncoder`` params under ``("audio_tower", ...)``."""
    dm, f, h, d, out, mel = (cfg.d_model, cfg.encoder_ffn_dim, cfg.encoder_attention_heads, cfg.head_dim,
                             cfg.output_dim, cfg.num_mel_bins)
    lay, path, top = "audio_tower.layers.{layer}.", ("audio_tower", "layers"), ("audio_tower",)
    rules = [
        Rule(top + ("conv1", "kernel"), "audio_tower.conv1.weight", *_conv_transpose((dm, mel, 3)), (dm, mel, 3)),
        _bias(top + ("conv1", "bias"), "audio_tower.conv1.bias", dm),
        Rule(top + ("conv2", "kernel"), "audio_tower.conv2.weight", *_conv_transpose((dm, dm, 3)), (dm, dm, 3)),
        _bias(top + ("conv2", "bias"), "audio_tower.conv2.bias", dm),
        Rule(top + ("audio_bos_eos_token",), "audio_tower.audio_bos_eos_token.weight", _identity, _identity,
             (2, out)),
        Rule(top + ("ln_post", "scale"), "audio_tower.ln_post.weight", _identity, _identity, (dm,)),
        _bias(top + ("ln_post", "bias"), "audio_tower.ln_post.bias", dm),
        Rule(top + ("proj", "kernel"), "audio_tower.proj.weight", *_linear((out,)), (out, dm)),
        _bias(top + ("proj", "bias"), "audio_tower.proj.bias", out),
    ]
    for name in ("q_proj", "k_proj", "v_proj"):
        rules.append(Rule(path + ("self_attn", name, "kernel"), lay + f"self_attn.{name}.weight",
                          *_linear((h, d)), (dm, dm)))
        if name != "k_proj":
            rules.append(Rule(path + ("self_attn", name, "bias"), lay + f"self_attn.{name}.bias",
                              *_reshape((h, d), (dm,)), (dm,)))
    rules.append(Rule(path + ("self_attn", "out_proj", "kernel"), lay + "self_attn.out_proj.weight",
                      *_linear_in((h, d)), (dm, dm)))
    rules.append(_bias(path + ("self_attn", "out_proj", "bias"), lay + "self_attn.out_proj.bias", dm))
    for norm in ("self_attn_layer_norm", "final_layer_norm"):
        rules.append(Rule(path + (norm, "scale"), lay + f"{norm}.weight", _identity, _identity, (dm,)))
        rules.append(_bias(path + (norm, "bias"), lay + f"{norm}.bias", dm))
    rules.append(Rule(path + ("fc1", "kernel"), lay + "fc1.weight", *_linear((f,)), (f, dm)))
    rules.append(_bias(path + ("fc1", "bias"), lay + "fc1.bias", f))
    rules.append(Rule(path + ("fc2", "kernel"), lay + "fc2.weight", *_linear((dm,)), (dm, f)))
    rules.append(_bias(path + ("fc2", "bias"), lay + "fc2.bias", dm))
    return _stacked(rules, cfg.encoder_layers)


def expected_hf_shapes(rules: list[Rule]) -> dict[str, tuple[int, ...]]:
    """Every concrete HF key the rules need, with its shape."""
    out = {}
    for rule in rules:
        if rule.per_layer:
            for layer in range(rule.num_layers):
                out[rule.hf_key.format(layer=layer)] = rule.hf_shape
        else:
            out[rule.hf_key] = rule.hf_shape
    return out
