"""Qwen2.5-Omni audio encoder in Flax: two 1-D convolutions, sinusoidal positions, attention within
chunks of ``2 * n_window`` mel frames, average pooling and projection to the decoder width.

Numerically equal to transformers' ``Qwen2_5OmniAudioEncoder``. Clips are cut into chunks on the host
(``AudioLayout``), so the encoder sees a static [chunks, frames, mel] block and compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.encoder_config import AudioConfig
from casa_jax.model.layers import Dense
from casa_jax.model.vision_layout import slot_bucket


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """[length, channels]: sin over the first half of the channels, cos over the second (Whisper style)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def conv_output_frames(frames):
    """Frames after the stride-2 convolution."""
    return (frames - 1) // 2 + 1


def audio_output_tokens(frames, pool_stride: int = 2):
    """Encoder output tokens (= audio placeholder tokens) for ``frames`` mel frames: the stride-2 conv's
    frames, average-pooled in pairs (Qwen2.5-Omni) or not pooled (``pool_stride=1``, Whisper)."""
    states = conv_output_frames(frames)
    return states if pool_stride == 1 else (states - 2) // 2 + 1


@dataclasses.dataclass(frozen=True)
class AudioLayout:
    """Chunked mel features and the gather indices of the pooled outputs, padded to bucket sizes (without
    pooling, ``pool_a == pool_b``: each output is one encoder state).

    ``features[c, f]`` is frame ``f`` of chunk ``c``; ``chunk_frames[c]`` its real length (0 = padding);
    output token ``j`` averages the flattened [chunks * n_window] encoder states ``pool_a[j]`` and ``pool_b[j]``.
    """

    features: np.ndarray  # [C_pad, 2 * n_window, mel] float32
    chunk_frames: np.ndarray  # [C_pad] int32
    pool_a: np.ndarray  # [A_pad] int32
    pool_b: np.ndarray  # [A_pad] int32
    tokens_per_clip: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.tokens_per_clip))

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(features=self.features, chunk_frames=self.chunk_frames, pool_a=self.pool_a, pool_b=self.pool_b)


def audio_layout(clips: Sequence[np.ndarray], cfg: AudioConfig, min_chunks: int = 4,
                 min_tokens: int = 16) -> AudioLayout:
    """Cut log-mel clips (each [mel, frames]) into attention chunks and index the pooled outputs."""
    width, half = cfg.chunk_frames, cfg.n_window
    chunks, lengths, firsts, seconds, tokens = [], [], [], [], []
    for i, clip in enumerate(clips):
        clip = np.asarray(clip, np.float32)
        if clip.ndim != 2 or clip.shape[0] != cfg.num_mel_bins:
            raise ValueError(f"audio clip {i}: features have shape {list(clip.shape)}; expected "
                             f"[{cfg.num_mel_bins}, frames] log-mel features")
        frames = clip.shape[1]
        if audio_output_tokens(frames, cfg.pool_stride) < 1:
            raise ValueError(f"audio clip {i}: {frames} mel frames is too short; the encoder needs at least 3")
        # Flat index (chunk * n_window + position) of every real post-conv state of this clip, in order;
        # pooling averages consecutive pairs of them, which may straddle two chunks.
        states = []
        for start in range(0, frames, width):
            piece = clip[:, start:start + width].T  # [frames_in_chunk, mel]
            states.append(len(chunks) * half + np.arange(conv_output_frames(piece.shape[0])))
            lengths.append(piece.shape[0])
            chunks.append(np.pad(piece, ((0, width - piece.shape[0]), (0, 0))))
        states = np.concatenate(states)
        stride = cfg.pool_stride
        n_out = int(audio_output_tokens(frames, stride))
        firsts.append(states[0:stride * n_out:stride])
        seconds.append(states[stride - 1:stride * n_out:stride])
        tokens.append(n_out)
    c_pad = slot_bucket(len(chunks), min_chunks)
    a_pad = slot_bucket(sum(tokens), min_tokens)
    features = np.zeros((c_pad, width, cfg.num_mel_bins), np.float32)
    features[:len(chunks)] = np.stack(chunks)
    chunk_frames = np.zeros((c_pad,), np.int32)
    chunk_frames[:len(lengths)] = lengths

    def padded(parts):  # padded outputs read state 0 and are discarded by the caller
        out = np.zeros((a_pad,), np.int32)
        flat = np.concatenate(parts)
        out[:len(flat)] = flat
        return out

    return AudioLayout(features=features, chunk_frames=chunk_frames, pool_a=padded(firsts),
                       pool_b=padded(seconds), tokens_per_clip=tuple(tokens))


class AudioAttention(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, x, mask):  # x [C, F, d]; mask [C, F] bool (real post-conv frames)
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        heads = (cfg.encoder_attention_heads, cfg.head_dim)
        axes = ("embed", "q_heads", "head_dim")
        q = Dense(heads, axes, use_bias=True, name="q_proj", **kw)(x)
        k = Dense(heads, axes, use_bias=False, name="k_proj", **kw)(x)
        v = Dense(heads, axes, use_bias=True, name="v_proj", **kw)(x)
        scores = jnp.einsum("cqhd,ckhd->chqk", q, k).astype(jnp.float32) * cfg.head_dim ** -0.5
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("chqk,ckhd->cqhd", probs, v)
        return Dense((cfg.d_model,), ("q_heads", "head_dim", "embed"), in_axes=2, use_bias=True,
                     name="out_proj", **kw)(out)


class AudioLayer(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        norm = dict(epsilon=cfg.layer_norm_eps, **kw)
        x = x + AudioAttention(cfg, name="self_attn")(nn.LayerNorm(name="self_attn_layer_norm", **norm)(x), mask)
        h = nn.LayerNorm(name="final_layer_norm", **norm)(x)
        h = nn.gelu(Dense((cfg.encoder_ffn_dim,), ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h),
                    approximate=False)
        x = x + Dense((cfg.d_model,), ("mlp", "embed"), use_bias=True, name="fc2", **kw)(h)
        return x, None


class AudioEncoder(nn.Module):
    """``AudioLayout.arrays()`` -> tokens [A_pad, output_dim]; rows past the real tokens are padding."""

    config: AudioConfig

    @nn.compact
    def __call__(self, features, chunk_frames, pool_a, pool_b):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        conv = dict(kernel_size=(3,), padding=((1, 1),), dtype=dtype, param_dtype=param_dtype)
        frames = jnp.arange(features.shape[1])
        x = nn.gelu(nn.Conv(cfg.d_model, name="conv1", **conv)(features.astype(dtype)), approximate=False)
        x = x * (frames[None, :] < chunk_frames[:, None])[..., None].astype(dtype)
        x = nn.gelu(nn.Conv(cfg.d_model, strides=(2,), name="conv2", **conv)(x), approximate=False)
        x = x + jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model)[:x.shape[1]], dtype)
        mask = jnp.arange(x.shape[1])[None, :] < conv_output_frames(chunk_frames)[:, None]
        layers = nn.scan(AudioLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,), length=cfg.encoder_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(cfg, name="layers")(x, mask)
        flat = x.reshape(-1, cfg.d_model)  # [C * n_window, d]
        pooled = (jnp.take(flat, pool_a, axis=0) + jnp.take(flat, pool_b, axis=0)) / 2
        pooled = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_post", dtype=dtype, param_dtype=param_dtype)(pooled)
        out = Dense((cfg.output_dim,), ("mlp", "embed"), use_bias=True, name="proj", dtype=dtype,
                    param_dtype=param_dtype)(pooled)
        # Learned audio BOS/EOS embeddings: in the checkpoint, unused by the thinker's forward pass.
        self.param("audio_bos_eos_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       ("vocab", "embed")),
                   (2, cfg.output_dim), param_dtype)
        return out
