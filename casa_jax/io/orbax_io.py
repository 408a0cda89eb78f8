"""Our converted-checkpoint directory: orbax arrays plus the configs needed to rebuild and re-export.

Layout of ``CKPT``::

    casa_jax.json     format marker, model type and the TextConfig
    hf_config.json    the original Hugging Face config.json, verbatim
    hf_sidecar/       tokenizer / chat-template files copied from the HF directory
    state/            orbax StandardCheckpointer: {"params": ..., "encoders": {...}} (encoders: thinkers only)

The whole directory is written beside its destination and renamed into place, so an interrupted
write never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from casa_jax import storage
from casa_jax.distributed import is_writer
from casa_jax.io import hf_files
from casa_jax.io.hf import LoadedCheckpoint, sidecar_files
from casa_jax.io.hf_files import CheckpointError
from casa_jax.model.config import ModelSpec, TextConfig

FORMAT = "casa_jax.params"
VERSION = 2  # 2: real encoder params (version 1 carried encoder tensors verbatim)
META_FILE = "casa_jax.json"
HF_CONFIG_FILE = "hf_config.json"
SIDECAR_DIR = "hf_sidecar"
STATE_DIR = "state"


def save_checkpoint(ckpt_dir: str, loaded: LoadedCheckpoint, sidecar_from: str | None = None,
                    overwrite: bool = False, tokenizer=None, encoders_from: str | None = None) -> None:
    """Write params (+ encoder params, extra trees such as LoRA/safety heads, configs, tokenizer files)
    to ``ckpt_dir`` atomically; with several processes, all of them call it. ``tokenizer``: saved into
    the sidecar (after the files copied from ``sidecar_from``), e.g. one that gained safety tokens.
    ``encoders_from``: the checkpoint whose (unchanged) encoders this one uses: referenced, not copied."""
    reference = encoder_reference(encoders_from) if encoders_from else None
    with hf_files.atomic_directory(ckpt_dir, overwrite=overwrite) as tmp:
        state = {"params": loaded.params}
        if loaded.encoders and reference is None:  # orbax cannot store an empty subtree
            state["encoders"] = loaded.encoders
        for name, tree in (loaded.extra or {}).items():
            if name in state:
                raise ValueError(f"extra state {name!r} clashes with a built-in entry")
            state[name] = tree
        checkpointer = ocp.StandardCheckpointer()  # every process takes part; orbax picks who writes what
        checkpointer.save(storage.join(tmp, STATE_DIR), state)
        checkpointer.wait_until_finished()
        if not is_writer():
            return
        hf_files.write_json(storage.join(tmp, HF_CONFIG_FILE), loaded.spec.hf_config)
        if sidecar_from or tokenizer is not None:
            _write_sidecar(storage.join(tmp, SIDECAR_DIR), sidecar_from, tokenizer)
        # Written last: its presence marks a complete checkpoint.
        hf_files.write_json(storage.join(tmp, META_FILE), {
            "format": FORMAT, "version": VERSION, "model_type": loaded.spec.model_type,
            "text_config": loaded.spec.text.to_dict(), **(loaded.meta or {}),
            **({"encoders_from": reference} if reference else {})})


def _fingerprint(ckpt_dir: str) -> str:
    """What identifies one write of a checkpoint's weights: a hash of orbax's metadata file (it carries
    the save's timestamp), so a base converted again under the same path is told apart."""
    import hashlib
    path = storage.join(storage.resolve(ckpt_dir), STATE_DIR, "_CHECKPOINT_METADATA")
    if not storage.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: has no weights to reference ({STATE_DIR}/ is missing or incomplete)")
    return hashlib.sha256(storage.read_text(path).encode()).hexdigest()


def encoder_reference(ckpt_dir: str) -> dict:
    """``{"path", "fingerprint"}`` of the checkpoint that holds ``ckpt_dir``'s encoders (itself, or the one
    it references in turn)."""
    meta = read_meta(ckpt_dir)
    if "encoders_from" in meta:
        return dict(meta["encoders_from"])
    return {"path": storage.resolve(ckpt_dir), "fingerprint": _fingerprint(ckpt_dir)}


def _write_sidecar(out_dir: str, sidecar_from: str | None, tokenizer) -> None:
    """The tokenizer files (copied from ``sidecar_from``, then ``tokenizer`` saved over them) in ``out_dir``,
    local or in a bucket (transformers writes local files: through a staged local directory)."""
    with storage.staged_dir(out_dir) as local:
        os.makedirs(local, exist_ok=True)
        if sidecar_from:
            with storage.local_dir(sidecar_from) as src:
                for name in sidecar_files(src):
                    shutil.copyfile(os.path.join(src, name), os.path.join(local, name))
        if tokenizer is not None:
            tokenizer.save_pretrained(local)


def read_meta(ckpt_dir: str) -> dict:
    path = storage.join(ckpt_dir, META_FILE)
    if not storage.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: not a casa-jax checkpoint (no {META_FILE}); create one with "
                              "python -m casa_jax.convert --hf_dir=... --out_dir=...")
    meta = json.loads(storage.read_text(path))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                              f"expected {FORMAT!r} version {VERSION}")
    return meta


# Checkpoints written while LoRA's settings were TextConfig fields keep them in "text_config".
LEGACY_LORA_KEYS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}


def split_legacy_lora(text_config: dict) -> tuple[dict, dict | None]:
    """(the architecture keys, the LoRA settings as ``LoraSpec.to_dict`` or None) of a stored text config."""
    text = {k: v for k, v in text_config.items() if k not in LEGACY_LORA_KEYS}
    lora = {LEGACY_LORA_KEYS[k]: v for k, v in text_config.items() if k in LEGACY_LORA_KEYS}
    return text, (lora if lora.get("rank") else None)


def load_spec(ckpt_dir: str, meta: dict | None = None, **policy) -> ModelSpec:
    """The checkpoint's ModelSpec (``meta``: its ``read_meta``, when the caller has read it already)."""
    meta = meta or read_meta(ckpt_dir)
    hf_config = json.loads(storage.read_text(storage.join(ckpt_dir, HF_CONFIG_FILE)))
    text = TextConfig.from_dict({**split_legacy_lora(meta["text_config"])[0], **policy})
    return ModelSpec(text=text, model_type=meta["model_type"], hf_config=hf_config)


def default_sharding() -> jax.sharding.Sharding:
    """Where restored arrays go unless told: the first device with one process; replicated over every
    device with several (a process cannot address another process's first device)."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _restore(state_dir: str, target: dict, partial: bool) -> dict:
    """orbax restore of ``target`` (abstract arrays with shardings); ``partial``: some top-level trees of
    the checkpoint are left out of ``target`` and not read."""
    try:
        if not partial:
            return ocp.StandardCheckpointer().restore(state_dir, target)
        args = ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target))
        return ocp.PyTreeCheckpointer().restore(state_dir, args=args)
    except Exception as e:  # tensorstore reports a short or corrupt file as a plain Exception
        raise CheckpointError(f"{state_dir}: cannot read the weights ({str(e).splitlines()[0][:160]}); the files "
                              "are truncated or corrupt: convert or train the checkpoint again") from e


def _referenced_encoders(ckpt_dir: str, reference: dict, sharding) -> dict:
    """The encoders a checkpoint references, read from their checkpoint after checking it is the same write."""
    base = reference["path"]
    if not storage.isfile(storage.join(base, META_FILE)):
        raise CheckpointError(f"{ckpt_dir}: uses the encoders of {base}, which is gone; restore that checkpoint "
                              "at that path (or convert it there again and retrain)")
    if _fingerprint(base) != reference["fingerprint"]:
        raise CheckpointError(f"{ckpt_dir}: uses the encoders of {base}, which was written again since; its "
                              "encoders may differ: retrain from the new base, or put the original back")
    state_dir = storage.join(base, STATE_DIR)
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    target = {"encoders": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                                       tree["encoders"])}
    return _restore(state_dir, target, partial=True)["encoders"]


def restore_checkpoint(ckpt_dir: str, shardings: Any = None, others: jax.sharding.Sharding | None = None,
                       encoders: bool = True, **policy) -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``, each array read straight onto its place:
    ``shardings`` (a tree like the params) for the decoder, ``others`` for the encoders and extra trees
    (both default to ``default_sharding()``). ``encoders=False`` leaves the encoders unread (text-only
    training); referenced encoders (``encoders_from``) are read from their own checkpoint."""
    meta = read_meta(ckpt_dir)
    spec = load_spec(ckpt_dir, meta, **policy)
    state_dir = storage.join(storage.resolve(ckpt_dir), STATE_DIR)
    if not storage.isfile(storage.join(state_dir, "_CHECKPOINT_METADATA")):
        raise CheckpointError(f"{ckpt_dir}: has no weights ({STATE_DIR}/ is missing or incomplete); the checkpoint "
                              "was not fully written: convert or train it again")
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    default = others or default_sharding()

    def abstract(meta, sharding=None):
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding or default)

    target = {}
    for name in tree:
        if name != "params" and (encoders or name != "encoders"):  # encoders, extra trees (LoRA, safety, ...)
            target[name] = jax.tree.map(abstract, tree[name])
    if shardings is None:
        target["params"] = jax.tree.map(abstract, tree["params"])
    else:
        target["params"] = jax.tree.map(abstract, tree["params"], shardings)
    state = dict(_restore(state_dir, target, partial=set(target) != set(tree)))
    if encoders and "encoders_from" in meta:
        state["encoders"] = _referenced_encoders(ckpt_dir, meta["encoders_from"], default)
    extra = {k: v for k, v in state.items() if k not in ("params", "encoders")}
    builtin = {"format", "version", "model_type", "text_config", "encoders_from"}
    kept = {k: v for k, v in meta.items() if k not in builtin}
    legacy = split_legacy_lora(meta["text_config"])[1]
    if legacy and "lora" not in kept:
        kept["lora"] = legacy
    return LoadedCheckpoint(spec=spec, params=state["params"], encoders=state.get("encoders", {}), extra=extra,
                            meta=kept)


def sidecar_dir(ckpt_dir: str) -> str | None:
    path = storage.join(ckpt_dir, SIDECAR_DIR)
    return path if storage.isdir(path) else None
