"""Whole-checkpoint conversions used by the convert CLI, the demo and the tests."""

from __future__ import annotations

from casa_jax.checkpoints.hf import load_hf_checkpoint, write_hf_checkpoint
from casa_jax.checkpoints.orbax_io import restore_checkpoint, save_checkpoint, sidecar_dir


def hf_to_ckpt(hf_dir: str, out_dir: str, param_dtype: str | None = None, overwrite: bool = False) -> None:
    """Hugging Face directory -> casa-jax checkpoint (tokenizer files carried along)."""
    loaded = load_hf_checkpoint(hf_dir, param_dtype=param_dtype)
    save_checkpoint(out_dir, loaded, sidecar_from=hf_dir, overwrite=overwrite)


def ckpt_to_hf(ckpt_dir: str, export_hf_dir: str, max_shard_bytes: int, overwrite: bool = False) -> None:
    """casa-jax checkpoint -> Hugging Face directory that transformers loads."""
    loaded = restore_checkpoint(ckpt_dir)
    write_hf_checkpoint(export_hf_dir, loaded.params, loaded.spec, loaded.encoders,
                        sidecar_dir=sidecar_dir(ckpt_dir), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
