"""Train a model with one objective (CASA, SSFT or Circuit Breakers) and save it: the library behind
``python -m casa_jax.train``. Text-only, as in the paper; LoRA on the decoder, everything else frozen.

Writes into ``workdir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per
logged step, with ``step`` and ``loss``), ``tensorboard/`` event files, ``checkpoints/`` (resumable
states: a rerun with the same workdir continues from the latest; SIGTERM saves before exiting) and
``checkpoint/`` (the final model, loadable by ``casa_jax.io.trained`` and ``python -m
casa_jax.generate``). The step runs sharded over a ``data x fsdp x tensor`` mesh from the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from casa_jax.io.trained import TrainedModel, load_trained, save_trained
from casa_jax.casa.config import CasaConfig
from casa_jax.train.mixtures import (Answer, cached_targets, model_refusals, self_answers, split_examples,
                                with_compliant_openings, with_forced_unsafe)
from casa_jax.casa.examples import build_batch, render_prompt
from casa_jax.peft.lora import init_lora
from casa_jax.casa.objectives import CircuitBreakerConfig, ObjectiveSetup, trainable_parts
from casa_jax.casa.safety_attention import SafetyAttention
from casa_jax.casa.safety_tokens import add_safety_tokens
from casa_jax.train.step import OptimConfig, init_state, make_eval_fn, make_optimizer, make_train_step
from casa_jax.model.config import ConfigError
from casa_jax.model.layers import LORA_COLLECTION, LoraSpec
from casa_jax import storage
from casa_jax.distributed import to_host
from casa_jax.sharding import decoder_shardings, make_mesh, place, replicated, rules_context, rules_from_config
from casa_jax.train.checkpointing import TrainCheckpoints, abstract_like
from casa_jax.train.streams import ExampleStream, GrainStream
from casa_jax.train.placement import batch_sharding, data_parallel_size, global_batch, state_shardings
from casa_jax.train.workdir import CHECKPOINT_DIR, CHECKPOINTS_DIR, WorkdirLock, check_resume, write_config

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after SIGTERM / SIGINT once the current step is checkpointed; exit status 128 + the signal
    number (143 for SIGTERM, 130 for Ctrl-C), like a process ended by it."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(128 + int(signum))
        self.step = step


class _PreemptionFlag:
    """Set by SIGTERM (Cloud TPU's preemption notice) or Ctrl-C (SIGINT); the loop checkpoints and stops at
    the step's end."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.value = False
        self.signal_name = None
        self.signum = signal.SIGTERM
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        del frame
        self.value = True
        self.signal_name = signal.Signals(signum).name
        self.signum = signum

    def restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _global_batch_size(config, mesh) -> int:
    """``per_device_batch_size`` x data-parallel devices when set, else ``batch_size`` (global)."""
    per_device = config.get("per_device_batch_size")
    size = per_device * data_parallel_size(mesh) if per_device else config.batch_size
    if size % (data_parallel_size(mesh) * config.grad_accum_steps):
        raise ConfigError(f"global batch {size} must be divisible by the {data_parallel_size(mesh)} data-parallel "
                          f"devices x grad_accum_steps={config.grad_accum_steps}")
    return size


def _records(path: str) -> list[dict]:
    if not storage.isfile(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def last_record(path: str) -> dict:
    """The last record of a ``metrics.jsonl`` ({} if there is none)."""
    records = _records(path)
    return records[-1] if records else {}


class MetricsLog:
    """``metrics.jsonl``, one JSON record per line, written as each record comes. A resumed run first drops
    the records after its checkpoint (``keep_until``). Only the writer process writes; a local file is
    appended to, a bucket object (which cannot be appended to) rewritten whole: it is small."""

    def __init__(self, path: str, keep_until: int, writer: bool):
        self.path, self.writer = path, writer
        self._lines = [json.dumps(r) + "\n" for r in _records(path) if r["step"] <= keep_until]
        if writer:
            storage.write_text_atomic(path, "".join(self._lines))

    def append(self, record: dict) -> None:
        if not self.writer:
            return
        self._lines.append(json.dumps(record) + "\n")
        if storage.is_remote(self.path):
            storage.write_text_atomic(self.path, "".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(self._lines[-1])


class _TensorBoard:
    """Scalars for TensorBoard in ``workdir/tensorboard`` (process 0). tensorboardX writes local files: for a
    bucket workdir they are written to a local directory and copied into the bucket when the run ends."""

    def __init__(self, workdir: str):
        self.writer = self._local = None
        self.remote = storage.join(workdir, "tensorboard")
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # optional: metrics.jsonl is always written
            log.warning("tensorboardX is not installed; writing metrics.jsonl only")
            return
        if storage.is_remote(workdir):
            import tempfile
            self._local = tempfile.mkdtemp(prefix="casa-jax-tensorboard-")
        self.writer = SummaryWriter(self._local or self.remote)

    def add(self, record: dict) -> None:
        if self.writer:
            for k, v in record.items():
                if k != "step" and isinstance(v, float):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if not self.writer:
            return
        self.writer.close()
        if self._local:
            import shutil
            storage.upload_dir(self._local, self.remote)
            shutil.rmtree(self._local, ignore_errors=True)


def _base(config, mesh, rules):
    """(spec, params, encoders, tokenizer, sidecar dir) of the model to fine-tune; a checkpoint is read
    straight onto the mesh (the decoder by its logical axes, the rest replicated), never onto one device."""
    if config.base == "tiny":
        from casa_jax import tiny
        spec = tiny.tiny_spec()
        return spec, tiny.random_params(spec.text), {}, tiny.build_tokenizer(spec.text.vocab_size), None
    from casa_jax.io.orbax_io import load_spec, sidecar_dir
    from casa_jax.io.trained import load_tokenizer
    shardings = decoder_shardings(load_spec(config.base).text, mesh, rules)["params"]
    # text-only training never reads the encoders: they stay in the base, referenced by the trained checkpoint
    base = load_trained(config.base, shardings=shardings, others=NamedSharding(mesh, PartitionSpec()), encoders=False)
    if base.objective is not None:
        raise ConfigError(f"--config.base={config.base} is already trained ({base.objective}); start from a "
                          "converted checkpoint")
    return base.spec, base.params, base.encoders, load_tokenizer(config.base), sidecar_dir(config.base)


# Bumped when the way targets are built changes (2: cut distilled answers keep no end-of-turn token).
TARGETS_FORMAT = 2


def _examples(config, casa_cfg, spec, params, tokenizer, workdir: str, write: bool):
    """(train, held-out) examples with their targets, cached in ``data.targets_file`` (default
    ``workdir/targets.json``; runs that share it, e.g. CASA and SSFT on one base, distill once)."""
    data = config.data
    for name, value, allowed in (("benign_target", data.benign_target, ("template", "self")),
                                 ("harmful_target", data.harmful_target, ("template", "model"))):
        if value not in allowed:
            raise ConfigError(f"--config.data.{name}={value!r}; expected one of {allowed}")
    refusals = tuple(data.refusal_templates) or (casa_cfg.refusal_template,)

    def build():
        train, heldout = split_examples(data.harmful_sets, data.benign_sets, data.num_harmful, data.heldout_per_class,
                                        refusals, data.max_chars, config.seed, data.benign_ratio)
        if data.benign_target == "template" and data.harmful_target == "template":
            return train, heldout
        answer = _greedy_answers(spec, params, tokenizer, data.self_answer_tokens)
        if data.benign_target == "self":
            train, heldout = self_answers(train, answer), self_answers(heldout, answer)
        if data.harmful_target == "model":
            (train, n_train), (heldout, _) = model_refusals(train, answer), model_refusals(heldout, answer)
            log.info("harmful targets: %d of %d are the model's own refusals under the safety prompt", n_train,
                     sum(e.harmful for e in train))
        return train, heldout

    decides_targets = {k: v for k, v in data.to_dict().items()
                       if k not in ("prefill_refusals", "prefill_answers", "forced_unsafe")}
    key = {"base": storage.resolve(config.base) if config.base != "tiny" else "tiny", "data": decides_targets,
           "refusals": refusals, "seed": config.seed, "format": TARGETS_FORMAT}
    train, heldout = cached_targets(data.targets_file or storage.join(workdir, "targets.json"), key, build, write)
    train = with_compliant_openings(train, data.prefill_refusals, config.seed, answer_fraction=data.prefill_answers)
    if config.objective == "casa" and data.forced_unsafe:
        train = with_forced_unsafe(train, data.forced_unsafe, refusals, config.seed)
    return train, heldout


def _greedy_answers(spec, params, tokenizer, max_new_tokens: int):
    """``answer(prompts, safety_prompt)``: the base model's greedy replies, through the same Engine and
    decode loop evaluation uses (EOS is the tokenizer's own end token, as the targets need)."""
    from casa_jax.infer.engine import engine_from_parts

    engine = engine_from_parts(spec, params, tokenizer, name="base")
    sampler = engine.decoder(eos_ids=(tokenizer.eos_token_id,))

    def answer(prompts, safety_prompt: bool = False):
        ids = [render_prompt(tokenizer, p, safety_prompt) for p in prompts]
        out = []
        for i in tqdm(range(0, len(ids), 16), desc="self answers", unit="batch"):
            out += [g.tokens for g in sampler.generate(engine.weights, ids[i:i + 16], max_new_tokens)]
        # the sampler cuts at (and drops) the end-of-turn token: a full-length reply did not end by itself
        return [Answer(tokenizer.decode(t, skip_special_tokens=True), len(t) < max_new_tokens) for t in out]
    return answer


def check_lengths(tokenizer, examples, max_length: int, safety_prompt: bool) -> None:
    """Fail before training, naming the longest prompt, when prompts cannot fit ``max_length``."""
    longest, prompt = max((len(render_prompt(tokenizer, e.prompt, safety_prompt)), e.prompt) for e in examples)
    if longest + 2 > max_length:  # + safety token + at least one target token
        raise ConfigError(f"--config.data.max_length={max_length} is too short: the longest prompt takes {longest} "
                          f"tokens ({prompt[:50]!r}...); raise it to at least {longest + 2} or lower "
                          "--config.data.max_chars")


def check_config(config) -> None:
    """Settings that would fail late or train nothing, refused before any work with the key named."""
    for key in ("num_train_steps", "batch_size", "grad_accum_steps", "log_every_steps", "eval_every_steps",
                "checkpoint_every_steps"):
        value = config.get(key)
        if key == "batch_size" and config.get("per_device_batch_size"):
            value = config.per_device_batch_size
            key = "per_device_batch_size"
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--config.{key}={value!r}: expected a positive integer")
    if jax.process_count() > 1:  # the inference Engine decodes in one process
        if config.get("calibrate_threshold"):
            raise ConfigError("--config.calibrate_threshold=True decodes with the inference Engine, which runs "
                              "in one process; train with it False on several processes and set casa.threshold")
        data = config.data
        if (data.benign_target == "self" or data.harmful_target == "model") and not (
                data.targets_file and storage.isfile(data.targets_file)):
            raise ConfigError(f"--config.data.benign_target={data.benign_target!r} / harmful_target="
                              f"{data.harmful_target!r} need the base's own replies, decoded in one process: fill "
                              "--config.data.targets_file with a one-process run of the same data settings first")
    try:
        trainable_parts(config.objective)
    except ValueError as e:
        raise ConfigError(f"--config.objective: {e}") from None
    from casa_jax.data.prompts_io import load_prompts
    for key in ("harmful_sets", "benign_sets"):
        for name in config.data[key]:
            try:
                load_prompts(name)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--config.data.{key}: {e}") from None


def train(config, workdir: str, progress: bool = True, allow_config_change: bool = False) -> dict:
    """Run training as ``config`` says; returns the final metrics (held-out ones prefixed ``eval_``).

    The workdir is locked for the run (a second trainer on it stops at once); resuming its checkpoints
    under other settings is refused unless ``allow_config_change``."""
    check_config(config)
    if storage.isfile(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; expected a directory")
    try:
        storage.makedirs(workdir)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot be created ({e.strerror or e})") from None
    if jax.process_index() != 0:
        return _train(config, workdir, progress, allow_config_change)
    with WorkdirLock(workdir):
        return _train(config, workdir, progress, allow_config_change)


@dataclasses.dataclass
class Base:
    """The model to fine-tune, with the safety tokens added for CASA."""

    spec: Any
    params: Any
    encoders: Any
    tokenizer: Any
    sidecar: str | None
    ids: Any = None  # SafetyTokenIds (CASA)
    unsafe_query: Any = None  # [E] frozen unsafe-token embedding (CASA)
    lora: LoraSpec = LoraSpec()  # the adapters this run trains


def load_base(config, casa_cfg: CasaConfig, mesh, rules) -> Base:
    """The base checkpoint (or the embedded tiny model) placed on ``mesh``, its text config given the run's
    dtype and remat settings, the run's LoRA spec, and (CASA) the safety tokens."""
    spec, params, encoders, tokenizer, sidecar = _base(config, mesh, rules)
    ids = unsafe_query = None
    if config.objective == "casa":
        tokenizer, params, spec, ids, unsafe_query = add_safety_tokens(tokenizer, params, spec, casa_cfg)
    try:
        lora = LoraSpec(config.lora.rank, config.lora.alpha, config.lora.dropout, tuple(config.lora.targets))
    except ConfigError as e:
        raise ConfigError(f"--config.lora: {e}") from None
    text = spec.text.replace(dtype=config.dtype, param_dtype="float32", remat_policy=config.remat_policy)
    spec = spec.__class__(text=text, model_type=spec.model_type, hf_config=spec.hf_config)
    return Base(spec, params, encoders, tokenizer, sidecar, ids, unsafe_query, lora)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, placed on the mesh: the jitted step and eval, the state, the frozen
    arrays, and the rules context they run under."""

    mesh: Any
    rules: tuple
    setup: ObjectiveSetup
    state: Any
    frozen: Any
    step_fn: Any
    eval_fn: Any
    batch_size: int

    def context(self):
        return rules_context(self.mesh, self.rules)


def build_run(config, base: Base, casa_cfg: CasaConfig, mesh, rules) -> Run:
    """Trainable parts (LoRA, the CASA safety head), optimizer, mesh placement (frozen params and LoRA by
    their logical axes, the safety head replicated, batches over the data-parallel axes) and the jitted
    step, all under the logical-axis rules."""
    objective, text = config.objective, base.spec.text
    key = jax.random.key(config.seed)
    trainable = {"lora": init_lora(text, base.lora, jax.random.fold_in(key, 1))}
    frozen = {"params": base.params}
    if objective == "casa":
        dummy = np.zeros((1, 2, text.hidden_size), np.float32)
        trainable["safety"] = nn.unbox(SafetyAttention(casa_cfg).init(
            jax.random.fold_in(key, 2), base.unsafe_query, dummy, np.ones((1, 2), bool))["params"])
        frozen["unsafe_query"] = base.unsafe_query
    assert set(trainable) == set(trainable_parts(objective))
    setup = ObjectiveSetup(text=text, casa=casa_cfg, ids=base.ids, lora=base.lora, loss_chunk=config.loss_chunk,
                           circuit_breaker=CircuitBreakerConfig(tuple(config.circuit_breaker.layers),
                                                                config.circuit_breaker.alpha,
                                                                config.circuit_breaker.retain_norm))
    steps = int(config.num_train_steps)
    optim = OptimConfig(learning_rate=config.learning_rate, safety_learning_rate=config.safety_learning_rate,
                        warmup_steps=config.warmup_steps, total_steps=steps, weight_decay=config.weight_decay,
                        grad_clip=config.grad_clip)
    optimizer = make_optimizer(optim, trainable)
    decoder_sh = decoder_shardings(text, mesh, rules, base.lora)
    trainable_sh = {"lora": decoder_sh[LORA_COLLECTION]}
    frozen_sh = {"params": decoder_sh["params"]}
    if objective == "casa":
        trainable_sh["safety"] = replicated(trainable["safety"], mesh)
        frozen_sh["unsafe_query"] = replicated(base.unsafe_query, mesh)
    init = lambda t: init_state(t, optimizer)  # noqa: E731
    with rules_context(mesh, rules):
        state_sh = state_shardings(jax.eval_shape(init, trainable), trainable_sh, mesh)
        state = jax.jit(init, out_shardings=state_sh)(place(trainable, trainable_sh))
    step_fn = make_train_step(objective, setup, optimizer, steps, accum_steps=config.grad_accum_steps,
                              shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
    eval_fn = make_eval_fn(objective, setup, config.eval_batch_size, NamedSharding(mesh, PartitionSpec()))
    return Run(mesh, rules, setup, state, place(frozen, frozen_sh), step_fn, eval_fn, _global_batch_size(config, mesh))


def make_stream(config, examples, batch_size: int):
    """This process's shard of the shuffled training examples, resumable."""
    data = config.data
    if data.source == "memory":
        return ExampleStream(examples, batch_size, config.seed, jax.process_index(), jax.process_count())
    if data.source == "tfds":
        return GrainStream(examples, batch_size, config.seed, data.tfds_data_dir, jax.process_index(),
                           jax.process_count())
    raise ConfigError(f"--config.data.source={data.source!r}; expected 'memory' or 'tfds'")


def _train(config, workdir: str, progress: bool, allow_config_change: bool) -> dict:
    """The loop: load, build data, place, resume, step, log, checkpoint; then calibrate and save once."""
    objective, data, steps = config.objective, config.data, int(config.num_train_steps)
    writer_process = jax.process_index() == 0  # one process writes config, metrics and TensorBoard
    config_json = config.to_json_best_effort(indent=2)
    changes = check_resume(workdir, config_json, allow_config_change)
    casa_cfg = CasaConfig.from_dict(config.casa.to_dict())
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes))
    rules = rules_from_config(config.logical_axis_rules)
    base = load_base(config, casa_cfg, mesh, rules)
    tokenizer, batch_ids = base.tokenizer, base.ids  # safety-token ids label CASA batches only
    train_examples, heldout = _examples(config, casa_cfg, base.spec, base.params, tokenizer, workdir, writer_process)
    check_lengths(tokenizer, train_examples + heldout, data.max_length, casa_cfg.safety_prompt)
    run = build_run(config, base, casa_cfg, mesh, rules)
    heldout_batch = build_batch(tokenizer, heldout, data.max_length, batch_ids, casa_cfg.safety_prompt)
    stream = make_stream(config, train_examples, run.batch_size)

    checkpoints = TrainCheckpoints(storage.join(workdir, CHECKPOINTS_DIR), config.checkpoint_every_steps,
                                   config.keep_checkpoints)
    state, key = run.state, jax.random.key(config.seed)
    start = checkpoints.latest_step() or 0
    if start > steps:
        checkpoints.close()
        raise ConfigError(f"{workdir} holds a run trained to step {start}, more than --config.num_train_steps={steps}; "
                          "it would serve that model unchanged: use a new --workdir for a shorter run")
    if start:
        state, data_state = checkpoints.restore(start, abstract_like(state))
        stream.restore(data_state["stream"])
        key = jax.random.wrap_key_data(np.asarray(data_state["rng"], np.uint32))
        log.info("resumed from step %d (%s)", start, checkpoints.directory)
    metrics_path = storage.join(workdir, "metrics.jsonl")
    if writer_process:  # the record is rewritten only once the checkpoints it describes are restored
        write_config(workdir, config_json, changes, start)
        if changes:
            log.warning("continuing %s from step %d under changed settings: %s", workdir, start, sorted(changes))
    metrics_log = MetricsLog(metrics_path, start, writer_process)
    preempted = _PreemptionFlag()
    final: dict = last_record(metrics_path)
    t0 = time.time()
    tensorboard = _TensorBoard(workdir)
    try:
        with run.context(), tqdm(total=steps, initial=start, desc=f"train {objective}", unit="step",
                                     disable=not (progress and writer_process)) as bar:
            for step in range(start + 1, steps + 1):
                local = build_batch(tokenizer, stream.next(), data.max_length, batch_ids, casa_cfg.safety_prompt)
                state, metrics = run.step_fn(state, run.frozen, global_batch(local, run.mesh), key)
                loss = float(metrics["loss"])
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step}: the loss is {loss}; stopping without saving this state. The last good "
                        f"checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory}; lower "
                        "--config.learning_rate or raise --config.grad_clip")
                bar.update()
                record = None
                if step % config.log_every_steps == 0 or step == steps:
                    record = {"step": step, **{k: float(v) for k, v in metrics.items()},
                              "elapsed_s": round(time.time() - t0, 2)}
                    bar.set_postfix(loss=f"{loss:.3f}")
                if step % config.eval_every_steps == 0 or step == steps:
                    held = run.eval_fn(state.trainable, run.frozen, heldout_batch)
                    record = {**(record or {"step": step, "loss": loss}),
                              **{f"eval_{k}": float(v) for k, v in held.items()}}
                if record:
                    metrics_log.append(record)
                    tensorboard.add(record)
                    final = record
                data_state = {"stream": stream.state(), "rng": np.asarray(jax.random.key_data(key)).tolist()}
                stop = preempted.value  # read once: a signal landing during save() is handled next step
                checkpoints.save(step, state, data_state, force=stop or step == steps)
                if stop:
                    checkpoints.wait()
                    message = (f"{preempted.signal_name}: saved step {step} of {steps} to {checkpoints.directory}; "
                               "rerun the same command to continue")
                    log.warning(message)
                    print(message, file=sys.stderr, flush=True)
                    raise Preempted(step, preempted.signum)
    finally:
        checkpoints.close()
        preempted.restore()
        tensorboard.close()
    model = trained_model(config, base, casa_cfg, run.setup, to_host(state.trainable))
    if objective == "casa" and config.get("calibrate_threshold"):
        model, record = calibrate(model, tokenizer, heldout, steps)
        metrics_log.append(record)
        final = {**final, **record}
    out_dir = storage.join(workdir, CHECKPOINT_DIR)
    # every process saves: the frozen base may span them, and orbax's save waits for all
    save_trained(out_dir, model, tokenizer, sidecar_from=base.sidecar, overwrite=True,
                 encoders_from=config.base if base.spec.is_thinker else None)
    log.info("saved %s", out_dir)
    return final


def trained_model(config, base: Base, casa_cfg: CasaConfig, setup: ObjectiveSetup, trained: dict) -> TrainedModel:
    """The final model: the frozen base plus what was trained, and what serving needs to know of it."""
    objective = config.objective
    cb = setup.circuit_breaker
    return TrainedModel(spec=base.spec, params=base.params, encoders=base.encoders, objective=objective,
                        lora=trained["lora"], lora_spec=base.lora, casa=casa_cfg if base.ids else None,
                        ids=base.ids, safety=trained.get("safety"), unsafe_query=base.unsafe_query,
                        meta_circuit_breaker={"layers": list(cb.resolved_layers(base.spec.text.num_hidden_layers)),
                                              "alpha": cb.alpha, "retain_norm": cb.retain_norm}
                        if objective == "circuit_breaker" else None)


def calibrate(model: TrainedModel, tokenizer, heldout, step: int) -> tuple[TrainedModel, dict]:
    """The balanced-accuracy threshold on the held-out (validation) prompts, through the same Engine and
    decode loop evaluation uses; returns the model carrying it and the metrics record."""
    from casa_jax.casa.calibration import balanced_threshold
    from casa_jax.infer.chat import chat_replies
    from casa_jax.infer.engine import Engine
    replies = chat_replies(Engine(model, tokenizer, name="calibration"), [e.prompt for e in heldout],
                           max_new_tokens=1)
    harmful = [r.p_unsafe for r, e in zip(replies, heldout) if e.harmful]
    benign = [r.p_unsafe for r, e in zip(replies, heldout) if not e.harmful]
    threshold = balanced_threshold(harmful, benign)
    balanced = float((np.mean(np.asarray(harmful) >= threshold) + np.mean(np.asarray(benign) < threshold)) / 2)
    log.info("safety threshold calibrated on %d held-out prompts: p_unsafe >= %.4f (balanced accuracy %.3f)",
             len(heldout), threshold, balanced)
    model = dataclasses.replace(model, casa=dataclasses.replace(model.casa, threshold=threshold))
    return model, {"step": step, "calibrated_threshold": threshold, "calibration_balanced_accuracy": balanced}
