"""Training objectives, each a pure function ``(trainable, frozen, batch, rng, progress) -> (loss, metrics)``.

- ``casa``: two-way cross-entropy on the safety step's re-weighted (safe, unsafe) logits + the language
  model loss on the target; harmful examples weigh ``beta``, benign ones ``1 - beta``.
- ``ssft``: supervised fine-tuning on refusals (harmful) and answers (benign), no safety token.
- ``circuit_breaker``: representation rerouting (Zou et al., 2024): on harmful rows push chosen layers'
  hidden states away from the frozen model's (ReLU of cosine similarity), on benign rows keep them
  close (L2); coefficients c_rr = alpha (1 - t / 2T), c_retain = alpha t / 2T. The frozen model is the
  same weights with the LoRA collection left out.

``trainable`` holds ``lora`` (and ``safety`` for CASA); ``frozen`` holds ``params`` (and
``unsafe_query`` for CASA). ``progress`` = step / total steps. ``rng=None`` applies no dropout (evaluation).

**What "the batch" means for each term.** Every loss and metric is a sum over the batch divided by a
denominator that depends only on the batch's masks and labels (``NORMALIZERS``), never on the parameters:

- CASA safety term: sum_i w_i nll_i / sum_i w_i (examples weighted by beta / 1 - beta; the denominator
  floored, so a batch without weight gives 0, not NaN);
- CASA / SSFT LM term: sum_{i,t} w_i m_it nll_it / sum_{i,t} w_i m_it (target tokens, each weighted by its
  example's w_i), i.e. token-weighted; with ``casa.lm_loss_per="example"`` each example's tokens share
  w_i / n_i (n_i its target tokens), a beta-weighted mean of per-example means;
- Circuit Breakers: reroute = sum of ReLU(cos) over (layer, harmful real token) / their count, retain = sum
  of the distance over (layer, benign real token) / their count (each count at least 1);
- ``safety_accuracy``, ``v_s_mean``: sums over scored examples / their number (rows with a forced
  safety token, ``safety_weight`` 0, carry neither the safety loss nor these metrics).

A loss called with ``norms`` from ``NORMALIZERS[objective](setup, full_batch)`` on a slice of that batch
returns that slice's share, so the shares over any split of the batch sum exactly to the full batch's
loss, metrics and gradients (what gradient accumulation in ``train.step`` relies on).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from casa_jax.casa.config import CasaConfig
from casa_jax.casa.examples import TrainBatch
from casa_jax.casa.safety_attention import SafetyAttention, safety_pair_logits, v_s_from_logit
from casa_jax.casa.safety_tokens import SafetyTokenIds
from casa_jax.model.config import TextConfig
from casa_jax.model.layers import LoraSpec, model_variables
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
    lora: LoraSpec = LoraSpec()  # the adapters being trained
    # positions per chunk of the LM loss: the head's fp32 logits exist for one chunk at a time, never [B, T, V]
    loss_chunk: int = 128

    @property
    def decoder(self) -> CausalLM:
        return CausalLM(self.text, self.lora)


def _variables(trainable, frozen) -> dict:
    return model_variables(frozen["params"], trainable["lora"])


def _example_weights(batch: TrainBatch, beta: float) -> jax.Array:  # [B]
    harmful = batch.label.astype(jnp.float32)
    return beta * harmful + (1.0 - beta) * (1.0 - harmful)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(x), -1) + 1e-12)  # finite gradient at 0


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity over the last axis."""
    return jnp.sum(a * b, -1) / (_norm(a) * _norm(b))


def _lm_token_weights(batch: TrainBatch, weights: jax.Array, per: str = "token") -> jax.Array:  # [B, T - 1]
    """Each target token's weight in the LM loss: its example's weight (``per="token"``), or that weight
    spread evenly over the example's target tokens (``per="example"``: one vote per example)."""
    mask = batch.loss_mask[:, 1:].astype(jnp.float32)
    if per == "example":
        return mask * (weights / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
    return mask * weights[:, None]


def token_nll(head: Callable, hidden: jax.Array, targets: jax.Array, chunk: int,
              needed: jax.Array | None = None) -> jax.Array:
    """-log p(target) [B, T] from final hidden states [B, T, E] and targets [B, T], through ``head`` (hidden
    -> fp32 logits, frozen) ``chunk`` positions at a time, so peak memory holds one chunk's [B, chunk, V],
    never the sequence's.

    ``needed`` [B, T] bool: the positions whose NLL the caller reads (its loss weights > 0); the others
    come back 0 and never reach the head. Each row's needed positions are packed to its front (a gather
    along the sequence, so a batch-sharded layout stays sharded) and a chunk holding none is skipped
    (``lax.cond``): a prompt half of the tokens costs no LM head, which is about 40 % of a small model's
    matrix products.

    Differentiated, each chunk's gradient with respect to ``hidden`` (softmax - one-hot, back through the
    head) is computed in the forward pass while its logits exist, and the backward pass only scales it
    by the incoming cotangent: the head runs forward once and backward once, where recomputing each
    chunk's logits in the backward pass would run it forward twice. ``head``'s own weights get no
    gradient (they are frozen in every objective; differentiating through them is an error)."""
    batch, length, width = hidden.shape
    chunk = max(1, min(chunk, length))
    pieces = -(-length // chunk)
    pad = pieces * chunk - length
    if needed is None:
        order, inverse, used = None, None, length
    else:  # packed position p of row b holds position order[b, p]; inverse undoes it
        needed = needed.astype(bool)
        order = jnp.argsort(~needed, axis=1, stable=True)
        inverse = jnp.argsort(order, axis=1)
        used = jnp.max(jnp.sum(needed, axis=1))  # packed positions in use in the fullest row
        targets = jnp.take_along_axis(targets, order, axis=1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, pieces, chunk).swapaxes(0, 1)
    starts = jnp.arange(pieces) * chunk

    def split(h):  # [B, T, E] -> packed [pieces, B, chunk, E]
        if order is not None:
            h = jnp.take_along_axis(h, order[..., None], axis=1)
        return jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(batch, pieces, chunk, width).swapaxes(0, 1)

    def merge(x):  # packed [pieces, B, chunk, ...] -> [B, T, ...] in the original order
        x = x.swapaxes(0, 1).reshape((batch, pieces * chunk) + x.shape[3:])[:, :length]
        if inverse is None:
            return x
        x = jnp.take_along_axis(x, inverse.reshape(inverse.shape + (1,) * (x.ndim - 2)), axis=1)
        # an unneeded position sharing a chunk with needed ones was computed too: it still comes back 0
        return jnp.where(needed.reshape(needed.shape + (1,) * (x.ndim - 2)), x, 0)

    def stats(h, t):  # [B, chunk, E], [B, chunk] -> nll [B, chunk], softmax [B, chunk, V], head's vjp
        logits, head_vjp = jax.vjp(head, h)
        top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        exp = jnp.exp(logits - top)  # one exp pass for both the log-normaliser and the softmax
        total = jnp.sum(exp, axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)
        return (jnp.log(total) + top - target_logit)[..., 0], exp / total, head_vjp

    def chunked(one, zeros, h):  # ``one`` on the packed chunks in use, ``zeros`` in place of the rest
        def piece_fn(piece):
            start, h, t = piece
            return jax.lax.cond(start < used, one, zeros, h, t)
        return jax.lax.map(piece_fn, (starts, split(h), t))

    @jax.custom_vjp
    def nll(h):
        return merge(chunked(lambda h, t: stats(h, t)[0], lambda h, t: jnp.zeros(t.shape, jnp.float32), h))

    def nll_fwd(h):
        def one(h, t):
            value, probs, head_vjp = stats(h, t)
            return value, head_vjp(probs - jax.nn.one_hot(t, probs.shape[-1], dtype=probs.dtype))[0]
        values, d_hidden = chunked(one, lambda h, t: (jnp.zeros(t.shape, jnp.float32), jnp.zeros_like(h)), h)
        return merge(values), merge(d_hidden)

    def nll_bwd(d_hidden, g):  # g [B, T]: d loss / d nll
        return ((g[..., None].astype(d_hidden.dtype) * d_hidden).astype(hidden.dtype),)

    nll.defvjp(nll_fwd, nll_bwd)
    return nll(hidden)


def lm_loss(head: Callable, hidden: jax.Array, batch: TrainBatch, weights: jax.Array, denominator=None,
            per: str = "token", chunk: int = 128) -> jax.Array:
    """Weighted mean next-token NLL over target tokens (the token at t is predicted from t - 1), averaged
    per token or per example (``per``), from the final hidden states [B, T, E] through ``head`` in chunks
    (``token_nll``). ``denominator``: the full batch's total weight when ``batch`` is one micro-batch of it."""
    mask = _lm_token_weights(batch, weights, per)
    nll = token_nll(head, hidden[:, :-1], batch.input_ids[:, 1:], chunk, needed=mask > 0)
    if denominator is None:
        denominator = jnp.maximum(jnp.sum(mask), 1e-6)
    return jnp.sum(nll * mask) / denominator


def _head(setup: ObjectiveSetup, trainable, frozen) -> Callable:
    """final hidden states [..., E] -> fp32 logits [..., V]: the decoder's LM head alone."""
    variables = _variables(trainable, frozen)
    return lambda hidden: setup.decoder.apply(variables, hidden, method=CausalLM.head)


def _dropout(rng) -> dict:
    return {} if rng is None else {"dropout": rng}


def casa_normalizers(setup: ObjectiveSetup, batch: TrainBatch) -> dict:
    weights = _example_weights(batch, setup.casa.beta)
    return {"examples": jnp.maximum(jnp.sum(batch.safety_weight), 1.0),
            "safety": jnp.maximum(jnp.sum(weights * batch.safety_weight), 1e-6),
            "lm": jnp.maximum(jnp.sum(_lm_token_weights(batch, weights, setup.casa.lm_loss_per)), 1e-6)}


def ssft_normalizers(setup: ObjectiveSetup, batch: TrainBatch) -> dict:
    weights = _example_weights(batch, setup.casa.beta)
    return {"lm": jnp.maximum(jnp.sum(_lm_token_weights(batch, weights, setup.casa.lm_loss_per)), 1e-6)}


def _cb_token_masks(batch: TrainBatch) -> tuple[jax.Array, jax.Array]:  # [B, T] each: harmful, benign
    tokens = batch.attention_mask.astype(jnp.float32)
    harmful = batch.label.astype(jnp.float32)[:, None]
    return tokens * harmful, tokens * (1 - harmful)


def circuit_breaker_normalizers(setup: ObjectiveSetup, batch: TrainBatch) -> dict:
    n = len(setup.circuit_breaker.resolved_layers(setup.text.num_hidden_layers))
    reroute, retain = _cb_token_masks(batch)
    return {"reroute": jnp.maximum(n * jnp.sum(reroute), 1.0), "retain": jnp.maximum(n * jnp.sum(retain), 1.0)}


def safety_v_logit(setup: ObjectiveSetup, safety_params, unsafe_query, out, batch: TrainBatch) -> jax.Array:
    """The safety head's v_s in log-odds [B] over the rows' prompt positions."""
    hidden = out.final_hidden if setup.casa.hidden_layer < 0 else out.hidden_states[0]
    return SafetyAttention(setup.casa).apply({"params": safety_params}, unsafe_query, hidden,
                                             batch.prompt_mask.astype(bool))


def casa_safety_logits(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng=None):
    """The training path's safety step: (decoder output, v_s log-odds [B], re-weighted (safe, unsafe) logits [B, 2]).
    The pair is read at the position before each row's safety token (what predicts it)."""
    cfg, ids = setup.casa, setup.ids
    layers = () if cfg.hidden_layer < 0 else (cfg.hidden_layer,)
    out = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions_from_mask(batch.attention_mask),
                              batch.attention_mask, hidden_layers=layers, return_logits=False, rngs=_dropout(rng))
    v_logit = safety_v_logit(setup, trainable["safety"], frozen["unsafe_query"], out, batch)
    before = jnp.take_along_axis(out.final_hidden, jnp.maximum(batch.safety_index - 1, 0)[:, None, None], axis=1)
    step_logits = _head(setup, trainable, frozen)(before)[:, 0]  # the LM head at that one position: [B, V]
    return out, v_logit, safety_pair_logits(step_logits, v_logit, ids.safe, ids.unsafe, cfg.scaling)


def casa_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress, norms=None):
    del progress
    cfg = setup.casa
    norms = casa_normalizers(setup, batch) if norms is None else norms
    out, v_logit, pair = casa_safety_logits(setup, trainable, frozen, batch, rng)
    weights = _example_weights(batch, cfg.beta)
    logp = jax.nn.log_softmax(pair, axis=-1)
    safety_nll = -jnp.take_along_axis(logp, batch.label[:, None], axis=-1)[:, 0]
    scored = batch.safety_weight  # forced-token rows carry no safety loss and no safety metrics
    safety = jnp.sum(safety_nll * weights * scored) / norms["safety"]
    lm = lm_loss(_head(setup, trainable, frozen), out.final_hidden, batch, weights, norms["lm"], cfg.lm_loss_per,
                 setup.loss_chunk)
    correct = (jnp.argmax(pair, -1) == batch.label).astype(jnp.float32)
    return cfg.safety_loss_weight * safety + lm, {
        "safety_loss": safety, "lm_loss": lm, "safety_accuracy": jnp.sum(correct * scored) / norms["examples"],
        "v_s_mean": jnp.sum(v_s_from_logit(v_logit) * scored) / norms["examples"]}


def ssft_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress, norms=None):
    del progress
    norms = ssft_normalizers(setup, batch) if norms is None else norms
    out = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions_from_mask(batch.attention_mask),
                              batch.attention_mask, return_logits=False, rngs=_dropout(rng))
    lm = lm_loss(_head(setup, trainable, frozen), out.final_hidden, batch, _example_weights(batch, setup.casa.beta),
                 norms["lm"], setup.casa.lm_loss_per, setup.loss_chunk)
    return lm, {"lm_loss": lm}


def circuit_breaker_loss(setup: ObjectiveSetup, trainable, frozen, batch: TrainBatch, rng, progress, norms=None):
    cb = setup.circuit_breaker
    layers = cb.resolved_layers(setup.text.num_hidden_layers)
    norms = circuit_breaker_normalizers(setup, batch) if norms is None else norms
    positions = positions_from_mask(batch.attention_mask)
    ours = setup.decoder.apply(_variables(trainable, frozen), batch.input_ids, positions, batch.attention_mask,
                               hidden_layers=layers, return_logits=False, rngs=_dropout(rng)).hidden_states
    ref = setup.decoder.apply({"params": frozen["params"]}, batch.input_ids, positions, batch.attention_mask,
                              hidden_layers=layers, return_logits=False).hidden_states
    ours, ref = ours.astype(jnp.float32), jax.lax.stop_gradient(ref.astype(jnp.float32))  # [n, B, T, E]
    cos = cosine(ours, ref)  # [n, B, T]
    reroute_mask, retain_mask = _cb_token_masks(batch)  # [B, T], broadcast over the layers
    reroute = jnp.sum(jax.nn.relu(cos) * reroute_mask) / norms["reroute"]
    distance = _norm(ours - ref) / (_norm(ref) if cb.retain_norm == "relative" else 1.0)
    retain = jnp.sum(distance * retain_mask) / norms["retain"]
    c_reroute = cb.alpha * (1 - progress / 2)
    c_retain = cb.alpha * progress / 2
    return c_reroute * reroute + c_retain * retain, {"reroute_cos": reroute, "retain_l2": retain}


LOSSES: dict[str, Callable] = {"casa": casa_loss, "ssft": ssft_loss, "circuit_breaker": circuit_breaker_loss}
# The full batch's denominators (see the module docstring), for losses evaluated on its micro-batches.
NORMALIZERS: dict[str, Callable] = {"casa": casa_normalizers, "ssft": ssft_normalizers,
                                    "circuit_breaker": circuit_breaker_normalizers}


def trainable_parts(objective: str) -> tuple[str, ...]:
    if objective not in LOSSES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    return ("lora", "safety") if objective == "casa" else ("lora",)
