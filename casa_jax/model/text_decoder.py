"""The Qwen2.5 text decoder of the Qwen2.5-Omni thinker: scanned decoder layers and an LM head.

``CausalLM.__call__`` takes token ids (or ready embeddings, for the multimodal thinker), explicit
positions ([B, T] or M-RoPE [3, B, T]), a padding mask and an optional ``KVCache``; it returns logits,
the updated cache and, on request, the hidden states after chosen layers.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from casa_jax.model.constraints import constrain
from casa_jax.model.attention import Attention, attention_mask_bias
from casa_jax.model.config import REMAT_POLICIES, TextConfig
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LORA_COLLECTION, QUANT_COLLECTION, Dense, Embed, LoraSpec, RMSNorm, SwiGLU
from casa_jax.model.rope import rotary_cos_sin

ACT = ("activation_batch", "activation_length", "activation_embed")



@flax.struct.dataclass
class DecoderOutput:
    logits: jax.Array  # [B, T, V] float32 ([B, 1, V] with last_only; None when only hidden states were asked for)
    cache: KVCache | None
    # hidden_states[i]: i = 0 the embeddings, i = l the output of decoder layer l (before the final
    # norm); only the indices in ``hidden_layers`` are filled, stacked in that order: [n, B, T, E].
    hidden_states: jax.Array | None
    final_hidden: jax.Array  # [B, T, E] after the final norm (what the LM head reads)


@flax.struct.dataclass
class LayerContext:
    """What every layer sees, broadcast over the scan."""

    cos: jax.Array  # [B, T, D]
    sin: jax.Array  # [B, T, D]
    mask: jax.Array  # [B, 1, T, S] bool
    cache_index: jax.Array | None  # [] int32


class DecoderLayer(nn.Module):
    config: TextConfig
    lora: LoraSpec = LoraSpec()

    @nn.compact
    def __call__(self, carry, ctx: LayerContext, layer: jax.Array | int):
        """carry: (x [B, T, E], the whole cache's (keys, values) [L, B, S, KVH, D] or None); ``layer`` []
        this layer's index. Returns the new carry and x (the layer's output hidden state)."""
        x, cache = carry
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        x = constrain(x, ACT)
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
        h, cache = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim,
                             use_bias=cfg.attention_bias, name="self_attn", lora=self.lora, **kw)(
            h, ctx.cos, ctx.sin, ctx.mask, cache, ctx.cache_index, layer)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + SwiGLU(cfg.intermediate_size, name="mlp", lora=self.lora, **kw)(h)
        x = constrain(x, ACT)
        return (x, cache), x


def _layer_stack(config: TextConfig):
    """DecoderLayer, optionally rematerialised, scanned over ``num_hidden_layers``.

    The KV cache rides in the carry (each layer writes its slot in place); each step also emits its
    output hidden state, and when no caller reads them, jit's dead-code elimination drops that output,
    so they cost nothing unless asked for.
    """
    layer = DecoderLayer
    if config.remat_policy != "none":
        saved = REMAT_POLICIES[config.remat_policy]
        policy = getattr(jax.checkpoint_policies, saved) if saved else None
        layer = nn.remat(layer, policy=policy, prevent_cse=False)
    return nn.scan(
        layer,
        variable_axes={"params": 0, LORA_COLLECTION: 0, QUANT_COLLECTION: 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0),
        length=config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


UNSTACKED_PREFIX = "layers_"  # the per-layer layout's names: layers_0 ... layers_{L-1}


def unstack_layers(collection: dict | None) -> dict | None:
    """A decoder variable collection (params, ``"lora"`` or ``"quant"``) with its scanned ``layers`` subtree
    [L, ...] split into ``layers_0`` ... ``layers_{L-1}``: the per-layer layout, which ``CausalLM`` runs
    as an unrolled loop. On a CPU this is what a decode step wants: XLA's CPU compiler copies each
    layer's weights out of the stacked arrays before every matrix product in the scan (about half of a
    batch-1 step), while separate arrays are read in place. Call it outside jit, once: the split arrays
    are new buffers. ``None`` or a collection without ``layers`` comes back unchanged."""
    if collection is None or "layers" not in collection:
        return collection
    stacked = collection["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in collection.items() if k != "layers"}
    for i in range(count):
        out[f"{UNSTACKED_PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


class CausalLM(nn.Module):
    """Embedding -> scanned decoder layers -> final RMSNorm -> (tied or untied) LM head. ``lora``: which
    projections carry adapters (their ``"lora"`` collection); the default has none. Applied to variables
    in the per-layer layout (``unstack_layers``) the layers run as an unrolled loop instead of a scan,
    with the same results."""

    config: TextConfig
    lora: LoraSpec = LoraSpec()

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw)
        unstacked = self.has_variable("params", f"{UNSTACKED_PREFIX}0")
        for collection in (LORA_COLLECTION, QUANT_COLLECTION):  # a mixed layout would silently drop them
            if self.has_variable(collection, "layers" if unstacked else f"{UNSTACKED_PREFIX}0"):
                raise ValueError(f"the {collection!r} collection is in the {'stacked' if unstacked else 'per-layer'} "
                                 f"layout but params are {'per-layer' if unstacked else 'stacked'}: pass every "
                                 "collection through unstack_layers, or none")
        if unstacked:
            self.layer_list = tuple(DecoderLayer(cfg, self.lora, name=f"{UNSTACKED_PREFIX}{i}")
                                    for i in range(cfg.num_hidden_layers))
        else:
            self.layer_list = None
            self.layers = _layer_stack(cfg)(cfg, self.lora, name="layers")
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Dense((cfg.vocab_size,), ("embed", "vocab"), name="lm_head", **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, E]
        return self.embed_tokens(input_ids)

    def head(self, hidden: jax.Array) -> jax.Array:  # [B, T, E] after the final norm -> [B, T, V] float32
        """The (tied or untied) LM head alone, for callers that need logits at a few positions only."""
        logits = self.embed_tokens.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return constrain(logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(
        self,
        input_ids: jax.Array | None,  # [B, T] int32
        positions: jax.Array,  # [B, T] or [3, B, T] int32
        attention_mask: jax.Array | None = None,  # [B, T], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        inputs_embeds: jax.Array | None = None,  # [B, T, E], instead of input_ids
        hidden_layers: Sequence[int] = (),
        return_logits: bool = True,
        last_only: bool = False,  # logits at the last position only ([B, 1, V]): all a prefill reads
    ) -> DecoderOutput:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ACT)
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), bool)
        attention_mask = attention_mask.astype(bool)
        for layer in hidden_layers:
            if not 0 <= layer <= cfg.num_hidden_layers:
                raise ValueError(f"hidden layer {layer} out of range [0, {cfg.num_hidden_layers}]")

        cos, sin = rotary_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.mrope_section,
                                  jnp.dtype(cfg.dtype))
        if cache is None:
            slots = jnp.arange(length, dtype=jnp.int32)
            ctx = LayerContext(cos, sin, attention_mask_bias(slots, slots, attention_mask), None)
            layer_caches = None
        else:
            query_slots = cache.index + jnp.arange(length, dtype=jnp.int32)
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.index, axis=1)
            key_slots = jnp.arange(cache.max_length, dtype=jnp.int32)
            ctx = LayerContext(cos, sin, attention_mask_bias(query_slots, key_slots, valid), cache.index)
            layer_caches = (cache.keys, cache.values)

        if self.layer_list is None:
            (final, new_kv), per_layer = self.layers((x, layer_caches), ctx,
                                                     jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32))
        else:
            carry, outputs = (x, layer_caches), []
            for index, layer in enumerate(self.layer_list):
                carry, out = layer(carry, ctx, index)
                outputs.append(out)
            (final, new_kv), per_layer = carry, (jnp.stack(outputs) if hidden_layers else None)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=new_kv[0], values=new_kv[1], valid=valid, index=cache.index + length).constrained()

        hidden = None
        if hidden_layers:
            all_hidden = jnp.concatenate([x[None], per_layer], axis=0)  # [L + 1, B, T, E]
            hidden = all_hidden[jnp.asarray(list(hidden_layers))]
        final = self.norm(final)
        logits = None
        if return_logits:
            logits = self.head(final[:, -1:] if last_only else final)
        return DecoderOutput(logits=logits, cache=new_cache, hidden_states=hidden, final_hidden=final)


def init_inputs(batch: int = 1, length: int = 1) -> tuple[jax.Array, jax.Array]:
    """Small (input_ids, positions) for ``init`` / ``jax.eval_shape``: parameter shapes do not depend on them."""
    ids = jnp.zeros((batch, length), jnp.int32)
    return ids, jnp.zeros((batch, length), jnp.int32)
