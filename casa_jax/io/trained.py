"""Saving and loading a trained model: the base checkpoint layout plus LoRA, the safety head and the
CASA settings (``casa_jax.json`` gains a ``"casa"`` entry; the sidecar tokenizer holds the safety tokens)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from casa_jax import storage
from casa_jax.casa.config import CasaConfig
from casa_jax.casa.safety_tokens import SafetyTokenIds
from casa_jax.io.hf import LoadedCheckpoint
from casa_jax.io.hf_files import CheckpointError
from casa_jax.io.orbax_io import restore_checkpoint, save_checkpoint
from casa_jax.model.config import ModelSpec
from casa_jax.model.layers import LoraSpec


@dataclasses.dataclass
class TrainedModel:
    spec: ModelSpec  # the architecture (LoRA's settings are ``lora_spec``)
    params: dict
    encoders: dict
    objective: str | None  # "casa", "ssft", "circuit_breaker" or None for a plain converted checkpoint
    lora: Any = None
    casa: CasaConfig | None = None
    ids: SafetyTokenIds | None = None
    safety: Any = None
    unsafe_query: np.ndarray | None = None
    meta_circuit_breaker: dict | None = None  # Circuit Breakers: {"layers": [...], "alpha": ...}
    lora_spec: LoraSpec = LoraSpec()  # rank, alpha, dropout and targets of ``lora`` (rank 0: no adapters)

    @property
    def is_casa(self) -> bool:
        return self.objective == "casa"


def save_trained(ckpt_dir: str, model: TrainedModel, tokenizer, sidecar_from: str | None = None,
                 overwrite: bool = False, encoders_from: str | None = None) -> None:
    """``encoders_from``: the base checkpoint whose encoders the model uses unchanged (referenced, not
    re-saved; ``model.encoders`` may then be empty)."""
    extra: dict = {}
    if model.lora is not None:
        extra["lora"] = model.lora
    meta: dict = {"objective": model.objective}
    if model.lora is not None:
        meta["lora"] = model.lora_spec.to_dict()
    if model.meta_circuit_breaker:
        meta["circuit_breaker"] = model.meta_circuit_breaker
    if model.is_casa:
        extra["safety"] = model.safety
        extra["unsafe_query"] = np.asarray(model.unsafe_query)
        meta["casa"] = {"config": model.casa.to_dict(), "safe_id": model.ids.safe, "unsafe_id": model.ids.unsafe}
    save_checkpoint(ckpt_dir, LoadedCheckpoint(spec=model.spec, params=model.params, encoders=model.encoders,
                                               extra=extra, meta=meta),
                    sidecar_from=sidecar_from, overwrite=overwrite, tokenizer=tokenizer, encoders_from=encoders_from)


def load_trained(ckpt_dir: str, shardings: Any = None, others: Any = None, encoders: bool = True,
                 **policy) -> TrainedModel:
    """Any casa-jax checkpoint: a converted one (objective None) or one written by ``save_trained``;
    ``shardings`` / ``others`` place the decoder params / everything else, ``encoders=False`` skips the
    encoders (``restore_checkpoint``)."""
    loaded = restore_checkpoint(ckpt_dir, shardings=shardings, others=others, encoders=encoders, **policy)
    objective = loaded.meta.get("objective")
    model = TrainedModel(spec=loaded.spec, params=loaded.params, encoders=loaded.encoders, objective=objective,
                         lora=loaded.extra.get("lora"), meta_circuit_breaker=loaded.meta.get("circuit_breaker"),
                         lora_spec=LoraSpec.from_dict(loaded.meta["lora"]) if loaded.meta.get("lora") else LoraSpec())
    if model.lora is not None and model.lora_spec.rank <= 0:
        raise CheckpointError(f"{ckpt_dir}: holds LoRA adapters but no LoRA settings (rank, alpha, targets)")
    if objective == "casa":
        casa = loaded.meta.get("casa")
        if not casa or "safety" not in loaded.extra:
            raise CheckpointError(f"{ckpt_dir}: says objective 'casa' but holds no safety head / casa settings")
        model.casa = CasaConfig.from_dict(casa["config"])
        model.ids = SafetyTokenIds(int(casa["safe_id"]), int(casa["unsafe_id"]))
        model.safety = loaded.extra["safety"]
        model.unsafe_query = loaded.extra["unsafe_query"]
    return model


def load_tokenizer(ckpt_dir: str):
    """The checkpoint's tokenizer (its ``hf_sidecar/``: a trained model's includes the safety tokens)."""
    from transformers import AutoTokenizer

    from casa_jax.io.orbax_io import sidecar_dir
    path = sidecar_dir(ckpt_dir)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: has no tokenizer files (hf_sidecar/); convert from a Hugging Face "
                              "directory that contains tokenizer.json or vocab.json + merges.txt")
    with storage.local_dir(path) as local:  # transformers reads local files only
        return AutoTokenizer.from_pretrained(local, local_files_only=True)
