"""Model configuration: frozen dataclasses built from Hugging Face ``config.json`` files.

One ``TextConfig`` describes the Qwen2.5 decoder (the language-model half of the Qwen2.5-Omni thinker)
and Llama-family decoders (no q/k/v bias, e.g. SmolLM2), which share its layout.
``ModelSpec`` wraps it with what the checkpoint layer needs to know: which Hugging Face family the
checkpoint came from and the original ``config.json`` (kept verbatim so an export writes it back).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# remat_policy -> what nn.remat saves ("none": no remat; "full": save nothing, recompute the layer)
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": "checkpoint_dots",
    "dots_with_no_batch_dims": "checkpoint_dots_with_no_batch_dims",
    "minimal": "dots_with_no_batch_dims_saveable",
}

# Hugging Face ``model_type`` values we read, and what they hold.
QWEN2 = "qwen2"  # Qwen2ForCausalLM: the text fields at top level.
OMNI_TEXT = "qwen2_5_omni_text"  # Qwen2.5-Omni text sub-config on its own.
OMNI_THINKER = "qwen2_5_omni_thinker"  # Qwen2_5OmniThinkerForConditionalGeneration.
OMNI = "qwen2_5_omni"  # Hub repos: the thinker nested in ``thinker_config`` (plus talker, token2wav).
LLAMA = "llama"  # LlamaForCausalLM (SmolLM2 and kin): no q/k/v bias by default, plain 1-D RoPE.
KNOWN_MODEL_TYPES = (QWEN2, OMNI_TEXT, OMNI_THINKER, OMNI, LLAMA)
# transformers' causal-LM class for each text-only family (what parity and exports name).
CAUSAL_LM_CLASSES = {QWEN2: "Qwen2ForCausalLM", LLAMA: "LlamaForCausalLM"}


class ConfigError(ValueError):
    """A config file or dict that cannot describe a model we support."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2.5 text decoder, plus the runtime policy (dtypes, remat) used to run it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # M-RoPE: frequency chunks (sum = head_dim // 2) fed by the temporal/height/width streams in turn.
    # None means plain 1-D RoPE.
    mrope_section: tuple[int, ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 has q/k/v biases; o_proj never has one.
    max_position_embeddings: int = 32768
    # Runtime policy, not part of the checkpoint.
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # dtype parameters are created in by ``init``
    remat_policy: str = "none"

    def __post_init__(self):
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field when the values cannot form a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"TextConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
        if self.mrope_section is not None and sum(self.mrope_section) != self.resolved_head_dim // 2:
            raise ConfigError(
                f"mrope_section={list(self.mrope_section)} must sum to head_dim // 2 = "
                f"{self.resolved_head_dim // 2}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ConfigError(f"TextConfig.{name}={getattr(self, name)!r}; expected one of {SUPPORTED_DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"TextConfig.remat_policy={self.remat_policy!r}; expected one of {tuple(REMAT_POLICIES)}")

    def replace(self, **changes) -> "TextConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["mrope_section"] is not None:
            d["mrope_section"] = list(d["mrope_section"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TextConfig":
        """Build from a plain mapping (e.g. an ml_collections ``ConfigDict.to_dict()``); unknown keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown TextConfig keys {unknown}; known keys are {sorted(names)}")
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A text config plus where it came from: the Hugging Face family and its verbatim ``config.json``."""

    text: TextConfig
    model_type: str  # one of KNOWN_MODEL_TYPES
    hf_config: Mapping[str, Any]  # the original config.json (never mutated)

    @property
    def is_thinker(self) -> bool:
        return self.model_type in (OMNI_THINKER, OMNI)

    def thinker_config(self) -> dict[str, Any]:
        """The thinker's own config.json (``qwen2_5_omni`` nests it in ``thinker_config``)."""
        if self.model_type == OMNI:
            return dict(self.hf_config["thinker_config"])
        if self.model_type == OMNI_THINKER:
            return dict(self.hf_config)
        raise ConfigError(f"a {self.model_type!r} config has no thinker")


def _rope_fields(cfg: Mapping[str, Any], where: str) -> tuple[float, tuple[int, ...] | None]:
    """Read rope theta and mrope_section from either spelling: ``rope_parameters`` (transformers 5)
    or ``rope_theta`` + ``rope_scaling`` (older files)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(scaling, Mapping):
        raise ConfigError(f"{where}: rope_parameters / rope_scaling must be JSON objects")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ConfigError(f"{where}: no rope_theta (looked in rope_parameters and at top level)")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{where}: rope type {rope_type!r} is not supported (only default and mrope)")
    section = params.get("mrope_section", scaling.get("mrope_section"))
    return float(theta), (tuple(int(s) for s in section) if section is not None else None)


def _text_from_fields(cfg: Mapping[str, Any], tie: bool, where: str, default_bias: bool = True,
                      **policy) -> TextConfig:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported (Qwen2.5 uses 'silu')")
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported (Qwen2.5-Omni does not use it)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing required keys {missing}")
    theta, section = _rope_fields(cfg, where)
    return TextConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=cfg.get("head_dim"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=section,
        tie_word_embeddings=bool(tie),
        attention_bias=bool(cfg.get("attention_bias", default_bias)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        **policy,
    )


def spec_from_hf_config(cfg: Mapping[str, Any], where: str = "config.json", **policy) -> ModelSpec:
    """Build a ``ModelSpec`` from a parsed Hugging Face config (any of ``KNOWN_MODEL_TYPES``).

    ``policy`` sets runtime fields (dtype, param_dtype, remat_policy).
    """
    model_type = cfg.get("model_type")
    if model_type == QWEN2:
        text = _text_from_fields(cfg, cfg.get("tie_word_embeddings", False), where, **policy)
    elif model_type == LLAMA:
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias=true is not supported (Llama-family MLPs have no bias)")
        text = _text_from_fields(cfg, cfg.get("tie_word_embeddings", False), where, default_bias=False, **policy)
    elif model_type == OMNI_TEXT:
        text = _text_from_fields(cfg, cfg.get("tie_word_embeddings", True), where, **policy)
    elif model_type in (OMNI_THINKER, OMNI):
        thinker = cfg if model_type == OMNI_THINKER else cfg.get("thinker_config")
        if not isinstance(thinker, Mapping):
            raise ConfigError(f"{where}: model_type {OMNI!r} needs a 'thinker_config' object")
        text_cfg = thinker.get("text_config")
        if not isinstance(text_cfg, Mapping):
            raise ConfigError(f"{where}: the thinker config needs a 'text_config' object")
        # The thinker decides tying (its lm_head is a separate Linear unless the thinker ties it).
        text = _text_from_fields(text_cfg, thinker.get("tie_word_embeddings", False),
                                 f"{where} (text_config)", **policy)
    else:
        raise ConfigError(f"{where}: model_type={model_type!r} is not supported; expected one of "
                          f"{list(KNOWN_MODEL_TYPES)}")
    return ModelSpec(text=text, model_type=model_type, hf_config=cfg)


def load_hf_spec(hf_dir: str, **policy) -> ModelSpec:
    """Read ``<hf_dir>/config.json`` into a ``ModelSpec`` with clear errors for missing or bad files."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found; a Hugging Face model directory needs a config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    return spec_from_hf_config(cfg, where=path, **policy)


def text_config_to_hf(text: TextConfig) -> dict[str, Any]:
    """A ``qwen2`` (or, without q/k/v bias, ``llama``) config.json for a text config (used when exporting
    a model that has no original).

    Qwen2ForCausalLM has only 1-D RoPE, so an M-RoPE config cannot be described this way.
    """
    if text.mrope_section is not None:
        raise ConfigError("a TextConfig with mrope_section exports only as a Qwen2.5-Omni thinker, which "
                          "needs the original thinker config.json; set mrope_section=None for a Qwen2 model")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    out = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": QWEN2,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": text.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": text.tie_word_embeddings,
        "max_position_embeddings": text.max_position_embeddings,
        "use_sliding_window": False,
    }
    if text.head_dim is not None:
        out["head_dim"] = text.head_dim
    if not text.attention_bias:  # Qwen2 always has q/k/v biases: describe a bias-free decoder as Llama
        out.update(architectures=[CAUSAL_LM_CLASSES[LLAMA]], model_type=LLAMA, attention_bias=False, mlp_bias=False)
        del out["use_sliding_window"]
    return out
