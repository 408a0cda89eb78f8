"""Frozen configs of the thinker's two encoders, read from a Qwen2.5-Omni ``thinker_config``.

Field names follow transformers' ``Qwen2_5OmniVisionEncoderConfig`` / ``Qwen2_5OmniAudioEncoderConfig``
so a config.json maps across one key at a time; unknown activations are refused, not ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from casa_jax.model.config import SUPPORTED_DTYPES, ConfigError


def _check_positive(obj, names: tuple[str, ...]) -> None:
    for name in names:
        if int(getattr(obj, name)) <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be positive, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-Omni vision transformer: 3-D patch embedding, window attention, patch merger."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        _check_positive(self, ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels",
                               "patch_size", "temporal_patch_size", "spatial_merge_size", "window_size",
                               "out_hidden_size"))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"VisionConfig: hidden_size={self.hidden_size} / num_heads={self.num_heads} must "
                              "give a head_dim divisible by 4 (2-D rotary embedding)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"VisionConfig.fullatt_block_indexes {bad} are outside [0, depth={self.depth})")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(f"VisionConfig.window_size={self.window_size} must be a multiple of patch_size * "
                              f"spatial_merge_size = {self.patch_size * self.spatial_merge_size}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ConfigError(f"VisionConfig.{name}={getattr(self, name)!r}; expected one of {SUPPORTED_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:  # patches per output token
        return self.spatial_merge_size ** 2

    @property
    def patch_dim(self) -> int:  # flattened (C, T, P, P) pixels per patch
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "vision_config", **policy) -> "VisionConfig":
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act={act!r} is not supported (Qwen2.5-Omni's vision MLP uses 'silu')")
        rope = cfg.get("rope_parameters") or {}
        kept = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rms_norm_eps", "dtype", "param_dtype"}
        fields = {k: cfg[k] for k in kept if k in cfg}
        for name in ("patch_size", "temporal_patch_size"):
            if isinstance(fields.get(name), (list, tuple)):
                if len(set(fields[name])) != 1:
                    raise ConfigError(f"{where}: non-square {name}={fields[name]} is not supported")
                fields[name] = fields[name][0]
        try:
            return cls(**fields, rope_theta=float(rope.get("rope_theta", 10000.0)), **policy)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """Qwen2.5-Omni audio encoder (Whisper-style): two convolutions, chunked attention, pooling."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default, which transformers uses
    # Average-pool every ``pool_stride`` encoder states before ``ln_post``: 2 in Qwen2.5-Omni; 1 = no pooling,
    # as in Whisper's encoder, whose final layer norm is then ``ln_post``; more shortens the audio tokens.
    pool_stride: int = 2
    # Attend over the feature extractor's whole padded window, as Whisper was trained (its 30-s window:
    # ``n_window = 1500``), and keep the outputs of the real frames only. False: Qwen2.5-Omni, whose
    # encoder never sees the padding.
    full_window: bool = False
    # How ``pool_stride`` states become one token: "mean" averages them, then ``ln_post`` (Qwen2.5-Omni);
    # "stack" applies ``ln_post`` to each (Whisper's order) and concatenates them, so ``proj`` reads
    # ``pool_stride * d_model`` inputs (a frame-stacking adapter, as speech LLMs with a trained projector use).
    pool: str = "mean"
    # What reaches the decoder: "all": every pooled step's projection (Qwen2.5-Omni); "ctc": ``proj`` is a
    # CTC recogniser over the decoder's own vocabulary: each step's projection names its nearest (cosine)
    # token embedding, the steps naming ``blank_token_id`` (CTC's blank) or repeating the previous step's
    # token are dropped, and the decoder reads the named tokens' own embeddings. Their count depends on the
    # audio: the processor asks the model (``OmniProcessor(audio_emitter=)``).
    emit: str = "all"
    blank_token_id: int = -1
    ctc_vocab: int = 0  # "ctc": search the first ``ctc_vocab`` embedding rows (0: all), e.g. the text vocabulary
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.emit not in ("all", "ctc"):
            raise ConfigError(f"AudioConfig.emit={self.emit!r}; expected 'all' or 'ctc'")
        if self.emit == "ctc" and self.blank_token_id < 0:
            raise ConfigError("AudioConfig.emit='ctc' needs blank_token_id (the decoder token that stands for CTC's blank)")
        if self.pool not in ("mean", "stack"):
            raise ConfigError(f"AudioConfig.pool={self.pool!r}; expected 'mean' (Qwen2.5-Omni) or 'stack'")
        _check_positive(self, ("pool_stride", "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                               "d_model", "max_source_positions", "n_window", "output_dim"))
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(f"AudioConfig: d_model={self.d_model} is not divisible by "
                              f"encoder_attention_heads={self.encoder_attention_heads}")
        if self.d_model % 2:
            raise ConfigError(f"AudioConfig: d_model={self.d_model} must be even (sinusoidal positions)")
        if self.n_window > self.max_source_positions:
            raise ConfigError(f"AudioConfig: n_window={self.n_window} exceeds max_source_positions="
                              f"{self.max_source_positions}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in SUPPORTED_DTYPES:
                raise ConfigError(f"AudioConfig.{name}={getattr(self, name)!r}; expected one of {SUPPORTED_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def chunk_frames(self) -> int:  # mel frames per attention chunk (before the stride-2 conv)
        return 2 * self.n_window

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "audio_config", **policy) -> "AudioConfig":
        act = cfg.get("activation_function", "gelu")
        if act != "gelu":
            raise ConfigError(f"{where}: activation_function={act!r} is not supported (expected 'gelu')")
        if cfg.get("scale_embedding"):
            raise ConfigError(f"{where}: scale_embedding=true is not supported (Qwen2.5-Omni does not use it)")
        kept = {f.name for f in dataclasses.fields(cls)} - {"layer_norm_eps", "dtype", "param_dtype"}
        try:
            return cls(**{k: cfg[k] for k in kept if k in cfg}, **policy)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


def encoder_configs(spec, **policy) -> tuple[VisionConfig | None, AudioConfig]:
    """The vision and audio configs of a thinker ``ModelSpec`` (``policy``: dtype / param_dtype). A thinker
    without a ``vision_config`` (an audio-only one, such as ``io/omni_mini``'s) has vision None."""
    thinker = spec.thinker_config()
    if not isinstance(thinker.get("audio_config"), Mapping):
        raise ConfigError("the thinker config has no 'audio_config' object")
    vision = thinker.get("vision_config")
    if vision is not None and not isinstance(vision, Mapping):
        raise ConfigError("the thinker config's 'vision_config' must be a JSON object")
    return (None if vision is None else VisionConfig.from_hf(vision, **policy),
            AudioConfig.from_hf(thinker["audio_config"], **policy))
