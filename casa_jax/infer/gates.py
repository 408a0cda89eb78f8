"""Gates: what the decode loop does at step 0, between the prompt's prefill and ordinary decoding.

``NoGate`` passes the prefill's last logits on (plain, LoRA and Circuit-Breaker models). ``CasaGate`` is
CASA's safety step: the safety attention turns the prompt's hidden states into v_s, every token but the
two safety tokens is masked and their logits re-weighted by v_s; the decision is the argmax, or
``p_unsafe >= threshold`` when a threshold is set, per row. The chosen safety token (and an optional
attacker-controlled assistant prefill after it) is written into the KV cache in one chunk. After
``unsafe`` the model writes its own learned refusal, or, in ``template`` mode, the row stops and the
fixed refusal is returned.
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
from casa_jax.infer.decode import left_pad


@flax.struct.dataclass
class Opened:
    """What a gate hands the decode loop."""

    logits: jax.Array  # [B, V] logits of the first decoded token
    cache: Any  # KVCache after the prompt (and the gate's chunk)
    positions: jax.Array  # [B] position of the first decoded token
    done: jax.Array  # [B] bool: rows that decode nothing
    decision: Any = None  # the gate's per-row outputs (a SafetyDecision), or None
    watch: Any = None  # state the gate keeps during decoding (a ``Recheck``), or None


@dataclasses.dataclass(frozen=True)
class NoGate:
    """Step 0 is an ordinary step. A text prompt's attacker prefill is part of its prefill; a media prompt's
    is written as a chunk after the thinker's prefill."""

    hidden_layers: tuple[int, ...] = ()
    prefill_in_prompt: bool = True
    watches: bool = False  # no per-step hook in the decode loop

    def chunk(self, prefills: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        return left_pad(prefills, max(map(len, prefills), default=0), pad_id, allow_empty=True)

    def open(self, decoder, weights, out, prompt_mask, next_positions, chunk_ids, chunk_mask) -> Opened:
        del prompt_mask
        batch = chunk_ids.shape[0]
        done = jnp.zeros((batch,), bool)
        if chunk_ids.shape[1] == 0:
            return Opened(out.logits[:, -1], out.cache, next_positions, done)
        written = chunk_mask.sum(-1)
        positions = next_positions[:, None] + jnp.cumsum(chunk_mask, axis=-1) - 1
        step = decoder.apply(weights.variables(), chunk_ids, positions, chunk_mask, cache=out.cache, last_only=True)
        logits = jnp.where((written > 0)[:, None], step.logits[:, -1], out.logits[:, -1])
        return Opened(logits, step.cache, next_positions + written, done)

    def rows(self, decision, batch: int) -> list:
        del decision
        return [None] * batch

    def drops_tokens(self, row) -> bool:
        del row
        return False


@flax.struct.dataclass
class SafetyDecision:
    unsafe: jax.Array  # [B] bool
    v_s: jax.Array  # [B]
    p_safe: jax.Array  # [B]
    p_unsafe: jax.Array  # [B]
    turned_at: Any = None  # [B] int32: the decode step at which a re-check found the row unsafe, -1 if none


@flax.struct.dataclass
class Recheck:
    """The re-checking gate's state in the decode loop: the hidden states of every cache slot written so far
    (prompt, safety token, attacker prefill, reply), aligned with the KV cache's slots."""

    hidden: jax.Array  # [B, S, E] float32, S = the cache's length; zeros where nothing was written
    turned_at: jax.Array  # [B] int32, -1 while no re-check has found the row unsafe


@dataclasses.dataclass(frozen=True)
class RowDecision:
    """One row's safety decision (host side)."""

    unsafe: bool  # the verdict at the safety step
    v_s: float
    p_safe: float
    p_unsafe: float
    turned_at: int = -1  # re-checking gate: the decode step at which the reply was ended as unsafe (-1: never)

    @property
    def turned(self) -> bool:
        return self.turned_at >= 0

    @property
    def verdict(self) -> str:
        return "unsafe" if self.unsafe or self.turned else "safe"


@dataclasses.dataclass(frozen=True)
class CasaGate:
    """CASA's safety step at step 0 (see the module docstring).

    ``recheck_every`` > 0 re-evaluates the safety head during decoding: on the whole sequence so far
    (prompt, safety token, attacker prefill, reply) after the prefill chunk, then every that many
    decoded tokens and when a row finishes. Rows already ``unsafe`` at the safety step are re-checked
    too (a prefilled one otherwise goes on to write the answer), so a learned refusal can give way to
    the template. When its v_s reaches ``recheck_threshold`` the row stops and its reply becomes the
    refusal template. Only v_s is read there: the LM's safety-token logits were trained at the safety
    position alone, not in the middle of a reply."""

    casa: CasaConfig
    ids: SafetyTokenIds
    prefill_in_prompt: bool = False  # the attacker prefill goes after the safety token
    recheck_every: int = 0
    recheck_threshold: float = 0.5

    @property
    def watches(self) -> bool:
        return self.recheck_every > 0

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return () if self.casa.hidden_layer < 0 else (self.casa.hidden_layer,)

    @property
    def template(self) -> bool:
        return self.casa.refusal_mode == "template"

    def safety_step(self, weights, out, prompt_mask) -> tuple[jax.Array, jax.Array]:
        """Prefill output -> (full-vocabulary step-0 logits [B, V] with only the safety tokens finite, v_s [B])."""
        v_logit = SafetyAttention(self.casa).apply({"params": weights.safety}, weights.unsafe_query,
                                                   self._hidden(out), prompt_mask.astype(bool))
        step = safety_step_logits(out.logits[:, -1], v_logit, self.ids.safe, self.ids.unsafe, self.casa.scaling)
        return step, v_s_from_logit(v_logit)

    def decide(self, step_logits: jax.Array, v_s: jax.Array) -> SafetyDecision:
        probs = jax.nn.softmax(step_logits, axis=-1)
        p_safe, p_unsafe = probs[:, self.ids.safe], probs[:, self.ids.unsafe]
        unsafe = p_unsafe >= self.casa.threshold if self.casa.threshold is not None else p_unsafe > p_safe
        return SafetyDecision(unsafe=unsafe, v_s=v_s, p_safe=p_safe, p_unsafe=p_unsafe)

    def chunk(self, prefills: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        # one placeholder column per row for the safety token, chosen on device
        rows = [[pad_id] + list(p) for p in prefills]
        return left_pad(rows, max(map(len, rows), default=0), pad_id)

    def open(self, decoder, weights, out, prompt_mask, next_positions, chunk_ids, chunk_mask) -> Opened:
        batch = chunk_ids.shape[0]
        decision = self.decide(*self.safety_step(weights, out, prompt_mask))
        token = jnp.where(decision.unsafe, self.ids.unsafe, self.ids.safe).astype(jnp.int32)
        # The chunk is [pads, safety token, attacker prefill], right-aligned: its safety column is the
        # first real one of each row.
        safety_col = jnp.argmax(chunk_mask, axis=-1)
        chunk = chunk_ids.at[jnp.arange(batch), safety_col].set(token)
        chunk_positions = next_positions[:, None] + jnp.cumsum(chunk_mask, axis=-1) - 1
        step = decoder.apply(weights.variables(), chunk, chunk_positions, chunk_mask, cache=out.cache,
                             last_only=True, hidden_layers=self.hidden_layers if self.watches else ())
        done = decision.unsafe if self.template else jnp.zeros((batch,), bool)
        watch = None
        if self.watches:  # the first re-check: at the prefill boundary, for rows that have a prefill
            hidden = jnp.zeros((batch, out.cache.max_length, out.final_hidden.shape[-1]), jnp.float32)
            hidden = jax.lax.dynamic_update_slice_in_dim(hidden, self._hidden(out), 0, axis=1)
            hidden = jax.lax.dynamic_update_slice_in_dim(hidden, self._hidden(step), out.cache.index, axis=1)
            watch = Recheck(hidden=hidden, turned_at=jnp.full((batch,), -1, jnp.int32))
            has_prefill = chunk_mask.sum(-1) > 1  # more than the safety token
            watch = self._recheck(weights, watch, step.cache.valid, has_prefill & ~done, jnp.zeros((), jnp.int32))
            done = done | (watch.turned_at >= 0)
        return Opened(step.logits[:, -1], step.cache, next_positions + chunk_mask.sum(-1), done, decision, watch)

    # -- re-checking during decoding ------------------------------------------------------------------------
    def _hidden(self, out) -> jax.Array:  # the states the safety head reads, [B, T, E] float32
        return (out.final_hidden if self.casa.hidden_layer < 0 else out.hidden_states[0]).astype(jnp.float32)

    def _recheck(self, weights, watch: Recheck, valid, rows, step) -> Recheck:
        v_s = v_s_from_logit(SafetyAttention(self.casa).apply({"params": weights.safety}, weights.unsafe_query,
                                                               watch.hidden, valid))
        turned = rows & (watch.turned_at < 0) & (v_s >= self.recheck_threshold)
        return watch.replace(turned_at=jnp.where(turned, step, watch.turned_at))

    def watch(self, weights, watch: Recheck, step_out, step, was_done, done) -> tuple[Recheck, jax.Array]:
        """After decode step ``step`` (its token written at the cache's previous index): store its hidden
        state; re-check the live rows every ``recheck_every`` steps, and a row on the step it finishes (its
        end-of-turn or its limit), so a reply's last tokens are checked too. Returns the state and the rows
        to stop."""
        hidden = jax.lax.dynamic_update_slice_in_dim(watch.hidden, self._hidden(step_out),
                                                     step_out.cache.index - 1, axis=1)
        watch = watch.replace(hidden=hidden)
        due = (step + 1) % self.recheck_every == 0
        rows = (due & ~done) | (done & ~was_done)
        watch = jax.lax.cond(rows.any(), lambda w: self._recheck(weights, w, step_out.cache.valid, rows, step + 1),
                             lambda w: w, watch)
        return watch, watch.turned_at >= 0

    def finish(self, decision: SafetyDecision, watch: Recheck | None) -> SafetyDecision:
        return decision if watch is None else decision.replace(turned_at=watch.turned_at)

    def rows(self, decision: SafetyDecision, batch: int) -> list[RowDecision]:
        d = jax.tree.map(np.asarray, decision)
        turned = d.turned_at if d.turned_at is not None else np.full((batch,), -1)
        return [RowDecision(bool(d.unsafe[i]), float(d.v_s[i]), float(d.p_safe[i]), float(d.p_unsafe[i]),
                            int(turned[i])) for i in range(batch)]

    def drops_tokens(self, row: RowDecision) -> bool:
        return (self.template and row.unsafe) or row.turned
