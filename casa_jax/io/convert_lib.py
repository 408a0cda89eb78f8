"""Whole-checkpoint conversions used by the convert CLI, the demo and the tests."""

from __future__ import annotations

import logging
import os

from casa_jax import storage
from casa_jax.io.hf import load_hf_checkpoint, write_hf_checkpoint
from casa_jax.io.hf_files import CheckpointError, check_output_dir
from casa_jax.io.orbax_io import restore_checkpoint, save_checkpoint, sidecar_dir
from casa_jax.paths import refuse_overlap


def hf_to_ckpt(hf_dir: str, out_dir: str, param_dtype: str | None = None, overwrite: bool = False) -> None:
    """Hugging Face directory -> casa-jax checkpoint (tokenizer files carried along)."""
    refuse_overlap({"--out_dir": out_dir}, {"--hf_dir": hf_dir}, CheckpointError)
    check_output_dir(out_dir, overwrite)
    with storage.local_dir(hf_dir) as local:  # safetensors reads local files: a bucket's are copied first
        loaded = load_hf_checkpoint(local, param_dtype=param_dtype)
        save_checkpoint(out_dir, loaded, sidecar_from=local, overwrite=overwrite)


log = logging.getLogger(__name__)


def gguf_to_ckpt(gguf_path: str, out_dir: str, param_dtype: str | None = None, overwrite: bool = False,
                 hf_dir: str | None = None) -> None:
    """llama.cpp GGUF file -> casa-jax checkpoint, through a Hugging Face directory (kept at ``hf_dir``
    if given, else a temporary one): dequantized float32 weights, config and tokenizer from the file."""
    import tempfile

    from casa_jax.io.gguf_import import gguf_to_hf_dir
    refuse_overlap({"--out_dir": out_dir, "hf_dir": hf_dir}, {"--gguf": gguf_path}, CheckpointError)
    check_output_dir(out_dir, overwrite)
    if hf_dir:
        gguf_to_hf_dir(gguf_path, hf_dir, overwrite=overwrite)
        hf_to_ckpt(hf_dir, out_dir, param_dtype, overwrite)
        return
    parent = None  # a bucket output: the staging folder goes to the system's temporary directory
    if not storage.is_remote(out_dir):
        parent = os.path.dirname(os.path.abspath(out_dir))  # beside the output: same filesystem, no /tmp limits
        os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        gguf_to_hf_dir(gguf_path, os.path.join(tmp, "hf"))
        hf_to_ckpt(os.path.join(tmp, "hf"), out_dir, param_dtype, overwrite)


def ckpt_to_hf(ckpt_dir: str, export_hf_dir: str, max_shard_bytes: int, overwrite: bool = False) -> None:
    """casa-jax checkpoint -> Hugging Face directory that transformers loads.

    A trained checkpoint's LoRA adapters are merged into the exported kernels; its safety tokens stay
    in the (resized) vocabulary and tokenizer. The safety head has no transformers counterpart and stays
    in the casa-jax checkpoint only.
    """
    refuse_overlap({"--export_hf_dir": export_hf_dir}, {"--ckpt_dir": ckpt_dir}, CheckpointError)
    check_output_dir(export_hf_dir, overwrite)
    loaded = restore_checkpoint(ckpt_dir)
    params = loaded.params
    if "lora" in loaded.extra:
        from casa_jax.model.layers import LoraSpec
        from casa_jax.peft.lora import merge_lora
        spec = LoraSpec.from_dict(loaded.meta["lora"])
        params = merge_lora(params, loaded.extra["lora"], spec)
        log.info("%s: merged the LoRA adapters (rank %d) into the exported weights", ckpt_dir, spec.rank)
    if "safety" in loaded.extra:
        log.warning("%s: the CASA safety head (v_s) is not part of a Hugging Face export; transformers will "
                    "predict the safety token from the LM head alone", ckpt_dir)
    write_hf_checkpoint(export_hf_dir, params, loaded.spec, loaded.encoders,
                        sidecar_dir=sidecar_dir(ckpt_dir), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
