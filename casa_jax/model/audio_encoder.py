"""Qwen2.5-Omni audio encoder in Flax: two 1-D convolutions, sinusoidal positions, attention within
chunks of ``2 * n_window`` mel frames, average pooling and projection to the decoder width. Configured
with one 30-s window, no pooling and 80 mel bins it computes Whisper's encoder (``io/whisper_ct2``).

Numerically equal to transformers' ``Qwen2_5OmniAudioEncoder``. Clips are cut into chunks on the host
(``AudioLayout``), so the encoder sees a static [chunks, frames, mel] block and compiles once per bucket.
After the convolutions only the real frames are kept, packed into [tokens, d] (as transformers does), so
the per-token work (norms, projections, MLP) skips the padding of each clip's last chunk; attention
gathers them back into [chunks, n_window] blocks.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from casa_jax.model.attention import block_attention
from casa_jax.model.encoder_config import AudioConfig
from casa_jax.model.layers import Dense, default_kernel_init, gelu_exact
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
    """Encoder output tokens (= audio placeholder tokens) for ``frames`` real mel frames: the stride-2
    conv's frames, average-pooled ``pool_stride`` at a time (2 in Qwen2.5-Omni; 1: no pooling, Whisper)."""
    return conv_output_frames(frames) // pool_stride


@dataclasses.dataclass(frozen=True)
class AudioLayout:
    """Chunked mel features and the gather indices of the pooled outputs, padded to bucket sizes.

    ``features[c, f]`` is frame ``f`` of chunk ``c``; ``chunk_frames[c]`` its length the encoder attends
    over (0 = padding). The real post-conv states, in order, are the packed states; ``state_index[s]`` is
    packed state ``s``'s flat (chunk * n_window + position) index, and ``C_pad * n_window`` past the real
    ones. Output token ``j`` averages the packed states ``pool_index[j]`` (one row of ``pool_stride``
    indices; a row of padding reads state 0).
    """

    features: np.ndarray  # [C_pad, 2 * n_window, mel] float32
    chunk_frames: np.ndarray  # [C_pad] int32
    state_index: np.ndarray  # [S_pad] int32
    pool_index: np.ndarray  # [A_pad, pool_stride] int32
    tokens_per_clip: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(sum(self.tokens_per_clip))

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(features=self.features, chunk_frames=self.chunk_frames, state_index=self.state_index,
                    pool_index=self.pool_index)


def audio_layout(clips: Sequence[np.ndarray], cfg: AudioConfig, min_chunks: int = 1, min_tokens: int = 16,
                 real_frames: Sequence[int] | None = None, bucket_steps: int = 8) -> AudioLayout:
    """Cut log-mel clips (each [mel, frames]) into attention chunks and index the pooled outputs.

    Chunk, state and token counts are padded to ``slot_bucket`` sizes, ``bucket_steps`` per doubling (8:
    at most 12.5 % padding; every layer runs over it, so padding is compute thrown away). The states'
    ladder is the tokens' scaled by the pool stride, so their buckets change together; with that, a
    chunk minimum above 1 would save few compiles and cost a single short clip most of its attention.

    ``real_frames`` (``cfg.full_window``): each clip is the extractor's whole padded window, which the
    encoder attends over, and only the outputs of its first ``real_frames[i]`` frames are kept.
    """
    width, half, stride = cfg.chunk_frames, cfg.n_window, cfg.pool_stride
    if cfg.full_window and real_frames is None:
        raise ValueError("AudioConfig.full_window: audio_layout needs the real frame count of every clip")
    chunks, lengths, rows, tokens, flat_states = [], [], [], [], []
    packed = 0  # real post-conv states so far
    for i, clip in enumerate(clips):
        clip = np.asarray(clip, np.float32)
        if clip.ndim != 2 or clip.shape[0] != cfg.num_mel_bins:
            raise ValueError(f"audio clip {i}: features have shape {list(clip.shape)}; expected "
                             f"[{cfg.num_mel_bins}, frames] log-mel features")
        frames = clip.shape[1]
        kept = frames if real_frames is None else int(real_frames[i])
        if cfg.full_window and frames != width:
            raise ValueError(f"audio clip {i}: {frames} mel frames; a full-window encoder takes the extractor's "
                             f"padded window of {width} frames")
        n_out = int(audio_output_tokens(kept, stride))
        if n_out < 1:
            raise ValueError(f"audio clip {i}: {kept} mel frames is too short; the encoder needs at least "
                             f"{2 * stride - 1}")
        # Flat index (chunk * n_window + position) of every post-conv state of this clip, in order;
        # pooling averages runs of ``stride`` of them (by packed index), which may straddle two chunks.
        count = 0
        for start in range(0, frames, width):
            piece = clip[:, start:start + width].T  # [frames_in_chunk, mel]
            real = int(conv_output_frames(piece.shape[0]))
            flat_states.append(len(chunks) * half + np.arange(real))
            count += real
            lengths.append(piece.shape[0])
            chunks.append(np.pad(piece, ((0, width - piece.shape[0]), (0, 0))))
        rows.append(packed + np.arange(stride * n_out).reshape(n_out, stride))
        packed += count
        tokens.append(n_out)
    c_pad = slot_bucket(len(chunks), min_chunks, bucket_steps)
    a_pad = slot_bucket(sum(tokens), min_tokens, bucket_steps)
    # The states' ladder is the tokens' ladder scaled by the pool stride, so the two change bucket together
    # (few extra compiles), and never past the chunks.
    s_pad = min(slot_bucket(packed, stride * min_tokens, bucket_steps), c_pad * half)
    state_index = np.full((s_pad,), c_pad * half, np.int32)  # padding: past the last state
    state_index[:packed] = np.concatenate(flat_states)
    features = np.zeros((c_pad, width, cfg.num_mel_bins), np.float32)
    features[:len(chunks)] = np.stack(chunks)
    chunk_frames = np.zeros((c_pad,), np.int32)
    chunk_frames[:len(lengths)] = lengths
    pool_index = np.zeros((a_pad, stride), np.int32)  # padded outputs read state 0; the caller drops them
    flat = np.concatenate(rows)
    pool_index[:len(flat)] = flat
    return AudioLayout(features=features, chunk_frames=chunk_frames, state_index=state_index,
                       pool_index=pool_index, tokens_per_clip=tuple(tokens))


def features_layout(features: np.ndarray, frame_mask: np.ndarray, cfg: AudioConfig) -> AudioLayout:
    """The layout of feature-extractor outputs (``input_features`` [n, mel, frames], ``feature_attention_mask``
    [n, frames]): each clip cut to its real frames, or whole with ``cfg.full_window``."""
    real = np.asarray(frame_mask).sum(-1)
    if cfg.full_window:
        return audio_layout(list(features), cfg, real_frames=real)
    return audio_layout([features[i, :, np.asarray(frame_mask[i]).astype(bool)].T for i in range(len(features))], cfg)


def nearest_tokens(tokens: jax.Array, table: jax.Array) -> jax.Array:
    """[A] id of the decoder embedding row (``table`` [V, E]) nearest (cosine) each projected step [A, E]."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
    return jnp.argmax(unit(tokens) @ unit(table).T, axis=-1)


def ctc_rows(table: jax.Array, cfg: AudioConfig) -> jax.Array:
    """The embedding rows a CTC recogniser names: the first ``cfg.ctc_vocab`` (the text vocabulary, without
    safety or media tokens added later), or all."""
    return table[:cfg.ctc_vocab] if cfg.ctc_vocab else table


def ctc_collapse(nearest: jax.Array, blank_id: int) -> jax.Array:
    """[A] bool: the steps whose token ``nearest`` [A] is not ``blank_id`` and differs from the previous
    step's (CTC's greedy collapse)."""
    previous = jnp.concatenate([jnp.full((1,), -1, nearest.dtype), nearest[:-1]])
    return (nearest != blank_id) & (nearest != previous)


def ctc_emissions(tokens: jax.Array, table: jax.Array, blank_id: int) -> jax.Array:
    """[A] bool: which projected steps ``tokens`` [A, E] become audio tokens under ``emit="ctc"``
    (``ctc_collapse`` of their nearest tokens)."""
    return ctc_collapse(nearest_tokens(tokens, table), blank_id)


def packed_to_chunks(x: jax.Array, chunk_slot: jax.Array) -> jax.Array:
    """[S, ...] packed states -> [C, F, ...] (``chunk_slot`` [C, F]: the packed row of each chunk position,
    S or more for padding, which reads zeros)."""
    return jnp.take(x, chunk_slot, axis=0, mode="fill", fill_value=0)


def chunks_to_packed(x: jax.Array, state_index: jax.Array) -> jax.Array:
    """[C, F, ...] -> [S, ...] packed states (``state_index`` [S]: flat chunk position of each; C * F or
    more for padding, which reads zeros)."""
    return jnp.take(x.reshape(-1, *x.shape[2:]), state_index, axis=0, mode="fill", fill_value=0)


class ProjectionWeights(nn.Module):
    """The kernel [d, H, D] and bias [H, D] (zeros without ``use_bias``) of one attention projection,
    returned rather than applied, so q, k and v run as one GEMM; stored as ``Dense`` stores them."""

    in_features: int
    heads: tuple[int, int]
    use_bias: bool
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.with_logical_partitioning(default_kernel_init,
                                                                   ("embed", "q_heads", "head_dim")),
                            (self.in_features, *self.heads), self.param_dtype)
        if not self.use_bias:
            return kernel, jnp.zeros(self.heads, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("q_heads", "head_dim")),
                          self.heads, self.param_dtype)
        return kernel, bias


class AudioAttention(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, x, chunk_slot, state_index, mask):
        # x [S, d] packed; chunk_slot [C, F]; state_index [S]; mask [C, F] bool (real post-conv frames)
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        heads = (cfg.encoder_attention_heads, cfg.head_dim)
        weights = [ProjectionWeights(cfg.d_model, heads, bias, jnp.dtype(cfg.param_dtype), name=name)()
                   for name, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True))]
        kernel = jnp.stack([w for w, _ in weights], axis=1).astype(dtype)  # [d, 3, H, D]
        bias = jnp.stack([b for _, b in weights]).astype(dtype)  # [3, H, D]
        qkv = jnp.einsum("se,ethd->sthd", x.astype(dtype), kernel) + bias  # [S, 3, H, D]
        qkv = jnp.moveaxis(packed_to_chunks(qkv, chunk_slot), 2, 0)  # [3, C, F, H, D]
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (qkv[0] * cfg.head_dim ** -0.5, qkv[1], qkv[2]))  # [C, H, F, D]
        out = jnp.swapaxes(block_attention(q, k, v, mask), 1, 2)  # [C, F, H, D]
        return Dense((cfg.d_model,), ("q_heads", "head_dim", "embed"), in_axes=2, use_bias=True, name="out_proj",
                     dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))(chunks_to_packed(out, state_index))


class AudioLayer(nn.Module):
    config: AudioConfig

    @nn.compact
    def __call__(self, x, chunk_slot, state_index, mask):  # x [S, d] packed states
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        norm = dict(epsilon=cfg.layer_norm_eps, **kw)
        x = x + AudioAttention(cfg, name="self_attn")(nn.LayerNorm(name="self_attn_layer_norm", **norm)(x),
                                                      chunk_slot, state_index, mask)
        h = nn.LayerNorm(name="final_layer_norm", **norm)(x)
        h = gelu_exact(Dense((cfg.encoder_ffn_dim,), ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h))
        x = x + Dense((cfg.d_model,), ("mlp", "embed"), use_bias=True, name="fc2", **kw)(h)
        return x, None


class AudioEncoder(nn.Module):
    """``AudioLayout.arrays()`` -> tokens [A_pad, output_dim]; rows past the real tokens are padding."""

    config: AudioConfig

    @nn.compact
    def __call__(self, features, chunk_frames, state_index, pool_index):  # [C, 2F, mel], [C], [S], [A, stride]
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        conv = dict(kernel_size=(3,), padding=((1, 1),), dtype=dtype, param_dtype=param_dtype)
        frames = jnp.arange(features.shape[1])
        x = gelu_exact(nn.Conv(cfg.d_model, name="conv1", **conv)(features.astype(dtype)))
        x = x * (frames[None, :] < chunk_frames[:, None])[..., None].astype(dtype)
        x = gelu_exact(nn.Conv(cfg.d_model, strides=(2,), name="conv2", **conv)(x))
        x = x + jnp.asarray(sinusoids(cfg.max_source_positions, cfg.d_model)[:x.shape[1]], dtype)
        mask = jnp.arange(x.shape[1])[None, :] < conv_output_frames(chunk_frames)[:, None]
        # The packed row of each chunk position (padding: one past the last row, read as zeros).
        packed_rows = state_index.shape[0]
        chunk_slot = jnp.full((mask.size,), packed_rows, jnp.int32).at[state_index].set(
            jnp.arange(packed_rows, dtype=jnp.int32), mode="drop").reshape(mask.shape)
        layers = nn.scan(AudioLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.encoder_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        flat, _ = layers(cfg, name="layers")(chunks_to_packed(x, state_index), chunk_slot, state_index,
                                             mask)  # [S, d]
        ln_post = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_post", dtype=dtype, param_dtype=param_dtype)
        if cfg.pool == "stack":  # [A, pool_stride * d]: each state normalised, then concatenated
            pooled = jnp.take(ln_post(flat), pool_index, axis=0).reshape(pool_index.shape[0], -1)
        else:  # [A, d]: averaged, then normalised
            pooled = ln_post(jnp.take(flat, pool_index, axis=0).mean(axis=1))
        out = Dense((cfg.output_dim,), ("mlp", "embed"), use_bias=True, name="proj", dtype=dtype,
                    param_dtype=param_dtype)(pooled)
        # Learned audio BOS/EOS embeddings: in the checkpoint, unused by the thinker's forward pass.
        self.param("audio_bos_eos_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       ("vocab", "embed")),
                   (2, cfg.output_dim), param_dtype)
        return out
