"""The CASA conditional sampler: prefill, one safety step, then ordinary decoding conditioned on it.

Step 0 is the safety step: the safety attention turns the prompt's hidden states into v_s, every token
but the two safety tokens is masked, and their logits are re-weighted by v_s. The decision is the
argmax, or ``p_unsafe >= threshold`` when a threshold is set, per row. The chosen safety token (and an
optional attacker-controlled assistant prefill after it) is written into the KV cache in one chunk;
then a ``lax.while_loop`` decodes. After ``unsafe`` the model writes its own learned refusal, or, in
``template`` mode, the row stops and the fixed refusal is returned. Prompts are left-padded to a
bucket, so lengths inside a bucket share one compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.casa.config import CasaConfig
from casa_jax.casa.safety_attention import SafetyAttention, safety_step_logits, v_s_from_logit
from casa_jax.casa.safety_tokens import SafetyTokenIds
from casa_jax.model.config import TextConfig
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LORA_COLLECTION
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM
from casa_jax.infer.decode import (bucket_length, cut_at_eos, decode_loop, left_pad, next_decode_positions,
                                      pad_to_bucket)
from casa_jax.infer.strategies import Greedy


@flax.struct.dataclass
class CasaWeights:
    """The parameters the conditional sampler reads (one pytree, so it can be sharded and jitted)."""

    params: Any  # decoder params (safety-token rows included)
    lora: Any  # LoRA collection, or None
    safety: Any  # SafetyAttention params
    unsafe_query: jax.Array  # [E] frozen pretrained embedding of the unsafe token
    encoders: Any = None  # thinker encoders, for multimodal prompts

    def variables(self) -> dict:
        return {"params": self.params} if self.lora is None else {"params": self.params, LORA_COLLECTION: self.lora}


@flax.struct.dataclass
class SafetyDecision:
    unsafe: jax.Array  # [B] bool
    v_s: jax.Array  # [B]
    p_safe: jax.Array  # [B]
    p_unsafe: jax.Array  # [B]


@dataclasses.dataclass(frozen=True)
class CasaOutput:
    """One row's result (host side)."""

    tokens: list[int]  # generated after the safety token (attacker prefill not included)
    unsafe: bool
    v_s: float
    p_safe: float
    p_unsafe: float

    @property
    def verdict(self) -> str:
        return "unsafe" if self.unsafe else "safe"


@dataclasses.dataclass(frozen=True)
class ConditionalSampler:
    text: TextConfig
    casa: CasaConfig
    ids: SafetyTokenIds
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    strategy: Any = Greedy()
    thinker: Any = None  # a ``Thinker`` for multimodal prompts
    traces: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_text_jit", jax.jit(self._run_text, static_argnums=(6, 7)))
        object.__setattr__(self, "_media_jit", jax.jit(self._run_media, static_argnums=(5, 6)))

    @property
    def decoder(self) -> CausalLM:
        return CausalLM(self.text)

    @property
    def _hidden_layers(self) -> tuple[int, ...]:
        return () if self.casa.hidden_layer < 0 else (self.casa.hidden_layer,)

    # -- the safety step -------------------------------------------------------------------------
    def safety_step(self, weights: CasaWeights, out, prompt_mask) -> tuple[jax.Array, jax.Array]:
        """Prefill output -> (full-vocabulary step-0 logits [B, V] with only the safety tokens finite, v_s [B])."""
        hidden = out.final_hidden if self.casa.hidden_layer < 0 else out.hidden_states[0]
        v_logit = SafetyAttention(self.casa).apply({"params": weights.safety}, weights.unsafe_query, hidden,
                                                   prompt_mask.astype(bool))
        step = safety_step_logits(out.logits[:, -1], v_logit, self.ids.safe, self.ids.unsafe, self.casa.scaling)
        return step, v_s_from_logit(v_logit)

    def decide(self, step_logits: jax.Array, v_s: jax.Array) -> SafetyDecision:
        probs = jax.nn.softmax(step_logits, axis=-1)
        p_safe, p_unsafe = probs[:, self.ids.safe], probs[:, self.ids.unsafe]
        unsafe = p_unsafe >= self.casa.threshold if self.casa.threshold is not None else p_unsafe > p_safe
        return SafetyDecision(unsafe=unsafe, v_s=v_s, p_safe=p_safe, p_unsafe=p_unsafe)

    # -- jitted runs -----------------------------------------------------------------------------
    def _run_text(self, weights, ids, mask, chunk_ids, chunk_mask, rng, max_new_tokens: int, template: bool):
        self.traces["text"] = self.traces.get("text", 0) + 1  # runs at trace time only
        batch, length = ids.shape
        cache = KVCache.for_config(self.text, batch, length + chunk_ids.shape[1] + max_new_tokens)
        positions = positions_from_mask(mask)
        out = self.decoder.apply(weights.variables(), ids, positions, mask, cache=cache,
                                 hidden_layers=self._hidden_layers)
        return self._after_prefill(weights, out, mask, positions[:, -1] + 1, chunk_ids, chunk_mask, rng,
                                   max_new_tokens, template)

    def _run_media(self, weights, inputs, chunk_ids, chunk_mask, rng, max_new_tokens: int, template: bool):
        self.traces["media"] = self.traces.get("media", 0) + 1
        batch, length = inputs.input_ids.shape
        cache = KVCache.for_config(self.text, batch, length + chunk_ids.shape[1] + max_new_tokens)
        out = self.thinker(weights.params, weights.encoders, inputs, cache=cache, hidden_layers=self._hidden_layers,
                           lora=weights.lora)
        return self._after_prefill(weights, out, inputs.attention_mask, next_decode_positions(inputs), chunk_ids,
                                   chunk_mask, rng,
                                   max_new_tokens, template)

    def _after_prefill(self, weights, out, prompt_mask, next_positions, chunk_ids, chunk_mask, rng,
                       max_new_tokens, template):
        batch = chunk_ids.shape[0]
        step_logits, v_s = self.safety_step(weights, out, prompt_mask)
        decision = self.decide(step_logits, v_s)
        token = jnp.where(decision.unsafe, self.ids.unsafe, self.ids.safe).astype(jnp.int32)
        # The chunk is [pads, safety token, attacker prefill], right-aligned: its safety column is the
        # first real one of each row.
        safety_col = jnp.argmax(chunk_mask, axis=-1)
        chunk = chunk_ids.at[jnp.arange(batch), safety_col].set(token)
        chunk_positions = next_positions[:, None] + jnp.cumsum(chunk_mask, axis=-1) - 1
        step = self.decoder.apply(weights.variables(), chunk, chunk_positions, chunk_mask, cache=out.cache)
        done = decision.unsafe if template else jnp.zeros((batch,), bool)
        tokens = decode_loop(self.decoder, weights.variables(), self.strategy, self.eos_ids, self.pad_id, step.cache,
                             step.logits[:, -1], next_positions + chunk_mask.sum(-1), done, rng, max_new_tokens)
        return tokens, decision

    # -- host entry points -----------------------------------------------------------------------
    def _chunk(self, batch: int, prefills: Sequence[Sequence[int]] | None) -> tuple[np.ndarray, np.ndarray]:
        prefills = [list(p) for p in (prefills or [[]] * batch)]
        if len(prefills) != batch:
            raise ValueError(f"{len(prefills)} assistant prefills for {batch} prompts")
        # one placeholder column per row for the safety token, chosen on device
        return left_pad([[self.pad_id] + p for p in prefills], 1 + max(map(len, prefills)), self.pad_id)

    def _collect(self, tokens, decision, template: bool) -> list[CasaOutput]:
        tokens = np.asarray(tokens)
        d = jax.tree.map(np.asarray, decision)
        results = []
        for row in range(tokens.shape[0]):
            unsafe = bool(d.unsafe[row])
            kept = [] if (template and unsafe) else cut_at_eos(tokens[row].tolist(), self.eos_ids)
            results.append(CasaOutput(tokens=kept, unsafe=unsafe,
                                      v_s=float(d.v_s[row]), p_safe=float(d.p_safe[row]),
                                      p_unsafe=float(d.p_unsafe[row])))
        return results

    def generate(self, weights: CasaWeights, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 prefills: Sequence[Sequence[int]] | None = None, rng: jax.Array | None = None) -> list[CasaOutput]:
        """Chat-formatted prompt ids (ending with the opened assistant turn) -> one ``CasaOutput`` per row.

        ``prefills``: attacker-controlled assistant text (ids) placed after the safety token.
        """
        ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)), self.pad_id)
        chunk_ids, chunk_mask = self._chunk(len(prompts), prefills)
        template = self.casa.refusal_mode == "template"
        tokens, decision = self._text_jit(weights, ids, mask, chunk_ids, chunk_mask,
                                          jax.random.key(0) if rng is None else rng, max_new_tokens, template)
        return self._collect(tokens, decision, template)

    def generate_multimodal(self, weights: CasaWeights, arrays: dict, max_new_tokens: int = 32,
                            prefills: Sequence[Sequence[int]] | None = None,
                            rng: jax.Array | None = None) -> list[CasaOutput]:
        """Like ``generate`` for ``OmniProcessor`` outputs (images, audio, video), through ``self.thinker``."""
        if self.thinker is None:
            raise ValueError("generate_multimodal needs a ConditionalSampler built with thinker=Thinker(...)")
        inputs = self.thinker.prepare(**pad_to_bucket(arrays, self.pad_id))
        chunk_ids, chunk_mask = self._chunk(inputs.input_ids.shape[0], prefills)
        template = self.casa.refusal_mode == "template"
        tokens, decision = self._media_jit(weights, inputs, chunk_ids, chunk_mask,
                                           jax.random.key(0) if rng is None else rng, max_new_tokens, template)
        return self._collect(tokens, decision, template)
