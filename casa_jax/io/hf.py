"""Hugging Face checkpoint import (HF dir -> params pytree) and export (params -> HF dir).

Import reads one tensor at a time and places it straight onto its target sharding, so a large
checkpoint never needs two full host copies. Every tensor is accounted for: missing, unexpected or
mis-shaped keys give one error listing them all. A thinker's encoder tensors (``visual.*``,
``audio_tower.*``) go through the same name map into an ``encoders`` tree of Flax params.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from casa_jax import storage
from casa_jax.distributed import is_writer, to_host
from casa_jax.io import hf_files
from casa_jax.io.hf_files import CheckpointError, SafetensorsDir
from casa_jax.io.name_map import Rule, audio_rules, expected_hf_shapes, text_rules, vision_rules
from casa_jax.model.config import OMNI_THINKER, ModelSpec, load_hf_spec
from casa_jax.model.encoder_config import encoder_configs

log = logging.getLogger(__name__)

# Non-weight files worth carrying from an HF directory to an export (tokenizer, chat template, ...).
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "special_tokens_map.json", "chat_template.json", "chat_template.jinja",
                 "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "processor_config.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
ENCODER_TREES = ("visual", "audio_tower")  # top-level names of the encoder params (rule paths start so)


@dataclasses.dataclass
class LoadedCheckpoint:
    spec: ModelSpec
    params: dict  # the CausalLM params tree
    encoders: dict = dataclasses.field(default_factory=dict)  # thinkers: {"visual": ..., "audio_tower": ...}
    extra: dict = dataclasses.field(default_factory=dict)  # other saved trees, e.g. {"lora": ..., "safety": ...}
    meta: dict = dataclasses.field(default_factory=dict)  # extra JSON metadata saved with them (e.g. "casa")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def checkpoint_rules(spec: ModelSpec) -> list[Rule]:
    """Every tensor of the checkpoint: the decoder, plus both encoders for a thinker."""
    rules = text_rules(spec.text)
    if spec.is_thinker:
        vision, audio = encoder_configs(spec)
        rules += vision_rules(vision) + audio_rules(audio)
    return rules


def _tree_for(rule: Rule, params: dict, encoders: dict) -> tuple[dict, tuple[str, ...]]:
    return (encoders, rule.path) if rule.path[0] in ENCODER_TREES else (params, rule.path)


def check_tensor_set(files: SafetensorsDir, spec: ModelSpec, rules: list[Rule]) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected and mis-shaped key."""
    cfg = spec.text
    expected = expected_hf_shapes(rules)
    present = set(files.keys())
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in present
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ({"lm_head.weight"} if tied_head else set()))
    misshaped = [f"{k}: file has {list(files.shape(k))}, config expects {list(expected[k])}"
                 for k in sorted(set(expected) & present) if files.shape(k) != expected[k]]
    if tied_head and files.shape("lm_head.weight") != expected["model.embed_tokens.weight"]:
        misshaped.append(f"lm_head.weight: file has {list(files.shape('lm_head.weight'))}, tied embeddings "
                         f"expect {list(expected['model.embed_tokens.weight'])}")
    if missing or unexpected or misshaped:
        parts = [f"{files.hf_dir}: the weights do not match config.json ({spec.model_type}, "
                 f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = "\n    ".join(items[:50]) + (f"\n    ... and {len(items) - 50} more" if len(items) > 50 else "")
                parts.append(f"  {title} ({len(items)}):\n    {shown}")
        raise CheckpointError("\n".join(parts))


def _place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of weights we import


def _tensor_count(rules: list[Rule]) -> int:
    return sum(r.num_layers if r.per_layer else 1 for r in rules)


def load_hf_checkpoint(hf_dir: str, shardings: Any = None, param_dtype: str | None = None,
                       progress: bool = True, **policy) -> LoadedCheckpoint:
    """Read an HF directory into params trees, placing each decoder tensor on ``shardings`` (a tree
    like the params, of ``jax.sharding.Sharding``; None puts everything on the default device).

    ``param_dtype`` casts the weights (default: keep the file's dtype); ``policy`` sets TextConfig
    runtime fields such as the compute ``dtype``. Encoder params land on the default device.
    """
    spec = load_hf_spec(hf_dir, **policy)
    if param_dtype is not None:
        spec = dataclasses.replace(spec, text=spec.text.replace(param_dtype=param_dtype))
    files = SafetensorsDir(hf_dir)
    rules = checkpoint_rules(spec)
    check_tensor_set(files, spec, rules)
    not_float = {k: files.dtype(k) for k in files.keys() if files.dtype(k) not in FLOAT_DTYPES}
    if not_float:
        shown = ", ".join(f"{k} ({d})" for k, d in list(not_float.items())[:5])
        raise CheckpointError(f"{hf_dir}: {len(not_float)} weight tensors are not floating point: {shown}"
                              f"{' ...' if len(not_float) > 5 else ''}; expected F32, F16 or BF16 (quantized "
                              "integer weights must be dequantized first)")
    cast = np.dtype(jax.numpy.dtype(param_dtype)) if param_dtype else None

    params: dict = {}
    encoders: dict = {}
    bar = tqdm(total=_tensor_count(rules), desc="import", unit="tensor", disable=not progress)
    for rule in rules:
        if rule.per_layer:
            stacked = None
            for layer in range(rule.num_layers):
                one = rule.to_jax(files.read(rule.hf_key.format(layer=layer)))
                if stacked is None:  # one preallocated host buffer per stacked parameter
                    stacked = np.empty((rule.num_layers,) + one.shape, cast or one.dtype)
                stacked[layer] = one
                bar.update()
            array = stacked
        else:
            array = rule.to_jax(files.read(rule.hf_key))
            if cast is not None:
                array = array.astype(cast)
            bar.update()
        tree, path = _tree_for(rule, params, encoders)
        sharding = _get(shardings, rule.path) if shardings is not None and tree is params else None
        _set(tree, path, _place(array, sharding))
        del array
    bar.close()
    if spec.text.tie_word_embeddings and "lm_head.weight" in files.keys():
        if not np.array_equal(files.read("lm_head.weight"), files.read("model.embed_tokens.weight")):
            raise CheckpointError(f"{hf_dir}: config.json ties the LM head to the embeddings, but lm_head.weight "
                                  "differs from model.embed_tokens.weight; set tie_word_embeddings=false")
        log.info("%s: lm_head.weight equals the tied embeddings; not stored twice", hf_dir)
    return LoadedCheckpoint(spec=spec, params=params, encoders=encoders)


def hf_tensors(params: Mapping, spec: ModelSpec, encoders: Mapping | None = None,
               progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF key, numpy tensor) for params (+ encoders), one tensor at a time, in canonical key style."""
    rules = checkpoint_rules(spec)
    if spec.is_thinker and not encoders:
        raise CheckpointError("a Qwen2.5-Omni thinker needs its vision and audio encoder params to export; "
                              "got none (convert the original thinker checkpoint with its visual.*/audio_tower.*)")
    with tqdm(total=_tensor_count(rules), desc="export", unit="tensor", disable=not progress) as bar:
        for rule in rules:
            tree, path = _tree_for(rule, dict(params), dict(encoders or {}))
            value = _get(tree, path)
            if rule.per_layer:
                for layer in range(rule.num_layers):
                    yield rule.hf_key.format(layer=layer), rule.to_hf(to_host(value[layer]))
                    bar.update()
            else:
                yield rule.hf_key, rule.to_hf(to_host(value))
                bar.update()


def export_config(spec: ModelSpec) -> dict:
    """The config.json to write: a thinker's own config for Omni checkpoints, else the original."""
    if spec.is_thinker:
        cfg = spec.thinker_config()
        cfg["model_type"] = OMNI_THINKER
        cfg["architectures"] = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        return cfg
    return dict(spec.hf_config)

def write_hf_checkpoint(out_dir: str, params: Mapping, spec: ModelSpec,
                        encoders: Mapping | None = None, sidecar_dir: str | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                        progress: bool = True) -> None:
    """Write safetensors + config.json (+ tokenizer files from ``sidecar_dir``) atomically. With several
    processes all of them call it (each tensor is gathered across them) and process 0 writes."""
    with hf_files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        tensors = hf_tensors(params, spec, encoders, progress and is_writer())
        if not is_writer():
            for _ in tensors:  # the gathers are collective: every process takes part in each
                pass
            return
        with storage.staged_dir(tmp) as local:  # safetensors writes local files; a bucket gets them after
            hf_files.write_safetensors(local, tensors, max_shard_bytes)
            hf_files.write_json(os.path.join(local, "config.json"), export_config(spec))
            if sidecar_dir:
                with storage.local_dir(sidecar_dir) as sidecar:
                    for name in sidecar_files(sidecar):
                        shutil.copyfile(os.path.join(sidecar, name), os.path.join(local, name))


def sidecar_files(hf_dir: str) -> list[str]:
    return [n for n in SIDECAR_FILES if os.path.isfile(os.path.join(hf_dir, n))]
