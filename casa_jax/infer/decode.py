"""A jitted sampler with a KV cache: bucketed prefill, then a ``lax.while_loop`` of one-token steps.

Prompts are left-padded to a bucket length so a new prompt length rarely means a new compile.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LORA_COLLECTION
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM
from casa_jax.infer.strategies import Greedy

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(length: int, buckets: Sequence[int] = PREFILL_BUCKETS) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest prefill bucket {buckets[-1]}")


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [B, length] with every prompt right-aligned."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {row} is empty")
        if len(p) > length:
            raise ValueError(f"prompt {row} has {len(p)} tokens, more than the padded length {length}")
        ids[row, length - len(p):] = p
        mask[row, length - len(p):] = 1
    return ids, mask


def pad_to_bucket(arrays: dict, pad_id: int) -> dict:
    """Processor arrays with ``input_ids`` / ``attention_mask`` left-padded to the prefill bucket."""
    ids = np.asarray(arrays["input_ids"])
    mask = np.asarray(arrays.get("attention_mask", np.ones_like(ids)))
    extra = bucket_length(ids.shape[1]) - ids.shape[1]
    return dict(arrays, input_ids=np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id),
                attention_mask=np.pad(mask, ((0, 0), (extra, 0))))


def next_decode_positions(inputs) -> jax.Array:
    """[B] position of the first decoded token after a thinker prefill: max(prompt positions) + 1 over
    the real tokens (= real tokens + rope delta), the same on all three M-RoPE streams."""
    real = inputs.attention_mask.astype(bool)
    return jnp.max(jnp.where(real, inputs.positions.max(axis=0), -1), axis=-1) + 1


def cut_at_eos(row: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens before the first EOS."""
    return list(row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))])


def decode_loop(model: CausalLM, variables: dict, strategy, eos_ids: Sequence[int], pad_id: int, cache: KVCache,
                logits: jax.Array, positions: jax.Array, done: jax.Array, rng: jax.Array,
                max_new_tokens: int) -> jax.Array:
    """One-token cached steps in a ``lax.while_loop`` until every row is done or ``max_new_tokens``.

    logits [B, V] predict the first token, which goes at ``positions`` [B]; rows already ``done`` emit
    ``pad_id``. Returns tokens [B, max_new_tokens].
    """
    batch = logits.shape[0]
    state = DecodeState(cache=cache, logits=logits, positions=positions,
                        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32), done=done,
                        step=jnp.zeros((), jnp.int32), rng=rng)
    eos = jnp.asarray(tuple(eos_ids), jnp.int32)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState):
        rng, key = jax.random.split(s.rng)
        token = jnp.where(s.done, pad_id, strategy(s.logits, key))
        tokens = s.tokens.at[:, s.step].set(token)
        done = s.done | jnp.isin(token, eos)
        step_out = model.apply(variables, token[:, None], s.positions[:, None], jnp.ones((batch, 1), jnp.int32),
                               cache=s.cache)
        return DecodeState(cache=step_out.cache, logits=step_out.logits[:, -1], positions=s.positions + 1,
                           tokens=tokens, done=done, step=s.step + 1, rng=rng)

    return jax.lax.while_loop(cond, body, state).tokens


def _variables(params) -> dict:
    """Accept a params tree or a full variables dict (``{"params": ..., "lora": ...}``)."""
    return params if "params" in params else {"params": params}


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array  # [B, V] logits for the next token
    positions: jax.Array  # [B] position of the next token
    tokens: jax.Array  # [B, max_new_tokens] generated ids (pad after done)
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Greedy or stochastic decoding for a ``CausalLM``; ``generate`` works on token-id lists.

    ``params`` may also be a variables dict with a ``"lora"`` collection (adapters applied)."""

    model: CausalLM
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    strategy: object = Greedy()

    def __post_init__(self):
        object.__setattr__(self, "_run_jit", jax.jit(self._run, static_argnums=(4,)))
        object.__setattr__(self, "_run_thinker_jit", jax.jit(self._run_thinker, static_argnums=(0, 5)))

    def _run(self, params, ids, mask, rng, max_new_tokens: int):
        batch, length = ids.shape
        cache = KVCache.for_config(self.model.config, batch, length + max_new_tokens)
        positions = positions_from_mask(mask)
        out = self.model.apply(_variables(params), ids, positions, mask, cache=cache)
        return self._decode(params, out, positions[:, -1] + 1, rng, max_new_tokens)

    def _run_thinker(self, thinker, params, encoders, inputs, rng, max_new_tokens: int):
        """Multimodal prefill through the thinker, then the same decode loop. Decoding continues at
        max(prompt positions) + 1 on all three M-RoPE streams (= real tokens + rope delta)."""
        batch, length = inputs.input_ids.shape
        cache = KVCache.for_config(self.model.config, batch, length + max_new_tokens)
        variables = _variables(params)
        out = thinker(variables["params"], encoders, inputs, cache=cache, lora=variables.get(LORA_COLLECTION))
        return self._decode(params, out, next_decode_positions(inputs), rng, max_new_tokens)

    def _decode(self, params, out, next_positions, rng, max_new_tokens: int):
        done = jnp.zeros((out.logits.shape[0],), bool)
        return decode_loop(self.model, _variables(params), self.strategy, self.eos_ids, self.pad_id, out.cache,
                           out.logits[:, -1], next_positions, done, rng, max_new_tokens)

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 rng: jax.Array | None = None) -> list[list[int]]:
        """Token ids generated for each prompt, up to and excluding the first EOS."""
        length = bucket_length(max(len(p) for p in prompts))
        ids, mask = left_pad(prompts, length, self.pad_id)
        rng = jax.random.key(0) if rng is None else rng
        return self._cut(np.asarray(self._run_jit(params, ids, mask, rng, max_new_tokens)))

    def generate_multimodal(self, thinker, params, encoders, arrays: dict, max_new_tokens: int = 32,
                            rng: jax.Array | None = None) -> list[list[int]]:
        """Like ``generate``, for processor outputs (``OmniProcessor`` arrays: left-padded ids, media);
        ``params`` may be a variables dict with the decoder's LoRA collection.

        The prompt batch is left-padded to a prefill bucket before ``thinker.prepare``, so new prompt
        lengths rarely recompile.
        """
        inputs = thinker.prepare(**pad_to_bucket(arrays, self.pad_id))
        rng = jax.random.key(0) if rng is None else rng
        return self._cut(np.asarray(self._run_thinker_jit(thinker, params, encoders, inputs, rng, max_new_tokens)))

    def _cut(self, tokens: np.ndarray) -> list[list[int]]:
        return [cut_at_eos(row, self.eos_ids) for row in tokens.tolist()]
