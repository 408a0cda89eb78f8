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
          "v5litepod-8": (8, 16), "v5litepod-16": (16, 16), "v6e-8": (8, 32), "v6e-16": (16, 32)}
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
    # Activations: the remat policy keeps roughly the layer inputs plus matmul outputs (q, k, v, o, gate,
    # up, down) per layer; one layer is live in full during its backward pass.
    act = BYTES[text.dtype]
    tokens = per_device_batch * seq_len
    per_layer_kept = tokens * (2 * text.hidden_size + 2 * text.intermediate_size) * act
    live_layer = tokens * (6 * text.hidden_size + 3 * text.intermediate_size) * act
    logits = tokens * text.vocab_size * 4 / max(axes["tensor"], 1)
    activations = text.num_hidden_layers * per_layer_kept + live_layer + logits
    return MemoryReport(devices, mesh, params / gib, grads / gib, optimizer / gib, activations / gib, trainable)


define_config_file("config", None, "Model config (configs/qwen2_5_omni_3b.py or _7b.py).")
flags.DEFINE_enum("slice", "v5p-8", sorted(SLICES), "Cloud TPU slice.")
flags.DEFINE_enum("mode", "lora", ["lora", "full"], "LoRA (frozen base) or full fine-tuning.")
flags.DEFINE_integer("lora_rank", 16, "LoRA rank (mode=lora).")
flags.DEFINE_integer("per_device_batch_size", 1, "Sequences per device.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (default: all devices on fsdp).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
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
