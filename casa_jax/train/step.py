"""A jitted training step for the objectives, with LoRA and safety-head parameters trainable.

The base decoder and the encoders are frozen by construction (they are never differentiated); the
optimizer is an ``optax.partition`` over the trainable groups, so LoRA and the safety head can get
their own learning rates, and any group can be frozen with ``optax.set_to_zero``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from casa_jax.casa.objectives import LOSSES, NORMALIZERS, ObjectiveSetup


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    safety_learning_rate: float | None = None  # None: same as learning_rate
    warmup_steps: int = 10
    total_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    frozen_groups: tuple[str, ...] = ()  # e.g. ("safety",) to train LoRA only


def _schedule(peak: float, cfg: OptimConfig):
    warmup = max(1, min(cfg.warmup_steps, cfg.total_steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.total_steps, warmup + 1), peak * 0.1)


def make_optimizer(cfg: OptimConfig, trainable: Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW per trainable group (``lora``, ``safety``), partitioned by the tree's top-level names."""
    transforms = {}
    for group in trainable:
        if group in cfg.frozen_groups:
            transforms[group] = optax.set_to_zero()
        else:
            peak = cfg.safety_learning_rate if group == "safety" and cfg.safety_learning_rate else cfg.learning_rate
            transforms[group] = optax.adamw(_schedule(peak, cfg), weight_decay=cfg.weight_decay)
    labels = {group: jax.tree.map(lambda _, g=group: g, tree) for group, tree in trainable.items()}
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.partition(transforms, labels))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any


def init_state(trainable, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable))


def make_train_step(objective: str, setup: ObjectiveSetup, optimizer: optax.GradientTransformation,
                    total_steps: int, accum_steps: int = 1, shardings: tuple | None = None):
    """A jitted ``(state, frozen, batch, rng) -> (state, metrics)`` for one objective.

    ``accum_steps > 1`` splits the batch into that many micro-batches (``lax.scan``), each evaluated with
    the *full* batch's denominators (``objectives.NORMALIZERS``), and sums their losses, metrics and
    gradients: the result is the full batch's (token-/example-weighted, see ``objectives``), not a mean
    of micro-batch means, whatever tokens and labels each micro-batch holds. Micro-batch ``i`` takes rows
    ``i, i + accum_steps, ...`` so each one spreads over the data-parallel devices like the batch. Each
    micro-batch draws its own dropout key, so with dropout the masks (not the expectation) differ from a
    full-batch step. ``shardings = (state, frozen, batch)`` shardings pins the step's inputs and outputs
    to the mesh (the state buffer is donated); None lets jit follow its inputs.
    """
    loss_fn = functools.partial(LOSSES[objective], setup)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, batch, rng):
        progress = state.step.astype(jnp.float32) / max(total_steps, 1)
        key = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(state.trainable, frozen, batch, key, progress)
        else:
            norms = NORMALIZERS[objective](setup, batch)
            micro = jax.tree.map(lambda x: jnp.swapaxes(
                x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 0, 1), batch)

            def one(carry, xs):
                i, mb = xs
                (l, m), g = grad_fn(state.trainable, frozen, mb, jax.random.fold_in(key, i), progress, norms)
                return jax.tree.map(jnp.add, carry, (l, m, g)), None

            shapes = jax.eval_shape(lambda: grad_fn(state.trainable, frozen, jax.tree.map(lambda x: x[0], micro), key,
                                                    progress, norms))
            zeros = jax.tree.map(jnp.zeros_like, (shapes[0][0], shapes[0][1], shapes[1]))
            (loss, metrics, grads), _ = jax.lax.scan(one, zeros, (jnp.arange(accum_steps), micro))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

    if shardings is None:
        return jax.jit(step)
    state_sh, frozen_sh, batch_sh = shardings
    replicated = jax.sharding.NamedSharding(batch_sh.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))


def make_eval_fn(objective: str, setup: ObjectiveSetup, micro_batch: int = 16,
                 sharding: jax.sharding.Sharding | None = None):
    """``(trainable, frozen, batch) -> metrics`` of a NumPy batch (no dropout, progress 1), ``micro_batch``
    rows at a time so a large held-out set never holds its logits at once. Each micro-batch's share is
    taken with the full batch's denominators (``objectives.NORMALIZERS``), so the sums equal one pass over
    the whole batch. ``sharding`` places the batches (e.g. replicated on the training mesh)."""
    loss_fn = functools.partial(LOSSES[objective], setup)
    normalizers = jax.jit(functools.partial(NORMALIZERS[objective], setup))

    @jax.jit
    def share(trainable, frozen, batch, norms):
        loss, metrics = loss_fn(trainable, frozen, batch, None, 1.0, norms)
        return dict(metrics, loss=loss)

    def put(tree):
        return jax.device_put(tree, sharding) if sharding is not None else tree

    def evaluate(trainable, frozen, batch):
        norms = normalizers(put(batch))  # masks and labels only: small
        rows = batch.input_ids.shape[0]
        total = None
        for start in range(0, rows, max(1, micro_batch)):
            part = share(trainable, frozen, put(jax.tree.map(lambda x: x[start:start + micro_batch], batch)), norms)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        return total

    return evaluate
