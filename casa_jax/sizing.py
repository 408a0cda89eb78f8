"""Real model sizes on paper: parameter counts and per-device memory on a chosen mesh, without
allocating anything (``jax.eval_shape`` of the inits; shardings from the logical-axis rules).

  python -m casa_jax.sizing --config=configs/qwen2_5_omni_7b.py --slice=v5p-8 --mode=lora

Params, gradients and AdamW state are exact per-device byte counts of the sharded arrays; activations
are an estimate (what the remat policy keeps per layer, plus one layer's working set).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
from absl import app, flags

from casa_jax.cli import define_config_file, run
from casa_jax.model.config import TextConfig
from casa_jax.model.encoder_config import AudioConfig, VisionConfig
from casa_jax.model.layers import LoraSpec
from casa_jax.model.text_decoder import CausalLM, init_inputs
from casa_jax.model.thinker import init_encoders
from casa_jax.sharding import DEFAULT_RULES, fit_spec

# Cloud TPU slices: (JAX devices, HBM GiB per device). v5p and v4 expose one device per chip (megacore).
SLICES = {"v5p-8": (4, 95), "v5p-16": (8, 95), "v5p-32": (16, 95), "v5p-64": (32, 95), "v5p-128": (64, 95),
          "v4-8": (4, 32), "v4-16": (8, 32), "v4-32": (16, 32), "v4-64": (32, 32),
          "v5litepod-8": (8, 16), "v5litepod-16": (16, 16), "v5e-8": (8, 16), "v5e-16": (16, 16),
          "v6e-8": (8, 32), "v6e-16": (16, 32)}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def configs_from(config) -> tuple[TextConfig, VisionConfig | None, AudioConfig | None]:
    """The model configs of an ml_collections thinker config (``configs/qwen2_5_omni_*.py``)."""
    text = TextConfig.from_dict(config.model.to_dict())
    vision = VisionConfig.from_hf(config.vision.to_dict()) if "vision" in config else None
    audio = AudioConfig.from_hf(config.audio.to_dict()) if "audio" in config else None
    return text, vision, audio


def _abstract(text, vision, audio, lora_rank: int = 0) -> dict[str, Any]:
    lora = LoraSpec(rank=lora_rank) if lora_rank else LoraSpec()
    out = {"decoder": jax.eval_shape(lambda: CausalLM(text, lora).init(jax.random.key(0), *init_inputs()))}
    if vision is not None and audio is not None:
        encoders = jax.eval_shape(lambda: init_encoders(vision, audio, jax.random.key(0), unbox=False))
        out["vision"], out["audio"] = {"params": encoders["visual"]}, {"params": encoders["audio_tower"]}
    return out


def count_params(text: TextConfig, vision: VisionConfig | None = None, audio: AudioConfig | None = None
                 ) -> dict[str, int]:
    """Parameters per component (decoder, vision, audio) and in total."""
    counts = {name: int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree["params"]))))
              for name, tree in _abstract(text, vision, audio).items()}
    counts["total"] = sum(counts.values())
    return counts


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    devices: int
    mesh: tuple[int, int, int]
    params: float  # GiB per device
    grads: float
    optimizer: float
    activations: float
    trainable_params: int

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _per_device_bytes(abstract_boxed, mesh_shape: dict[str, int], dtype_bytes: int, rules=DEFAULT_RULES) -> float:
    specs = nn.get_partition_spec(abstract_boxed)
    arrays = nn.unbox(abstract_boxed)
    mesh = _FakeMesh(mesh_shape)
    total = 0.0
    for spec, a in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                       jax.tree.leaves(arrays)):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), list(rules)) if spec else jax.sharding.PartitionSpec()
        fitted = fit_spec(mesh_spec, a.shape, mesh)
        split = 1
        for axes in fitted:
            for name in (axes,) if isinstance(axes, str) else tuple(axes or ()):
                split *= mesh_shape[name]
        total += math.prod(a.shape) * dtype_bytes / split
    return total


class _FakeMesh:
    """Just enough of a Mesh (``.shape``) for ``fit_spec`` on a slice we do not have."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape


def memory_report(text: TextConfig, vision, audio, devices: int, mode: str = "lora", lora_rank: int = 16,
                  per_device_batch: int = 1, seq_len: int = 2048, mesh: tuple[int, int, int] | None = None
                  ) -> MemoryReport:
    """Per-device GiB for full fine-tuning (``full``) or LoRA (``lora``) on ``devices`` chips."""
    mesh = mesh or (1, devices, 1)
    if math.prod(mesh) != devices:
        raise ValueError(f"mesh {mesh} does not use {devices} devices")
    axes = dict(zip(("data", "fsdp", "tensor"), mesh))
    gib = 1024 ** 3
    trees = _abstract(text, vision, audio, lora_rank if mode == "lora" else 0)
    param_bytes = BYTES[text.param_dtype]
    params = sum(_per_device_bytes(t["params"], axes, param_bytes) for t in trees.values())
    if mode == "full":
        trainable_tree = trees["decoder"]["params"]
    elif mode == "lora":
        trainable_tree = trees["decoder"]["lora"]
    else:
        raise ValueError(f"mode {mode!r}; expected 'full' or 'lora'")
    trainable = int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(trainable_tree))))
    grads = _per_device_bytes(trainable_tree, axes, 4)
    optimizer = 2 * grads  # AdamW mu and nu in fp32
    if mode == "lora":
        params += _per_device_bytes(trainable_tree, axes, 4)
    # Activations: what the remat policy keeps, one layer's working set, the gathered FSDP weights and the
    # chunked loss (train_step_memory's estimate for the trainer's step).
    step = train_step_memory(text, mesh, per_device_batch, seq_len, max(lora_rank, 1))
    activations = step.gathered + step.saved + step.live + step.loss + step.batch
    return MemoryReport(devices, mesh, params / gib, grads / gib, optimizer / gib, activations / gib, trainable)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one LoRA train step (the trainer's ``make_train_step``), by what holds them."""

    frozen: float  # the base decoder's shard, as stored
    state: float  # trainable LoRA + safety head, AdamW mu and nu (fp32)
    grads: float  # their gradients and the update's temporaries (fp32)
    gathered: float  # FSDP: a layer's weights all-gathered for compute (two in flight) + the embedding
    saved: float  # what the remat policy keeps per layer for the backward pass, over all layers
    live: float  # one layer's full working set, recomputed in its backward pass
    loss: float  # the chunked LM loss: fp32 logits of one chunk (their softmax gradient fused in place), the final hidden states
    batch: float

    @property
    def total(self) -> float:
        return sum(dataclasses.asdict(self).values())


def _per_token_activations(text: TextConfig, seq_len: int, tensor: int) -> tuple[float, float]:
    """(bytes of a layer's intermediates per token, bytes of its attention scores + probabilities per token)."""
    act = BYTES[text.dtype]
    e, i, d = text.hidden_size, text.intermediate_size, text.resolved_head_dim
    h, k = text.num_attention_heads, text.num_key_value_heads
    dense = act * (6 * e + (3 * h * d + 3 * k * d + 4 * i) / tensor)
    scores = (4 + act) * h * seq_len / tensor  # fp32 scores, then probabilities in the compute dtype
    return dense, scores


def train_step_memory(text: TextConfig, mesh: tuple[int, int, int], per_device_batch: int, seq_len: int,
                      lora_rank: int = 16, loss_chunk: int = 128, frozen_dtype: str | None = None) -> StepMemory:
    """An estimate, from the shapes and the sharding rules, of the per-device peak of the trainer's LoRA
    step on a ``(data, fsdp, tensor)`` mesh; ``text.remat_policy`` decides what the backward pass keeps.
    Checked against XLA's ``compiled.memory_analysis()`` in tests/test_sizing.py."""
    axes = dict(zip(("data", "fsdp", "tensor"), mesh))
    tensor = axes["tensor"]
    trees = _abstract(text, None, None, lora_rank)["decoder"]
    frozen = _per_device_bytes(trees["params"], axes, BYTES[frozen_dtype or text.param_dtype])
    lora = _per_device_bytes(trees["lora"], axes, 4)
    act = BYTES[text.dtype]
    e, i, d = text.hidden_size, text.intermediate_size, text.resolved_head_dim
    h, k = text.num_attention_heads, text.num_key_value_heads
    layer_weights = act * (e * (2 * h * d + 2 * k * d) + 3 * e * i) / tensor
    gathered = 2 * layer_weights + act * text.vocab_size * e / tensor * (1 if text.tie_word_embeddings else 2)
    tokens = per_device_batch * seq_len
    dense, scores = _per_token_activations(text, seq_len, tensor)
    kept = {"none": dense + scores, "full": act * e,
            "dots": act * (2 * e + (h * d + 2 * k * d + 2 * i) / tensor) + act * 2 * h * seq_len / tensor,
            "dots_with_no_batch_dims": act * (2 * e + (h * d + 2 * k * d + 2 * i) / tensor),
            "minimal": act * (2 * e + (h * d + 2 * k * d + 2 * i) / tensor)}[text.remat_policy]
    saved = text.num_hidden_layers * tokens * kept
    live = tokens * (dense + scores)
    chunk = min(loss_chunk, seq_len)
    loss = per_device_batch * chunk * text.vocab_size * 4 / tensor + tokens * e * 4
    return StepMemory(frozen=frozen, state=3 * lora + 4 * e, grads=2 * lora, gathered=gathered, saved=saved,
                      live=live, loss=loss, batch=7 * tokens * 4)


def compiled_step_memory(text: TextConfig, mesh_shape: tuple[int, int, int], global_batch: int, seq_len: int,
                         lora_rank: int = 16, loss_chunk: int = 128) -> int:
    """XLA's own per-device peak (arguments + outputs - aliased + temporaries) of the trainer's CASA step,
    compiled for ``mesh_shape`` with the real shardings and nothing allocated (abstract inputs). Needs
    ``prod(mesh_shape)`` devices (on a CPU: ``--xla_force_host_platform_device_count``)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from casa_jax.casa.config import CasaConfig
    from casa_jax.casa.examples import TrainBatch
    from casa_jax.casa.objectives import ObjectiveSetup
    from casa_jax.casa.safety_attention import SafetyAttention
    from casa_jax.casa.safety_tokens import SafetyTokenIds
    from casa_jax.peft.lora import init_lora
    from casa_jax.sharding import decoder_shardings, make_mesh, replicated, rules_context
    from casa_jax.train.placement import batch_sharding, state_shardings
    from casa_jax.train.step import OptimConfig, init_state, make_optimizer, make_train_step

    mesh, lora, casa = make_mesh(mesh_shape), LoraSpec(lora_rank, 2.0 * lora_rank), CasaConfig()
    e = text.hidden_size
    trainable = {"lora": jax.eval_shape(lambda: init_lora(text, lora, jax.random.key(1))),
                 "safety": jax.eval_shape(lambda: nn.unbox(SafetyAttention(casa).init(
                     jax.random.key(2), jnp.zeros(e), jnp.zeros((1, 2, e)), jnp.ones((1, 2), bool))["params"]))}
    params = jax.eval_shape(lambda: nn.unbox(CausalLM(text).init(jax.random.key(0), *init_inputs())["params"]))
    frozen = {"params": params, "unsafe_query": jax.ShapeDtypeStruct((e,), jnp.float32)}
    decoder_sh = decoder_shardings(text, mesh, DEFAULT_RULES, lora)
    frozen_sh = {"params": decoder_sh["params"], "unsafe_query": NamedSharding(mesh, PartitionSpec())}
    optimizer = make_optimizer(OptimConfig(total_steps=10), trainable)
    setup = ObjectiveSetup(text=text, casa=casa, ids=SafetyTokenIds(1, 2), lora=lora, loss_chunk=loss_chunk)
    with rules_context(mesh, DEFAULT_RULES):
        state = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
        state_sh = state_shardings(state, {"lora": decoder_sh["lora"], "safety": replicated(trainable["safety"], mesh)},
                                   mesh)
        step = make_train_step("casa", setup, optimizer, 10, shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
        rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        batch = TrainBatch(input_ids=rows(global_batch, seq_len), attention_mask=rows(global_batch, seq_len),
                           loss_mask=rows(global_batch, seq_len), prompt_mask=rows(global_batch, seq_len),
                           safety_index=rows(global_batch), label=rows(global_batch),
                           safety_weight=jax.ShapeDtypeStruct((global_batch,), jnp.float32))
        compiled = step.lower(state, frozen, batch, jax.eval_shape(lambda: jax.random.key(0))).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training configuration for one slice, with its estimated per-device peak."""

    slice: str
    mesh: tuple[int, int, int]
    per_device_batch: int
    seq_len: int
    remat: str
    memory: StepMemory
    hbm_gib: float


REMAT_ORDER = ("none", "dots_with_no_batch_dims", "full")  # least recomputation first


def fit_recipe(text: TextConfig, slice_name: str, seq_len: int, lora_rank: int, loss_chunk: int,
               frozen_dtype: str = "bfloat16", headroom: float = 0.85) -> Recipe | None:
    """The configuration that fits ``slice_name`` with the most tokens per device, then the least
    recomputation, then the least tensor parallelism: mesh (1, devices / tensor, tensor) over tensor 1,
    2, 4, 8, the remat policies and batches 1-16 per device, within ``headroom`` of the HBM."""
    devices, hbm = SLICES[slice_name]
    best = None
    for tensor in (1, 2, 4, 8):
        if devices % tensor or text.num_key_value_heads % tensor:
            continue
        mesh = (1, devices // tensor, tensor)
        for rank_remat, remat in enumerate(REMAT_ORDER):
            for batch in (16, 8, 4, 2, 1):
                memory = train_step_memory(text.replace(remat_policy=remat), mesh, batch, seq_len, lora_rank, loss_chunk,
                                           frozen_dtype)
                if memory.total > headroom * hbm * 1024 ** 3:
                    continue
                key = (batch * (devices // tensor), -rank_remat, -tensor)  # global batch, then less remat, less TP
                if best is None or key > best[0]:
                    best = (key, Recipe(slice_name, mesh, batch, seq_len, remat, memory, hbm))
                break
    return best[1] if best else None


def _load_config(path: str):
    """``get_config()`` of a config file (for the model config a training config trains)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("casa_jax_sizing_model_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


define_config_file("config", None, "Model config (configs/qwen2_5_omni_3b.py or _7b.py), or a training config "
                   "(configs/casa_qwen2_5_omni.py) whose sequence length, LoRA rank and loss chunk are used with "
                   "--model_config.")
flags.DEFINE_string("model_config", None, "With a training --config: the model it trains "
                    "(default configs/qwen2_5_omni_7b.py).")
flags.DEFINE_list("recipe", [], "With a training --config: find, for each of these slices (e.g. v5p-8,v5e-16), "
                  "a mesh, remat policy and batch that fit.")
flags.DEFINE_enum("slice", "v5p-8", sorted(SLICES), "Cloud TPU slice.")
flags.DEFINE_enum("mode", "lora", ["lora", "full"], "LoRA (frozen base) or full fine-tuning.")
flags.DEFINE_integer("lora_rank", 16, "LoRA rank (mode=lora).")
flags.DEFINE_integer("per_device_batch_size", 1, "Sequences per device.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (default: all devices on fsdp).")
FLAGS = flags.FLAGS


def _print_recipes(config) -> None:
    import os

    from casa_jax.cli import REPO_ROOT
    path = FLAGS.model_config or os.path.join(REPO_ROOT, "configs", "qwen2_5_omni_7b.py")
    text, _, _ = configs_from(_load_config(path))
    seq, rank, chunk = config.data.max_length, config.lora.rank, config.get("loss_chunk", 128)
    print(f"{os.path.basename(path)}: decoder {count_params(text)['decoder']:,} parameters (bf16, frozen), LoRA rank "
          f"{rank}, {seq} tokens per sequence, loss chunk {chunk}; estimates from the sharding rules "
          "(checked against XLA's memory_analysis on a scaled-down model: tests/test_sizing.py)")
    for name in FLAGS.recipe:
        if name not in SLICES:
            raise app.UsageError(f"--recipe: unknown slice {name!r}; expected some of {sorted(SLICES)}")
        r = fit_recipe(text, name, seq, rank, chunk)
        if r is None:
            print(f"{name}: nothing fits, even batch 1 with full remat")
            continue
        m = r.memory
        parts = ", ".join(f"{k} {v / 1024 ** 3:.2f}" for k, v in dataclasses.asdict(m).items())
        print(f"{name}: --config.mesh.shape='{r.mesh}' --config.remat_policy={r.remat} "
              f"--config.per_device_batch_size={r.per_device_batch} --config.data.max_length={r.seq_len}: "
              f"{m.total / 1024 ** 3:.2f} of {r.hbm_gib} GiB per device ({parts} GiB)")


def main(argv):
    del argv
    if "objective" in FLAGS.config:  # a training config
        if not FLAGS.recipe:
            raise app.UsageError("a training --config needs --recipe=SLICE[,SLICE] (e.g. v5p-8,v5e-16)")
        _print_recipes(FLAGS.config)
        return
    text, vision, audio = configs_from(FLAGS.config)
    devices, hbm = SLICES[FLAGS.slice]
    mesh = tuple(int(x) for x in FLAGS.mesh.split(",")) if FLAGS.mesh else None
    counts = count_params(text, vision, audio)
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    r = memory_report(text, vision, audio, devices, FLAGS.mode, FLAGS.lora_rank, FLAGS.per_device_batch_size,
                      FLAGS.seq_len, mesh)
    print(f"{FLAGS.slice}: {devices} devices x {hbm} GiB HBM, mesh (data, fsdp, tensor) = {r.mesh}, mode {FLAGS.mode}"
          f" ({r.trainable_params:,} trainable), batch {FLAGS.per_device_batch_size} x {FLAGS.seq_len} per device")
    for name in ("params", "grads", "optimizer", "activations"):
        print(f"  {name:<12} {getattr(r, name):8.2f} GiB per device" + (" (estimate)" if name == "activations" else ""))
    print(f"  {'total':<12} {r.total:8.2f} GiB per device: {'fits' if r.total < hbm else 'does NOT fit'} in {hbm} GiB")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    run(main)
