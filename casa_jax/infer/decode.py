"""One jitted decode loop for every model: bucketed prefill, a gate at step 0, then a ``lax.while_loop``
of one-token cached steps (the shape of gemma's ``_sampler_loop``: one state dataclass, one loop).

Plain, LoRA and Circuit-Breaker models pass through ``NoGate``; a CASA model's safety step, and the
attacker prefill written after its safety token, is the ``CasaGate`` (``infer.gates``). Prompts are
left-padded to a bucket length so a new prompt length rarely means a new compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.config import TextConfig
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LoraSpec, model_variables
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM
from casa_jax.infer.strategies import Greedy

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


# -- host-side batching -------------------------------------------------------------------------------
def bucket_length(length: int, buckets: Sequence[int] = PREFILL_BUCKETS) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"prompt of {length} tokens is longer than the largest prefill bucket {buckets[-1]}")


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0,
             allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [B, length] with every prompt right-aligned; ``allow_empty``: a row may be all padding
    (a gate's chunk for a row without an attacker prefill)."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p) == 0:
            if allow_empty:
                continue
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


# -- the weights every run reads ------------------------------------------------------------------------
@flax.struct.dataclass
class Weights:
    """Everything a decode reads, as one pytree (so it can be placed on a mesh and jitted)."""

    params: Any  # decoder params (a CASA model's safety-token rows included)
    lora: Any = None  # LoRA collection, or None
    encoders: Any = None  # thinker encoders, for multimodal prompts
    safety: Any = None  # CASA: SafetyAttention params
    unsafe_query: Any = None  # CASA: [E] frozen pretrained embedding of the unsafe token
    quant: Any = None  # int8 / bf16 kernels (``model.quantize``), missing from ``params``

    def variables(self) -> dict:
        return model_variables(self.params, self.lora, self.quant)


# -- the loop ------------------------------------------------------------------------------------------
@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    logits: jax.Array  # [B, V] logits for the next token
    positions: jax.Array  # [B] position of the next token
    tokens: jax.Array  # [B, max_new_tokens] generated ids (pad after done)
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32
    rng: jax.Array
    watch: Any = None  # the gate's decoding state (``gates.Recheck``), when it watches


def decode_loop(model: CausalLM, variables: dict, strategy, eos_ids: Sequence[int], pad_id: int, cache: KVCache,
                logits: jax.Array, positions: jax.Array, done: jax.Array, rng: jax.Array,
                max_new_tokens: int, watcher: Callable | None = None, watch: Any = None,
                hidden_layers: tuple[int, ...] = (), limits: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """One-token cached steps in a ``lax.while_loop`` until every row is done or ``max_new_tokens``.

    logits [B, V] predict the first token, which goes at ``positions`` [B]; rows already ``done`` emit
    ``pad_id``; a row is done after ``limits`` [B] tokens (default: ``max_new_tokens``).
    ``watcher(watch, step_out, step, was_done, done) -> (watch, stop [B])``: a gate's per-step hook (the
    re-checking CASA gate), run after each step with ``hidden_layers`` computed; ``was_done`` / ``done``
    are the rows finished before / after this step. Returns (tokens [B, max_new_tokens], the final
    ``watch``).
    """
    batch = logits.shape[0]
    state = DecodeState(cache=cache, logits=logits, positions=positions,
                        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32), done=done,
                        step=jnp.zeros((), jnp.int32), rng=rng, watch=watch)
    eos = jnp.asarray(tuple(eos_ids), jnp.int32)

    def cond(s: DecodeState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: DecodeState):
        rng, key = jax.random.split(s.rng)
        token = jnp.where(s.done, pad_id, strategy(s.logits, key))
        tokens = s.tokens.at[:, s.step].set(token)
        done = s.done | jnp.isin(token, eos)
        if limits is not None:
            done = done | (s.step + 1 >= limits)
        step_out = model.apply(variables, token[:, None], s.positions[:, None], jnp.ones((batch, 1), jnp.int32),
                               cache=s.cache, hidden_layers=hidden_layers if watcher else ())
        watch = s.watch
        if watcher is not None:
            watch, stop = watcher(watch, step_out, s.step, s.done, done)
            done = done | stop
        return DecodeState(cache=step_out.cache, logits=step_out.logits[:, -1], positions=s.positions + 1,
                           tokens=tokens, done=done, step=s.step + 1, rng=rng, watch=watch)

    final = jax.lax.while_loop(cond, body, state)
    return final.tokens, final.watch


@dataclasses.dataclass(frozen=True)
class Generated:
    """One row's result (host side): the generated ids and, under a gate that decides, its decision."""

    tokens: list[int]  # after the gate's step-0 tokens (a CASA model: after the safety token and any prefill)
    decision: Any = None  # ``gates.RowDecision`` under the CASA gate, else None

    @property
    def unsafe(self) -> bool | None:
        return None if self.decision is None else self.decision.unsafe

    @property
    def verdict(self) -> str | None:
        return None if self.decision is None else self.decision.verdict

    @property
    def v_s(self) -> float | None:
        return None if self.decision is None else self.decision.v_s

    @property
    def p_safe(self) -> float | None:
        return None if self.decision is None else self.decision.p_safe

    @property
    def p_unsafe(self) -> float | None:
        return None if self.decision is None else self.decision.p_unsafe


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Greedy or stochastic decoding of one model under one gate: ``generate`` works on token-id lists,
    ``generate_multimodal`` on ``OmniProcessor`` arrays (with ``thinker``).

    The jitted functions belong to this object (an ``Engine`` keeps one Decoder per strategy and gate);
    ``context`` is entered around every call, so they are traced and run under the Engine's mesh and
    logical-axis rules."""

    text: TextConfig
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    strategy: Any = Greedy()
    gate: Any = None  # ``gates.NoGate()`` when None
    thinker: Any = None  # a ``Thinker`` for multimodal prompts
    context: Callable[[], Any] = contextlib.nullcontext
    lora: LoraSpec = LoraSpec()  # the adapters ``Weights.lora`` holds
    traces: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.gate is None:
            from casa_jax.infer.gates import NoGate
            object.__setattr__(self, "gate", NoGate())
        object.__setattr__(self, "_text_jit", jax.jit(self._run_text, static_argnums=(7,)))
        object.__setattr__(self, "_media_jit", jax.jit(self._run_media, static_argnums=(6,)))

    @property
    def decoder(self) -> CausalLM:
        return CausalLM(self.text, self.lora)

    # -- traced ---------------------------------------------------------------------------------------
    def _run_text(self, weights: Weights, ids, mask, chunk_ids, chunk_mask, rng, limits, max_new_tokens: int):
        self.traces["text"] = self.traces.get("text", 0) + 1  # runs at trace time only
        batch, length = ids.shape
        cache = KVCache.for_config(self.text, batch, length + chunk_ids.shape[1] + max_new_tokens)
        positions = positions_from_mask(mask)
        out = self.decoder.apply(weights.variables(), ids, positions, mask, cache=cache,
                                 hidden_layers=self.gate.hidden_layers, last_only=True)
        return self._after_prefill(weights, out, mask, positions[:, -1] + 1, chunk_ids, chunk_mask, rng, limits,
                                   max_new_tokens)

    def _run_media(self, weights: Weights, inputs, chunk_ids, chunk_mask, rng, limits, max_new_tokens: int):
        self.traces["media"] = self.traces.get("media", 0) + 1
        batch, length = inputs.input_ids.shape
        cache = KVCache.for_config(self.text, batch, length + chunk_ids.shape[1] + max_new_tokens)
        out = self.thinker(weights.params, weights.encoders, inputs, cache=cache,
                           hidden_layers=self.gate.hidden_layers, lora=weights.lora, quant=weights.quant,
                           last_only=True)
        return self._after_prefill(weights, out, inputs.attention_mask, next_decode_positions(inputs), chunk_ids,
                                   chunk_mask, rng, limits, max_new_tokens)

    def _after_prefill(self, weights, out, prompt_mask, next_positions, chunk_ids, chunk_mask, rng, limits,
                       max_new_tokens):
        opened = self.gate.open(self.decoder, weights, out, prompt_mask, next_positions, chunk_ids, chunk_mask)
        watcher = functools.partial(self.gate.watch, weights) if self.gate.watches else None
        tokens, watch = decode_loop(self.decoder, weights.variables(), self.strategy, self.eos_ids, self.pad_id,
                                    opened.cache, opened.logits, opened.positions, opened.done, rng, max_new_tokens,
                                    watcher, opened.watch, self.gate.hidden_layers, limits)
        decision = self.gate.finish(opened.decision, watch) if self.gate.watches else opened.decision
        return tokens, decision

    # -- host entry points ----------------------------------------------------------------------------
    def generate(self, weights: Weights, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 prefills: Sequence[Sequence[int]] | None = None, rng: jax.Array | None = None,
                 limits: Sequence[int] | None = None) -> list[Generated]:
        """Prompt ids (a chat prompt ends with the opened assistant turn) -> one ``Generated`` per row,
        up to and excluding the first EOS. ``prefills``: attacker-controlled assistant ids, placed where
        the gate says (after a CASA model's safety token; else right after the prompt). ``limits``: each
        row's own token limit (<= ``max_new_tokens``, the compiled length); a row stops there."""
        prefills = _check_prefills(prefills, len(prompts))
        limits = _check_limits(limits, len(prompts), max_new_tokens)
        if self.gate.prefill_in_prompt:  # one prefill over prompt + attacker prefix
            prompts, prefills = [list(p) + list(q) for p, q in zip(prompts, prefills)], [[]] * len(prompts)
        chunk_ids, chunk_mask = self.gate.chunk(prefills, self.pad_id)
        ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)), self.pad_id)
        with self.context():
            tokens, decision = self._text_jit(weights, ids, mask, chunk_ids, chunk_mask,
                                              jax.random.key(0) if rng is None else rng, limits, max_new_tokens)
        return self._collect(tokens, decision)

    def generate_multimodal(self, weights: Weights, arrays: dict, max_new_tokens: int = 32,
                            prefills: Sequence[Sequence[int]] | None = None,
                            rng: jax.Array | None = None, limits: Sequence[int] | None = None) -> list[Generated]:
        """Like ``generate`` for ``OmniProcessor`` outputs (images, audio, video), through ``self.thinker``.
        The prompt batch is left-padded to a prefill bucket before ``thinker.prepare``."""
        if self.thinker is None:
            raise ValueError("generate_multimodal needs a Decoder built with thinker=Thinker(...)")
        prefills = _check_prefills(prefills, np.asarray(arrays["input_ids"]).shape[0])
        limits = _check_limits(limits, len(prefills), max_new_tokens)
        chunk_ids, chunk_mask = self.gate.chunk(prefills, self.pad_id)  # media prompts: always a chunk
        inputs = self.thinker.prepare(**pad_to_bucket(arrays, self.pad_id))
        with self.context():
            tokens, decision = self._media_jit(weights, inputs, chunk_ids, chunk_mask,
                                               jax.random.key(0) if rng is None else rng, limits, max_new_tokens)
        return self._collect(tokens, decision)

    def _collect(self, tokens, decision) -> list[Generated]:
        tokens = np.asarray(tokens)
        rows = self.gate.rows(decision, tokens.shape[0])
        return [Generated(tokens=[] if self.gate.drops_tokens(row) else cut_at_eos(tokens[i].tolist(), self.eos_ids),
                          decision=row) for i, row in enumerate(rows)]


def _check_limits(limits, batch: int, max_new_tokens: int) -> np.ndarray:
    """[B] int32 token limits, each in 1..max_new_tokens (all ``max_new_tokens`` when None)."""
    out = np.full((batch,), max_new_tokens, np.int32) if limits is None else np.asarray(limits, np.int32)
    if out.shape != (batch,) or (out < 1).any() or (out > max_new_tokens).any():
        raise ValueError(f"limits {list(out)}: expected {batch} values in 1..{max_new_tokens}")
    return out


def _check_prefills(prefills, batch: int) -> list[list[int]]:
    prefills = [list(p) for p in (prefills or [[]] * batch)]
    if len(prefills) != batch:
        raise ValueError(f"{len(prefills)} assistant prefills for {batch} prompts")
    return prefills
