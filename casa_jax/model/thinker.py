"""The Qwen2.5-Omni thinker: encoders' outputs scattered into the token embeddings, then the decoder.

``prepare_thinker_inputs`` (host, NumPy) turns processor outputs into a ``ThinkerInputs`` pytree of
static, bucketed shapes: 3-D positions, encoder layouts and the flat token slot each encoder output goes
to. It checks that placeholder tokens and encoder outputs agree in number, so a mismatch is an error
naming both counts, never a silent truncation. ``Thinker`` is the pure forward pass over it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.struct
import jax
import numpy as np

from casa_jax.model.audio_encoder import AudioEncoder, ctc_rows, features_layout, nearest_tokens
from casa_jax.model.config import ConfigError, ModelSpec, TextConfig
from casa_jax.model.encoder_config import AudioConfig, VisionConfig, encoder_configs
from casa_jax.model.kv_cache import KVCache
from casa_jax.model.layers import LoraSpec, model_variables
from casa_jax.model.rope_index import ThinkerTokens, get_rope_index
from casa_jax.model.text_decoder import CausalLM, DecoderOutput
from casa_jax.model.vision_encoder import VisionEncoder
from casa_jax.model.vision_layout import pad_patches, vision_layout


@flax.struct.dataclass
class VisionInputs:
    pixel_values: jax.Array  # [N_pad, patch_dim]
    patch_order: jax.Array  # [N_pad]
    positions: jax.Array  # [N_pad, 2]
    frame_segment: jax.Array  # [N_pad]
    restore_order: jax.Array  # [M_pad]
    targets: jax.Array  # [M_pad] flat (row * T + column) token slot; B * T = dropped padding


@flax.struct.dataclass
class AudioInputs:
    features: jax.Array  # [C_pad, 2 * n_window, mel]
    chunk_frames: jax.Array  # [C_pad]
    state_index: jax.Array  # [S_pad] flat chunk position of each packed post-conv state
    pool_index: jax.Array  # [A_pad, pool_stride]
    targets: jax.Array  # [A_pad] flat token slot; B * T = dropped padding


@flax.struct.dataclass
class ThinkerInputs:
    input_ids: jax.Array  # [B, T] int32
    attention_mask: jax.Array  # [B, T] int32, 1 = real token
    positions: jax.Array  # [3, B, T] int32
    rope_deltas: jax.Array  # [B] int32: decoding continues at (real tokens so far) + delta
    vision: VisionInputs | None = None  # images and videos, packed together
    audio: AudioInputs | None = None


def _targets(input_ids: np.ndarray, token_ids: Sequence[int], count: int, padded: int) -> np.ndarray:
    """Flat slots of the placeholder tokens (in order of ``token_ids`` groups), padded with B * T."""
    flat = input_ids.reshape(-1)
    slots = np.concatenate([np.flatnonzero(flat == t) for t in token_ids]) if token_ids else np.zeros(0, int)
    assert len(slots) == count
    out = np.full((padded,), flat.size, np.int32)
    out[:count] = slots
    return out


def _check_count(what: str, token: int, input_ids: np.ndarray, expected: int, source: str) -> None:
    found = int(np.sum(input_ids == token))
    if found != expected:
        raise ValueError(f"{what}: the prompt has {found} placeholder tokens (id {token}) but {source} gives "
                         f"{expected} {what} features; the text and the media do not match (was the prompt "
                         "built by the processor from these same inputs?)")


def prepare_thinker_inputs(
    input_ids: np.ndarray,  # [B, T]
    attention_mask: np.ndarray | None,  # [B, T]
    tokens: ThinkerTokens,
    vision: VisionConfig | None = None,
    audio: AudioConfig | None = None,
    pixel_values: np.ndarray | None = None,  # [N_img, patch_dim]
    image_grid_thw: np.ndarray | None = None,  # [n_images, 3]
    pixel_values_videos: np.ndarray | None = None,  # [N_vid, patch_dim]
    video_grid_thw: np.ndarray | None = None,  # [n_videos, 3]
    video_second_per_grid: Sequence[float] | None = None,
    input_features: np.ndarray | None = None,  # [n_audios, mel, frames]
    feature_attention_mask: np.ndarray | None = None,  # [n_audios, frames]
    use_audio_in_video: bool = False,
    audio_emit: Sequence[np.ndarray] | None = None,  # per clip [steps] bool (``AudioConfig.emit="ctc"``)
) -> ThinkerInputs:
    """Processor outputs (``Qwen2_5OmniProcessor`` names) -> ``ThinkerInputs`` (NumPy leaves)."""
    input_ids = np.asarray(input_ids, np.int64)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(input_ids.shape)}")
    real_ids = np.where(mask == 1, input_ids, -1)

    vision_inputs = None
    grids, pixels, token_groups = [], [], []
    for name, values, grid, token in (("image", pixel_values, image_grid_thw, tokens.image_token_id),
                                      ("video", pixel_values_videos, video_grid_thw, tokens.video_token_id)):
        if values is None and grid is None:
            _check_count(name, token, real_ids, 0, "no pixel_values")
            continue
        if values is None or grid is None:
            raise ValueError(f"{name}: pass both pixel values and grid_thw, or neither")
        if vision is None:
            raise ValueError(f"{name} inputs given but the model has no vision encoder config")
        grid = np.asarray(grid, np.int64).reshape(-1, 3)
        _check_count(name, token, real_ids, int(grid.prod(-1).sum()) // vision.merge_unit,
                     f"grid_thw {grid.tolist()}")
        grids.append(grid)
        pixels.append(np.asarray(values, np.float32))
        token_groups.append(token)
    if grids:
        layout = vision_layout(np.concatenate(grids), vision)
        arrays = layout.arrays()
        padded = arrays["restore_order"].shape[0]
        vision_inputs = VisionInputs(
            pixel_values=pad_patches(np.concatenate(pixels), layout, vision), **arrays,
            targets=_targets(real_ids, token_groups, layout.num_tokens, padded))

    audio_inputs = None
    audio_frames = None
    if input_features is None:
        _check_count("audio", tokens.audio_token_id, real_ids, 0, "no input_features")
    else:
        if audio is None:
            raise ValueError("audio inputs given but the model has no audio encoder config")
        feats = np.asarray(input_features, np.float32)
        if feats.ndim != 3:
            raise ValueError(f"input_features must be [n_audios, mel, frames], got shape {list(feats.shape)}")
        frame_mask = (np.ones(feats.shape[::2], np.int64) if feature_attention_mask is None
                      else np.asarray(feature_attention_mask))
        audio_frames = frame_mask.sum(-1)
        layout = features_layout(feats, frame_mask, audio)
        padded = layout.pool_index.shape[0]
        if audio.emit == "ctc":
            if audio_emit is None or [len(m) for m in audio_emit] != list(layout.tokens_per_clip):
                raise ValueError("audio: an emit='ctc' encoder needs audio_emit, one [steps] mask per clip with "
                                 f"{list(layout.tokens_per_clip)} steps (the processor's audio_emitter computes it)")
            emit = np.concatenate([np.asarray(m, bool) for m in audio_emit])
            _check_count("audio", tokens.audio_token_id, real_ids, int(emit.sum()),
                         f"audio_emit (CTC emissions of {audio_frames.tolist()} mel frames)")
            slots = _targets(real_ids, [tokens.audio_token_id], int(emit.sum()), int(emit.sum()))
            targets = np.full((padded,), real_ids.size, np.int32)  # steps that emit nothing are dropped
            targets[np.flatnonzero(emit)] = slots
        else:
            _check_count("audio", tokens.audio_token_id, real_ids, layout.num_tokens,
                         f"input_features with {audio_frames.tolist()} mel frames")
            targets = _targets(real_ids, [tokens.audio_token_id], layout.num_tokens, padded)
        audio_inputs = AudioInputs(**layout.arrays(), targets=targets)

    positions, deltas = get_rope_index(
        input_ids, mask, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
        audio_seqlens=audio_frames, second_per_grids=video_second_per_grid,
        use_audio_in_video=use_audio_in_video, tokens=tokens)
    return ThinkerInputs(input_ids=input_ids.astype(np.int32), attention_mask=mask.astype(np.int32),
                         positions=positions.astype(np.int32), rope_deltas=deltas[:, 0].astype(np.int32),
                         vision=vision_inputs, audio=audio_inputs)


@dataclasses.dataclass(frozen=True)
class Thinker:
    """Pure forward pass of the thinker: ``params`` is the decoder tree, ``encoders`` the
    ``{"visual": ..., "audio_tower": ...}`` tree of a converted checkpoint."""

    text: TextConfig
    vision: VisionConfig | None  # None: an audio-only thinker (no vision tower)
    audio: AudioConfig
    tokens: ThinkerTokens = ThinkerTokens()
    lora: LoraSpec = LoraSpec()  # the decoder's adapters (``CausalLM(text, lora)``)

    def __post_init__(self):
        width = self.text.hidden_size
        vision_width = width if self.vision is None else self.vision.out_hidden_size
        if vision_width != width or self.audio.output_dim != width:
            raise ConfigError(f"encoder outputs must have the decoder's width {width}: vision out_hidden_size="
                              f"{vision_width}, audio output_dim={self.audio.output_dim}")

    @classmethod
    def from_spec(cls, spec: ModelSpec, lora: LoraSpec = LoraSpec(), **policy) -> "Thinker":
        vision, audio = encoder_configs(spec, **policy)
        return cls(spec.text, vision, audio, ThinkerTokens.from_thinker_config(spec.thinker_config()), lora)

    @property
    def decoder(self) -> CausalLM:
        return CausalLM(self.text, self.lora)

    def prepare(self, **processor_outputs) -> ThinkerInputs:
        """``prepare_thinker_inputs`` with this model's configs (keys as the processor names them)."""
        return prepare_thinker_inputs(tokens=self.tokens, vision=self.vision, audio=self.audio, **processor_outputs)

    def encode_vision(self, encoders, vision: VisionInputs) -> jax.Array:  # -> [M_pad, E]
        fields = {k: getattr(vision, k) for k in ("pixel_values", "patch_order", "positions", "frame_segment",
                                                   "restore_order")}
        return VisionEncoder(self.vision).apply({"params": encoders["visual"]}, **fields)

    def encode_audio(self, encoders, audio: AudioInputs) -> jax.Array:  # -> [A_pad, E]
        fields = {k: getattr(audio, k) for k in ("features", "chunk_frames", "state_index", "pool_index")}
        return AudioEncoder(self.audio).apply({"params": encoders["audio_tower"]}, **fields)

    def embed(self, params, encoders, inputs: ThinkerInputs) -> jax.Array:
        """Token embeddings [B, T, E] with every placeholder replaced by its encoder output."""
        ids = inputs.input_ids
        x = self.decoder.apply({"params": params}, ids, method=CausalLM.embed)  # (LoRA never touches embeddings)
        batch, length, width = x.shape
        flat = x.reshape(batch * length, width)
        if inputs.vision is not None:
            feats = self.encode_vision(encoders, inputs.vision).astype(flat.dtype)
            flat = flat.at[inputs.vision.targets].set(feats, mode="drop")
        if inputs.audio is not None:
            feats = self.encode_audio(encoders, inputs.audio)
            if self.audio.emit == "ctc":  # the recognised tokens' own embeddings
                ids = nearest_tokens(feats, ctc_rows(params["embed_tokens"]["embedding"], self.audio))
                feats = self.decoder.apply({"params": params}, ids[None], method=CausalLM.embed)[0]
            feats = feats.astype(flat.dtype)
            flat = flat.at[inputs.audio.targets].set(feats, mode="drop")
        return flat.reshape(batch, length, width)

    def __call__(self, params, encoders, inputs: ThinkerInputs, cache: KVCache | None = None,
                 hidden_layers: Sequence[int] = (), return_logits: bool = True, lora=None,
                 last_only: bool = False, quant=None) -> DecoderOutput:
        """``lora``: the decoder's LoRA collection (None: the base decoder); ``quant``: its int8 layer
        kernels (``model.quantize``), when ``params`` lacks them."""
        embeds = self.embed(params, encoders, inputs)
        variables = model_variables(params, lora, quant)
        return self.decoder.apply(variables, None, inputs.positions, inputs.attention_mask, cache=cache,
                                  inputs_embeds=embeds, hidden_layers=tuple(hidden_layers),
                                  return_logits=return_logits, last_only=last_only)


def init_encoders(vision: VisionConfig | None, audio: AudioConfig, key: jax.Array, unbox: bool = True) -> dict:
    """Random ``{"visual", "audio_tower"}`` encoder params (flax's default initialisers), e.g. for tiny
    demo thinkers; ``unbox=False`` keeps the logical-axis boxes (sizing under ``jax.eval_shape``)."""
    import flax.linen as nn

    from casa_jax.model.vision_layout import window_capacity
    trees = {}
    if vision is not None:
        n = window_capacity(vision) * vision.merge_unit  # one full window slot of patches
        trees["visual"] = VisionEncoder(vision).init(
            jax.random.fold_in(key, 0), np.zeros((n, vision.patch_dim), np.float32), np.arange(n),
            np.zeros((n, 2), np.int32), np.zeros(n, np.int32), np.arange(n // vision.merge_unit))["params"]
    trees["audio_tower"] = AudioEncoder(audio).init(
        jax.random.fold_in(key, 1), np.zeros((1, audio.chunk_frames, audio.num_mel_bins), np.float32),
        np.ones(1, np.int32), np.zeros(1, np.int32), np.zeros((4, audio.pool_stride), np.int32))["params"]
    return nn.unbox(trees) if unbox else trees
