"""Training objectives, each a pure function ``(trainable, frozen, batch, rng, progress) -> (loss, metrics)``.

- ``casa``: two-way cross-entropy on the safety step's re-weighted (safe, unsafe) logits + the language
  model loss on the target; harmful examples weigh ``beta``, benign ones ``1 - beta``.
- ``ssft``: supervised fine-tuning on refusals (harmful) and answers (benign), no safety token.
- ``circuit_breaker``: representation rerouting (Zou et al., 2024): on harmful rows push chosen layers'
  hidden states away from the frozen model's (ReLU of cosine similarity), on benign rows keep them
  close (L2); coefficients c_rr = alpha (1 - t / 2T), c_retain = alpha t / 2T. The frozen model is the
  same weights with the LoRA collection left out.

``trainable`` holds ``lora`` (and ``safety`` for CASA); ``frozen`` holds ``params`` (and
``unsafe_query`` for CASA). ``progress`` = step / total steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import TrainBatch
from casa_jax.casa.safety_attention import SafetyAttention, safety_pair_logits
from casa_jax.casa.safety_tokens import SafetyTokenIds
from casa_jax.model.config import TextConfig
from casa_jax.model.layers import LORA_COLLECTION
from casa_jax.model.rope import positions_from_mask
from casa_jax.model.text_decoder import CausalLM

OBJECTIVES = ("casa", "ssft", "circuit_breaker")


@dataclasses.dataclass(frozen=True)
class CircuitBreakerConfig:
    layers: tuple[int, ...] = ()  # hidden-state indices (0 = embeddings); () = the middle and last layers
    alpha: float = 5.0
    # "absolute": ||h - h_frozen||_2 as in the paper; "relative": divided by ||h_frozen||, which keeps the
    # retain term on the same scale as the cosine whatever the model's hidden-state norms are.
    retain_norm: str = "absolute"

    def __post_init__(self):
        if self.retain_norm not in ("absolute", "relative"):
            raise ValueError(f"circuit_breaker.retain_norm={self.retain_norm!r}; expected 'absolute' or 'relative'")

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(self.layers) or (max(1, num_layers // 2), num_layers)


@dataclasses.dataclass(frozen=True)
class ObjectiveSetup:
    """Everything static an objective needs (hashable, so jitted steps can close over it)."""

    text: TextConfig
    casa: CasaConfig = CasaConfig()
    ids: SafetyTokenIds | None = None
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    @property
    def decoder(self) -> CausalLM:
        return CausalLM(self.text)


def _variables(trainable, frozen) -> dict:
    return {"params": frozen["params"], LORA_COLLECTION: trainable["lora"]}


def _example_weights(batch: TrainBatch, beta: float) -> jax.Array:  # [B]
    harmful = batch.label.astype(jnp.float32)
    return beta * harmful + (1.0 - beta) * (1.0 - harmful)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), -1) + 1e-12)  # finite gradient at 0


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis."""
    return jnp.sum(a * b, -1) / (_norm(a) * _norm(b))


def lm_loss(logits: jax.Array, batch: TrainBatch, weights: jax.Array) -> jax.Array:
    """Weighted mean next-token NLL over target tokens (the token at t is predicted from t - 1)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.input_ids[:, 1:, None], axis=-1)[..., 0]
    mask = batch.loss_mask[:, 1:].astype(jnp.float32) * weights[:, None]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1e-6)


def safety_v_s(setup: ObjectiveSetup, safety_params, unsafe_query, out, batch: TrainBatch) -> jax.Array:
    hidden = out.final_hidden if setup.casa.hidden_layer < 0 else out.hidden_states[0]
    return SafetyAttention(setup.casa).apply({"params": safety_params}, unsafe_query, hidden,
                                             batch.prompt_mask.astype(bool))


def casa_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress):
    del progress
    cfg, ids = setup.casa, setup.ids
    layers = () if cfg.hidden_layer < 0 else (cfg.hidden_layer,)
    out = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions_from_mask(batch.attention_mask),
                              batch.attention_mask, hidden_layers=layers, rngs={"dropout": rng})
    weights = _example_weights(batch, cfg.beta)
    v_s = safety_v_s(setup, trainable["safety"], frozen["unsafe_query"], out, batch)
    step_logits = jnp.take_along_axis(out.logits, jnp.maximum(batch.safety_index - 1, 0)[:, None, None], axis=1)[:, 0]
    pair = safety_pair_logits(step_logits, v_s, ids.safe, ids.unsafe, cfg.scaling)
    logp = jax.nn.log_softmax(pair, axis=-1)
    safety_nll = -jnp.take_along_axis(logp, batch.label[:, None], axis=-1)[:, 0]
    safety = jnp.sum(safety_nll * weights) / jnp.sum(weights)
    lm = lm_loss(out.logits, batch, weights)
    accuracy = jnp.mean((jnp.argmax(pair, -1) == batch.label).astype(jnp.float32))
    return cfg.safety_loss_weight * safety + lm, {"safety_loss": safety, "lm_loss": lm, "safety_accuracy": accuracy,
                                                  "v_s_mean": jnp.mean(v_s)}


def ssft_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress):
    del progress
    out = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions_from_mask(batch.attention_mask),
                              batch.attention_mask, rngs={"dropout": rng})
    lm = lm_loss(out.logits, batch, _example_weights(batch, setup.casa.beta))
    return lm, {"lm_loss": lm}


def circuit_breaker_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress):
    cb = setup.circuit_breaker
    layers = cb.resolved_layers(setup.text.num_hidden_layers)
    positions = positions_from_mask(batch.attention_mask)
    ours = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions, batch.attention_mask,
                               hidden_layers=layers, return_logits=False, rngs={"dropout": rng}).hidden_states
    ref = setup.decoder.apply({"params": frozen["params"]}, batch.input_ids, positions, batch.attention_mask,
                              hidden_layers=layers, return_logits=False).hidden_states
    ours, ref = ours.astype(jnp.float32), jax.lax.stop_gradient(ref.astype(jnp.float32))  # [n, B, T, E]
    cos = cosine(ours, ref)  # [n, B, T]
    tokens = jnp.broadcast_to(batch.attention_mask.astype(jnp.float32)[None], cos.shape)  # every layer's tokens
    harmful = batch.label.astype(jnp.float32)[None, :, None]
    reroute_mask, retain_mask = tokens * harmful, tokens * (1 - harmful)  # means over layers and tokens
    reroute = jnp.sum(jax.nn.relu(cos) * reroute_mask) / jnp.maximum(jnp.sum(reroute_mask), 1.0)
    distance = _norm(ours - ref) / (_norm(ref) if cb.retain_norm == "relative" else 1.0)
    retain = jnp.sum(distance * retain_mask) / jnp.maximum(jnp.sum(retain_mask), 1.0)
    c_reroute = cb.alpha * (1 - progress / 2)
    c_retain = cb.alpha * progress / 2
    return c_reroute * reroute + c_retain * retain, {"reroute_cos": reroute, "retain_l2": retain}


LOSSES: dict[str, Callable] = {"casa": casa_loss, "ssft": ssft_loss, "circuit_breaker": circuit_breaker_loss}


def trainable_parts(objective: str) -> tuple[str, ...]:
    if objective not in LOSSES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    return ("lora", "safety") if objective == "casa" else ("lora",)
